"""Build a spectrogram store: `python jobs/prepare_data.py --input DIR|manifest.csv|demo [--out DIR]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # ajepa without installing it

from ajepa.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare-data", *sys.argv[1:]]))
