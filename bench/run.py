"""Run the bench harness: python bench/run.py [--family vit ...] [--size tiny|bench] (same as `nnforge bench`)."""

import sys

from nnforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
