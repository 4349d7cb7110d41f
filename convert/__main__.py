"""`python -m mlx_compact.convert ...` is `mlx-compact convert ...`."""

import sys

from mlx_compact.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
