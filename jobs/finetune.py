"""Fine-tuning: `python jobs/finetune.py --checkpoint RUN_OR_PATH|none [--data STORE] [--steps N] ...`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # ajepa without installing it

from ajepa.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
