"""End to end: a tiny Llama-style GPTModel at TP=2 and TP=4, compressed, against the same
weights at TP=1 in one process."""

import pytest
import torch

from tpcomp_megatron.testing import run_ranks

from megatron_helpers import init_megatron, shard_state_dict, tiny_gpt

SEQ, BATCH = 8, 2
# codec -> element mantissa bits (the relative step of an element is 2**-m; INT8 ~ 2**-7)
CODECS = {"int8/b32/bf16": 7, "fp8_e4m3/b32/e8m0": 3, "fp4_e2m1/b32/e8m0": 1}


def _forward(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, attention_mask=None).float()


def _reference(rank, world):
    _ctx = init_megatron(1)  # noqa: F841 - the CPU adapter lives as long as this reference
    model = tiny_gpt(1)
    model.eval()
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tokens = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    return sd, tokens, _forward(model, tokens)


def _tensor_parallel(rank, world, sd, tokens, sp):
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression

    _ctx = init_megatron(world)  # noqa: F841
    model = tiny_gpt(world, sp=sp)
    model.eval()
    missing, unexpected = model.load_state_dict(shard_state_dict(sd, world, rank), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    out = {"off": _forward(model, tokens)}
    for spec in CODECS:
        cfg = CompressionConfig(spec=spec, min_bytes=0, link="cpu",
                                gather_spec=spec if sp and spec.startswith("int8") else "none")
        handle = apply_tp_compression(model, cfg)
        out[spec] = _forward(model, tokens)
        out[spec + ":stats"] = (handle.stats.calls_compressed, handle.stats.calls_fallback, handle.stats.compression_ratio)
        handle.remove()
    out["off_again"] = _forward(model, tokens)
    return out


@pytest.fixture(scope="module")
def reference():
    return run_ranks(_reference, 1)[0]


@pytest.mark.parametrize("world,sp", [(2, False), (2, True), (4, False)])
def test_tiny_gpt_compressed_matches_tp1(reference, world, sp):
    sd, tokens, ref = reference
    outs = run_ranks(_tensor_parallel, world, sd, tokens, sp, timeout_s=300)
    scale = ref.abs().max().item()
    for out in outs:
        # Compression off: same function, only the fp32 summation order of the TP reduction differs.
        assert (out["off"] - ref).abs().max().item() < 1e-4 * scale
        assert torch.equal(out["off_again"], out["off"]), "remove() must restore the exact model"
        for spec, mbits in CODECS.items():
            calls, fallbacks, ratio = out[spec + ":stats"]
            assert calls == 2 * 2 + (2 * 2 if sp and spec.startswith("int8") else 0) and fallbacks == 0
            assert ratio > 1.8
            err = (out[spec] - ref).abs().max().item()
            # Each compressed reduction adds at most half an element step (2**-(m+1)) of its
            # block maximum per rank; the 4 reductions' errors partly cancel through the final
            # norm. Measured: 0.13-0.18 (FP4), 0.03-0.04 (FP8), 0.004-0.007 (INT8) of max|logit|;
            # the bound allows world * 2**-m, twice the half-step sum over ranks.
            tol = world * 2.0 ** -mbits * scale
            print(f"TP={world} sp={sp} {spec}: max|logit err| {err / scale:.4f} of max|logit|")
            assert 0 < err < tol, (spec, err, tol)
        errs = [(out[spec] - ref).abs().max().item() for spec in CODECS]
        assert errs == sorted(errs), f"error must grow as bits shrink: {errs}"
    for out in outs[1:]:  # every rank computes the same (full-vocab) logits
        for spec in CODECS:
            assert torch.equal(out[spec], outs[0][spec])


def _sdpa(rank, world, sd, tokens):
    from tpcomp_megatron.models.core.sdpa import SDPADotProductAttention
    from tpcomp_megatron.inference.loop import greedy_generate

    _ctx = init_megatron(world)  # noqa: F841
    out = {}
    for name in ("local", "sdpa"):
        model = tiny_gpt(world, core_attention=SDPADotProductAttention if name == "sdpa" else None)
        model.eval()
        model.load_state_dict(shard_state_dict(sd, world, rank), strict=False)
        out[name] = (_forward(model, tokens), greedy_generate(model, tokens, 5, vocab_size=256).tokens)
    return out


def test_sdpa_attention_matches_megatron_local_attention(reference):
    sd, tokens, ref = reference
    out = run_ranks(_sdpa, 2, sd, tokens)[0]
    # Same math, different kernels: fp32 rounding differences only.
    assert (out["sdpa"][0] - out["local"][0]).abs().max().item() < 1e-4 * ref.abs().max().item()
    assert torch.equal(out["sdpa"][1], out["local"][1])  # KV-cache decode path too
