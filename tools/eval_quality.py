"""Quality of compressed TP communication on real models: see tpcomp_megatron/quality/eval_cli.py.

    python tools/eval_quality.py --model smollm2-135m --tp 2 4 8 --calibration calibration/smollm2-135m_tp{tp}.safetensors
(installed as `tpcomp-eval-quality`); tools/plot_quality.py makes the table and the plot.
"""

import sys

from tpcomp_megatron.quality.eval_cli import main

if __name__ == "__main__":
    sys.exit(main())
