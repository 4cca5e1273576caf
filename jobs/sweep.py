"""Ray Tune sweep: `python jobs/sweep.py --space search_spaces/mask_curriculum.yaml [--num-samples N] ...`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # ajepa without installing it

from ajepa.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
