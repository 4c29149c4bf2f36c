"""Gemma 1/2/3 end to end: tiny random HF models -> tpcomp-convert at TP=1/2/4 -> Megatron logits
vs HF fp32 eager; soft-caps shown to matter; torch_dist resharding, sequence parallelism, the SDPA
spec swap; compression on the same layers as Llama (and remove() restoring exactness), error
feedback through Gemma 2/3's post-norms agreeing with the simulation; HF ->
Megatron -> HF bit-identical round trips.

All Megatron runs share one 4-rank spawn (each spawn costs seconds of imports on 2 cores); a job
re-initializes Megatron's parallel state at its own TP size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tpcomp_megatron.convert import convert_hf_to_megatron
from tpcomp_megatron.testing import run_ranks

from convert_helpers import assert_round_trip_identical, read_json
from gemma_helpers import VARIANTS, make_hf_model, reference_logits

SEQ = 12  # > the 4-token window; divisible by every TP size, as sequence parallelism needs
TPS = (1, 2, 4)
VOCAB = 250
# fp32 on both sides; only summation order differs (blocked matmuls, the TP all-reduce, KV
# replication). Measured ~5e-6 on logits of magnitude 3-8; 1e-4 keeps a 20x margin and still
# catches any layout, norm, rope or mask error (those give O(0.1-1)).
MAX_ABS = 1e-4
MIN_COSINE = 0.999999
CODEC = "fp8_e4m3/b32/e8m0"
PROMPT, GEN_TOKENS = 5, 7  # decode runs past the 4-token window with a KV cache


def _all_logits(rank: int, world: int, jobs: list[tuple]) -> dict:
    from megatron.core import parallel_state, tensor_parallel

    from tpcomp_megatron.convert import load_megatron_model
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.megatron.cpu import cpu_megatron
    from tpcomp_megatron.models.core.sdpa import use_sdpa

    out = {}
    with cpu_megatron():
        for key, ckpt, fmt, tp, sp, sdpa, compress, tokens in jobs:
            generate = key[-1] == "generate"
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
            try:
                tensor_parallel.model_parallel_cuda_manual_seed(1)
                model, _ = load_megatron_model(
                    ckpt,
                    fmt=fmt,
                    sequence_parallel=sp,
                    parallel_output=False,
                    layer_spec_transform=use_sdpa if sdpa else None,
                )
                model.eval()
                if generate:
                    from tpcomp_megatron.inference.loop import greedy_generate

                    out[key] = greedy_generate(model, tokens, GEN_TOKENS, vocab_size=VOCAB).tokens
                    continue
                pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
                with torch.no_grad():
                    out[key] = model(tokens, pos, None)
                    if sdpa:
                        cores = {
                            type(l.self_attention.core_attention).__name__
                            for l in model.decoder.layers
                        }
                        out[key + ("cores",)] = cores
                    if compress:
                        cfg = CompressionConfig(spec=CODEC, min_bytes=0, link="cpu")
                        handle = apply_tp_compression(model, cfg)
                        out[key + ("compressed",)] = model(tokens, pos, None)
                        stats = handle.stats
                        out[key + ("stats",)] = (stats.calls_compressed, stats.calls_fallback)
                        handle.remove()
                        out[key + ("removed",)] = model(tokens, pos, None)
                        cfg = CompressionConfig(spec=CODEC, min_bytes=0, link="cpu", error_feedback=True)
                        handle = apply_tp_compression(model, cfg)
                        out[key + ("feedback",)] = model(tokens, pos, None)
                        out[key + ("feedback_norms",)] = _feedback_norms_match(model)
                        handle.remove()
                    if sp:  # post-norm feedback needs whole output rows; the reduce-scatter has a shard
                        cfg = CompressionConfig(spec=CODEC, min_bytes=0, link="cpu", error_feedback=True)
                        try:
                            apply_tp_compression(model, cfg).remove()
                            out[key + ("feedback",)] = "accepted"
                        except ValueError as e:
                            out[key + ("feedback",)] = str(e)
            finally:
                parallel_state.destroy_model_parallel()
    return out if rank == 0 else {}


def _feedback_norms_match(model) -> list[bool | None]:
    """Per row-parallel layer with feedback attached: whether its `PostNorm` gain is its post-norm's
    1 + weight (None: no post-norm, as in Gemma 1)."""
    res = []
    for layer in model.decoder.layers:
        for parent, row in ((layer.self_attention, layer.self_attention.linear_proj), (layer.mlp, layer.mlp.linear_fc2)):
            norm, post = row.tp_compression.norm, getattr(parent, "post_layernorm", None)
            res.append(None if norm is None and post is None else
                       norm is not None and post is not None
                       and torch.allclose(norm.gain, 1 + post.weight.float(), rtol=1e-6, atol=1e-6))
    return res


def _simulated_logits(model, tokens, feedback: bool) -> torch.Tensor:
    """The HF model at simulated TP=2 with CODEC on every reduction (quality/simtp.py)."""
    from tpcomp_megatron.codecs import make_codec
    from tpcomp_megatron.quality.simtp import SimulatedTP

    sim = SimulatedTP(model)
    codec = make_codec(CODEC)
    try:
        with torch.no_grad(), sim.session(tp=2, codecs={n: codec for n in sim.layers}, feedback=feedback):
            return model(tokens).logits.float()
    finally:
        sim.remove()


def _without_caps(model, *, attn: bool, final: bool):
    """The same HF Gemma 2 with its attention and/or final soft-cap removed."""
    if attn:
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    if final:
        model.config.final_logit_softcapping = None
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every variant saved as HF, converted for each TP size, and run in one 4-rank spawn."""
    root = tmp_path_factory.mktemp("gemma")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    refs, ckpts, jobs = {}, {}, []
    for name in VARIANTS:
        model = make_hf_model(name, root / f"hf_{name}")
        refs[name] = reference_logits(model, tokens)
        for feedback in (False, True):
            refs[name, "sim", feedback] = _simulated_logits(model, tokens, feedback)
        with torch.no_grad():
            hf_gen = model.generate(
                tokens[:, :PROMPT],
                max_new_tokens=GEN_TOKENS,
                do_sample=False,
                min_new_tokens=GEN_TOKENS,
            )
        refs[name, "generate"] = hf_gen[:, PROMPT:]
        for tp in TPS:
            formats = ["legacy", "torch_dist"] if (name, tp) == ("gemma3", 2) else ["legacy"]
            out = root / f"mg_{name}_tp{tp}"
            convert_hf_to_megatron(root / f"hf_{name}", out, tp=tp, formats=formats, progress=False)
            ckpts[name, tp] = out
            jobs.append(
                ((name, tp, "legacy"), str(out), "legacy", tp, False, False, tp == 2, tokens)
            )
    # The same Gemma 2 weights with each soft-cap removed, for the soft-cap test.
    for attn, final in ((True, False), (False, True)):
        hf = _without_caps(make_hf_model("gemma2"), attn=attn, final=final)
        refs["gemma2", "no_attn_cap" if attn else "no_final_cap"] = reference_logits(hf, tokens)
    g3 = str(ckpts["gemma3", 2])
    jobs += [
        # Resharding: the TP=2 layout (1 KV head replicated twice) also splits over TP=1.
        (("gemma3", 1, "torch_dist@2"), g3, "torch_dist", 1, False, False, False, tokens),
        (("gemma3", 2, "sp"), g3, "legacy", 2, True, False, False, tokens),
        (("gemma2", 2, "sp"), str(ckpts["gemma2", 2]), "legacy", 2, True, False, False, tokens),
        (("gemma3", 2, "sdpa"), g3, "legacy", 2, False, True, False, tokens),
        (("gemma2", 2, "sdpa"), str(ckpts["gemma2", 2]), "legacy", 2, False, True, False, tokens),
    ]
    for name in VARIANTS:
        ck = str(ckpts[name, 2])
        jobs.append(
            ((name, 2, "generate"), ck, "legacy", 2, False, False, False, tokens[:, :PROMPT])
        )
    logits = run_ranks(_all_logits, 4, jobs, timeout_s=600)[0]
    return root, refs, ckpts, logits


def _diff(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    got = got[..., : ref.shape[-1]]
    cos = torch.nn.functional.cosine_similarity(ref.flatten(0, 1), got.flatten(0, 1), dim=-1)
    return (ref - got).abs().max().item(), cos.min().item()


def _check(ref: torch.Tensor, got: torch.Tensor, what) -> None:
    diff, cos = _diff(ref, got)
    assert diff <= MAX_ABS and cos >= MIN_COSINE, (
        f"{what}: max-abs {diff:.3g}, min cosine {cos:.8f}"
    )


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("tp", TPS)
def test_logits_match_hf(world, name, tp):
    _, refs, _, logits = world
    _check(refs[name], logits[name, tp, "legacy"], (name, tp))


def test_soft_caps_are_applied(world):
    """Each Gemma 2 soft-cap changes the logits far beyond the tolerance, and our model matches the
    capped HF model, not the uncapped ones (argmax alone could not tell them apart)."""
    _, refs, _, logits = world
    capped = refs["gemma2"]
    for kind in ("no_attn_cap", "no_final_cap"):
        diff, _ = _diff(capped, refs["gemma2", kind])
        assert diff > 100 * MAX_ABS, (
            f"{kind}: the tiny model does not exercise this cap ({diff:.3g})"
        )
        for tp in TPS:
            ours, _ = _diff(refs["gemma2", kind], logits["gemma2", tp, "legacy"])
            assert ours > 100 * MAX_ABS, (kind, tp)
    # The final cap bounds every logit; the tiny model's uncapped logits exceed it.
    assert (
        refs["gemma2", "no_final_cap"].abs().max() > 3.0 > logits["gemma2", 2, "legacy"].abs().max()
    )


def test_torch_dist_reshard_sequence_parallel_and_sdpa(world):
    _, refs, _, logits = world
    _check(refs["gemma3"], logits["gemma3", 1, "torch_dist@2"], "torch_dist written at TP=2, TP=1")
    _check(refs["gemma3"], logits["gemma3", 2, "sp"], "gemma3 sequence parallel")
    _check(refs["gemma2"], logits["gemma2", 2, "sp"], "gemma2 sequence parallel")
    _check(refs["gemma3"], logits["gemma3", 2, "sdpa"], "gemma3 use_sdpa")
    _check(refs["gemma2"], logits["gemma2", 2, "sdpa"], "gemma2 use_sdpa")
    assert logits["gemma3", 2, "sdpa", "cores"] == {"GemmaSDPADotProductAttention"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_greedy_decode_matches_hf_generate(world, name):
    """Megatron's static KV cache at TP=2: decode steps use the window offset and, for Gemma 3's
    local layers, the sliced per-layer rope; the tokens must be HF `generate`'s greedy ones."""
    _, refs, _, logits = world
    assert torch.equal(logits[name, 2, "generate"], refs[name, "generate"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_compression_on_gemma_tp2(world, name):
    """The same layers and flag as Llama: linear_proj and linear_fc2 of every layer; the
    post-norms of Gemma 2/3 then normalize the decompressed sums."""
    _, refs, _, logits = world
    off = logits[name, 2, "legacy"]
    on = logits[name, 2, "legacy", "compressed"]
    calls, fallbacks = logits[name, 2, "legacy", "stats"]
    layers = VARIANTS[name].get("num_hidden_layers", 2)
    assert (calls, fallbacks) == (2 * layers, 0)
    assert torch.equal(logits[name, 2, "legacy", "removed"], off), "remove() must restore exactness"
    diff, cos = _diff(off, on)
    # FP8 E4M3 (3 mantissa bits) adds up to half a step (1/16) of each block's max per rank to
    # every reduction; these random weights (init 0.2) make logits sensitive to it. Measured: min
    # cosine 0.9964-0.9972, max-abs 0.40-0.46; 0.99 still fails on a wrong decode (cosine ~0).
    assert 0 < diff and cos > 0.99, f"{name}: max-abs {diff:.3g}, min cosine {cos:.4f}"
    print(f"{name} TP=2 {CODEC}: logits max-abs {diff:.3g}, min cosine {cos:.5f} vs uncompressed")


@pytest.mark.parametrize("name,fmt", [(n, "legacy") for n in VARIANTS] + [("gemma3", "torch_dist")])
def test_round_trip_is_bit_identical(world, name, fmt):
    root, _, ckpts, _ = world
    assert_round_trip_identical(ckpts[name, 2], root / f"hf_{name}", root / f"back_{name}_{fmt}", fmt)


def test_config_json_records_gemma_features(world):
    root, _, ckpts, _ = world
    g3 = read_json(Path(ckpts["gemma3", 2]) / "tpcomp_config.json")
    assert g3["format"] == "tpcomp-gemma-config/1" and g3["gemma_version"] == 3
    assert g3["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (g3["local_rope_theta"], g3["rope_theta"]) == (10_000.0, 1_000_000.0)
    assert g3["rope_scaling"]["rope_type"] == "linear" and g3["kv_replication"] == 2
    g2 = read_json(Path(ckpts["gemma2", 4]) / "tpcomp_config.json")
    assert (g2["attn_logit_softcapping"], g2["final_logit_softcapping"]) == (2.0, 3.0)
    assert (g2["query_pre_attn_scalar"], g2["sliding_window"]) == (24.0, 4)


def test_cli_converts_and_verifies_gemma2(world, capsys):
    """`tpcomp-convert SRC OUT --tp 2 --verify` on a soft-capped, windowed Gemma 2."""
    from tpcomp_megatron.convert.cli import main

    root = world[0]
    argv = [str(root / "hf_gemma2"), str(root / "cli_gemma2"), "--tp", "2", "--formats", "legacy"]
    assert main(argv + ["--verify", "--no-progress"]) == 0
    assert "-> OK" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_error_feedback_on_gemma_tp2_matches_simulation(world, name):
    """`--tp-comm-error-feedback` on Megatron Gemma at TP=2: Gemma 2/3 pay their debts through each
    layer's post-norm (its gain read from the Megatron norm), Gemma 1 straight into the residual;
    the real ranks agree with the simulation of the HF model, with feedback as without it. Under
    sequence parallelism post-norm feedback is refused (the norm's RMS needs whole rows)."""
    _, refs, _, logits = world
    post_norms = name != "gemma1"
    norms = logits[name, 2, "legacy", "feedback_norms"]
    assert norms == ([True] if post_norms else [None]) * len(norms), norms
    for feedback, got in ((False, logits[name, 2, "legacy", "compressed"]), (True, logits[name, 2, "legacy", "feedback"])):
        sim = refs[name, "sim", feedback]
        diff, _ = _diff(sim, got)
        effect, _ = _diff(refs[name, "sim", not feedback], sim)
        # Same partial sums but for summation order, so a value may cross an FP8 rounding
        # boundary. Measured max-abs 0 (Gemma 1/2) and 2e-5 (Gemma 3), against an effect of
        # feedback of 0.37-0.49; the bound is a tenth of that effect.
        assert diff < 0.1 * effect, f"{name} feedback={feedback}: {diff:.3g} vs effect {effect:.3g}"
        print(f"{name} feedback={feedback}: Megatron vs simulation max-abs {diff:.3g}, feedback's effect {effect:.3g}")
    if post_norms:
        assert "post-norm needs every output row" in logits[name, 2, "sp", "feedback"]
