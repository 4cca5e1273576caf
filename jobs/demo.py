"""Does pretraining help? `python jobs/demo.py [--config demo] [--out runs] [--set ...]`: pretrains, then probes
and fine-tunes the pretrained encoder against random init on the demo store, and prints one table."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # ajepa without installing it

from ajepa.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
