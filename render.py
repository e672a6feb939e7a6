"""``python render.py storyboard.yaml [options]``: the same as ``skyray render``."""

import sys

from skyray.cli import main

if __name__ == "__main__":
    sys.exit(main(["render", *sys.argv[1:]]))
