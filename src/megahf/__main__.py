"""`python -m megahf <verb> ...`, the same as the `megahf` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
