import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import their shared helpers by module name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with planted outlier channels, and an evaluation and a calibration text
    (test_quality.py, test_sensitivity.py)."""
    from quality_helpers import CAL_TEXT, PLANTED, TEXT, make_tiny_model, write_text

    root = tmp_path_factory.mktemp("quality")
    model = make_tiny_model(root / "hf", planted=PLANTED)
    return {"root": root, "hf": str(root / "hf"), "model": model, "text": write_text(root / "eval.txt", TEXT),
            "cal_text": write_text(root / "cal.txt", CAL_TEXT)}
