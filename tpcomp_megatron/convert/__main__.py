"""`python -m tpcomp_megatron.convert`: the same as the `tpcomp-convert` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
