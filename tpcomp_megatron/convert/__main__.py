"""`python -m tpcomp_megatron.convert`: the same as the `tpcomp-convert` console script."""

import sys

from ..console import convert

if __name__ == "__main__":
    sys.exit(convert())
