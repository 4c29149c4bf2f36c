"""Qwen2 / Qwen3 end to end: tiny random HF models (QKV bias or QK-norm, tied or untied, heads that
do not divide TP) -> tpcomp-convert at TP=1/2/4 from safetensors and from GGUF -> Megatron logits
vs HF fp32 eager; the bias and the QK-norm shown to matter; torch_dist resharding; compression on
the same layers as Llama; HF -> Megatron -> HF bit-identical, and GGUF -> Megatron -> HF exact.

Weights and tokens come from a seed drawn afresh every session (printed; reproduce a failure with
TPCOMP_TEST_SEED=<seed>). All Megatron runs share one 4-rank spawn (each spawn costs seconds of
imports on 2 cores); a job re-initializes Megatron's parallel state at its own TP size.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from tpcomp_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf
from tpcomp_megatron.testing import run_ranks

from convert_helpers import assert_round_trip_identical, logit_diff, read_json, reference_logits, stored_tensors
from qwen_helpers import VARIANTS, make_hf_model, without_qk_norm, without_qkv_bias, write_gguf

SEED = int(os.environ.get("TPCOMP_TEST_SEED") or random.SystemRandom().randrange(2**31))
SEQ = 12
TPS = (1, 2, 4)
VOCAB = 256
# fp32 on both sides; only summation order differs (blocked matmuls, the TP all-reduce, KV
# replication). Measured 0.5-2e-6 on logits of magnitude ~1; 1e-4 keeps a 50x margin and still
# catches a dropped bias or QK-norm (0.1-1, asserted below) or any layout error.
MAX_ABS = 1e-4
MIN_COSINE = 0.999999
CODEC = "fp8_e4m3/b16/e8m0"  # blocks of 16 divide every variant's hidden size (48, 32)
GGUF_VARIANTS = ("qwen2_tied", "qwen3")


def _all_logits(rank: int, world: int, jobs: list[tuple]) -> dict:
    from megatron.core import parallel_state, tensor_parallel

    from tpcomp_megatron.convert import load_megatron_model
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.megatron.cpu import cpu_megatron

    out = {}
    with cpu_megatron():
        for key, ckpt, fmt, tp, compress, tokens in jobs:
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
            try:
                tensor_parallel.model_parallel_cuda_manual_seed(1)
                model, _ = load_megatron_model(ckpt, fmt=fmt, parallel_output=False)
                model.eval()
                pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
                attn = model.decoder.layers[0].self_attention
                out[key + ("modules",)] = (attn.linear_qkv.bias is not None,
                                           type(attn.q_layernorm).__name__, type(attn.k_layernorm).__name__)
                with torch.no_grad():
                    out[key] = model(tokens, pos, None)
                    if compress:
                        handle = apply_tp_compression(model, CompressionConfig(spec=CODEC, min_bytes=0, link="cpu"))
                        out[key + ("compressed",)] = model(tokens, pos, None)
                        out[key + ("stats",)] = (handle.stats.calls_compressed, handle.stats.calls_fallback)
                        handle.remove()
                        out[key + ("removed",)] = model(tokens, pos, None)
            finally:
                parallel_state.destroy_model_parallel()
    return out if rank == 0 else {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every variant saved as HF (and two as GGUF), converted for each TP size, run in one spawn."""
    print(f"qwen e2e seed {SEED} (TPCOMP_TEST_SEED={SEED} reproduces this run)")
    root = tmp_path_factory.mktemp("qwen")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(SEED))
    refs, ckpts, jobs = {}, {}, []
    for name in VARIANTS:
        model = make_hf_model(name, root / f"hf_{name}", seed=SEED)
        refs[name] = reference_logits(model, tokens)
        for tp in TPS:
            formats = ["legacy", "torch_dist"] if (name, tp) == ("qwen3", 4) else ["legacy"]
            out = root / f"mg_{name}_tp{tp}"
            convert_hf_to_megatron(root / f"hf_{name}", out, tp=tp, formats=formats, progress=False)
            ckpts[name, tp] = out
            jobs.append(((name, tp, "legacy"), str(out), "legacy", tp, tp == 2, tokens))
        if name in GGUF_VARIANTS:
            gguf = write_gguf(model, root / f"{name}.gguf")
            out = root / f"mg_{name}_gguf_tp2"
            convert_hf_to_megatron(gguf, out, tp=2, formats=["legacy"], progress=False)
            ckpts[name, "gguf"] = out
            jobs.append(((name, 2, "gguf"), str(out), "legacy", 2, False, tokens))
    # The same weights without the QKV bias / without the QK-norm: what a converter dropping them
    # would compute.
    refs["qwen2", "no_bias"] = reference_logits(without_qkv_bias(make_hf_model("qwen2", seed=SEED)), tokens)
    refs["qwen3", "no_qk_norm"] = reference_logits(without_qk_norm(make_hf_model("qwen3", seed=SEED)), tokens)
    # Resharding: the TP=4 layout (3 KV groups replicated / padded to 8) also splits over TP=2.
    jobs.append((("qwen3", 2, "torch_dist@4"), str(ckpts["qwen3", 4]), "torch_dist", 2, False, tokens))
    logits = run_ranks(_all_logits, 4, jobs, timeout_s=600)[0]
    return root, refs, ckpts, logits


def _check(ref: torch.Tensor, got: torch.Tensor, what) -> None:
    diff, cos = logit_diff(ref, got)
    print(f"{what}: max-abs {diff:.3g}, min cosine {cos:.8f}")
    assert diff <= MAX_ABS and cos >= MIN_COSINE, f"{what} (seed {SEED}): max-abs {diff:.3g}, min cosine {cos:.8f}"


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("tp", TPS)
def test_logits_match_hf(world, name, tp):
    _, refs, _, logits = world
    _check(refs[name], logits[name, tp, "legacy"], (name, tp))


def test_megatron_modules_are_megatron_cores_own(world):
    """Qwen2: `linear_qkv` has megatron-core's bias (add_qkv_bias); Qwen3: its q/k_layernorm
    slots hold our RMSNorm (qk_layernorm) and there is no bias."""
    logits = world[3]
    for tp in TPS:
        assert logits["qwen2", tp, "legacy", "modules"] == (True, "IdentityOp", "IdentityOp")
        assert logits["qwen3", tp, "legacy", "modules"] == (False, "RMSNorm", "RMSNorm")


@pytest.mark.parametrize("name,dropped", [("qwen2", "no_bias"), ("qwen3", "no_qk_norm")])
def test_dropping_the_bias_or_qk_norm_would_fail(world, name, dropped):
    """Without its QKV bias (Qwen2) or QK-norm (Qwen3) the model's logits move far beyond the
    tolerance, and ours match the complete HF model at every TP, never the reduced one."""
    _, refs, _, logits = world
    effect, _ = logit_diff(refs[name], refs[name, dropped])
    assert effect > 100 * MAX_ABS, f"seed {SEED}: the tiny model does not exercise {dropped} ({effect:.3g})"
    for tp in TPS:
        ours, _ = logit_diff(refs[name, dropped], logits[name, tp, "legacy"])
        assert ours > 100 * MAX_ABS, (dropped, tp, ours)
    print(f"{name}: {dropped} moves the logits by up to {effect:.3g}")


@pytest.mark.parametrize("name", GGUF_VARIANTS)
def test_gguf_source_matches_hf(world, name):
    """F32 GGUF written from the HF model (llama.cpp names and keys) -> TP=2: the same logits."""
    _, refs, _, logits = world
    _check(refs[name], logits[name, 2, "gguf"], (name, "gguf", 2))


def test_torch_dist_written_for_tp4_loads_at_tp2(world):
    _, refs, _, logits = world
    _check(refs["qwen3"], logits["qwen3", 2, "torch_dist@4"], "qwen3 torch_dist@4 at TP=2")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_compression_on_qwen_tp2(world, name):
    """The same layers as Llama: linear_proj and linear_fc2 of every layer, and remove() exact."""
    _, _, _, logits = world
    off, on = logits[name, 2, "legacy"], logits[name, 2, "legacy", "compressed"]
    assert logits[name, 2, "legacy", "stats"] == (2 * 2, 0)  # 2 layers x 2 row-parallel linears
    assert torch.equal(logits[name, 2, "legacy", "removed"], off), "remove() must restore exactness"
    diff, cos = logit_diff(off, on)
    # FP8 E4M3 rounds each rank's partial sum to 3 mantissa bits: a visible but small change.
    assert 0 < diff and cos > 0.99, f"{name} (seed {SEED}): max-abs {diff:.3g}, min cosine {cos:.4f}"


@pytest.mark.parametrize("name,tp,fmt", [(n, 2, "legacy") for n in VARIANTS]
                         + [("qwen2", 4, "legacy"), ("qwen3", 4, "torch_dist")])
def test_round_trip_is_bit_identical(world, name, tp, fmt):
    root, _, ckpts, _ = world
    assert_round_trip_identical(ckpts[name, tp], root / f"hf_{name}", root / f"back_{name}_tp{tp}_{fmt}", fmt)


@pytest.mark.parametrize("name", GGUF_VARIANTS)
def test_gguf_conversion_reverses_to_the_original_tensors(world, name):
    """GGUF -> Megatron -> HF: F32 de-quantization is exact, so the HF folder written back holds the
    original model's tensors bit for bit, and transformers loads it to the same logits."""
    from transformers import AutoModelForCausalLM

    root, refs, ckpts, _ = world
    back = root / f"back_{name}_gguf"
    convert_megatron_to_hf(ckpts[name, "gguf"], back)
    src, dst = stored_tensors(root / f"hf_{name}"), stored_tensors(back)
    src.pop("lm_head.weight", None) if VARIANTS[name][1]["tie_word_embeddings"] else None
    assert sorted(src) == sorted(dst)
    for k in src:
        assert torch.equal(src[k], dst[k]), k
    model = AutoModelForCausalLM.from_pretrained(str(back), dtype=torch.float32, attn_implementation="eager")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(reference_logits(model.eval(), tokens), refs[name])


def test_config_json_records_qwen_features(world):
    root, _, ckpts, _ = world
    q2 = read_json(Path(ckpts["qwen2", 4]) / "tpcomp_config.json")
    assert q2["format"] == "tpcomp-qwen-config/1" and q2["qwen_version"] == 2
    assert (q2["rope_theta"], q2["tie_word_embeddings"], q2["kv_replication"]) == (1_000_000.0, False, 2)
    q3 = read_json(Path(ckpts["qwen3_tied", 2]) / "tpcomp_config.json")
    assert (q3["qwen_version"], q3["head_dim"], q3["hidden_size"], q3["num_attention_heads"]) == (3, 16, 32, 4)
    assert q3["tie_word_embeddings"] is True and q3["rope_theta"] == 20_000.0
    g3 = read_json(Path(ckpts["qwen3", "gguf"]) / "tpcomp_config.json")
    assert g3["head_dim"] == 12 and g3["hf_architecture"] == "Qwen3ForCausalLM"


@pytest.mark.parametrize("name", GGUF_VARIANTS)
def test_cli_converts_and_verifies_a_gguf(world, capsys, name):
    """`tpcomp-convert model.gguf OUT --tp 2 --verify`, the command of the issue: the reference is
    transformers' model of the GGUF (Qwen3's head_dim corrected), the text its byte tokenizer's."""
    from tpcomp_megatron.convert.cli import main

    root = world[0]
    argv = [str(root / f"{name}.gguf"), str(root / f"cli_{name}"), "--tp", "2", "--formats", "legacy"]
    assert main(argv + ["--verify", "--no-progress"]) == 0
    assert "-> OK" in capsys.readouterr().out
