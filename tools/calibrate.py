"""Calibration of the outlier codecs on a real model at TP=N: see tpcomp_megatron/quality/calibrate_cli.py.

    python tools/calibrate.py --model smollm2-135m --tp 2 4 8 --output calibration/smollm2-135m_tp{tp}.safetensors
(installed as `tpcomp-calibrate`)
"""

import sys

from tpcomp_megatron.quality.calibrate_cli import main

if __name__ == "__main__":
    sys.exit(main())
