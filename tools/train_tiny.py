"""Train the ``tiny-trained`` model: the same as ``skyray model train-tiny`` (``skyray/training/build.py``).

    .venv/bin/python tools/train_tiny.py --out skyray/assets/tiny_trained --evaluate
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skyray.training.build import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
