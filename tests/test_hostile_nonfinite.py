"""Non-finite logits under compression (issue 32 item 5): never printed as a result; the first
module whose output held NaN or inf is named (generate.py, --compare, tpcomp-eval-quality,
tpcomp-sensitivity). Before, greedy decoding of NaN logits printed text as if it were one, and the
records said `ppl nan`."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from megatron_helpers import init_megatron, tiny_gpt
from quality_helpers import quiet
from tpcomp_megatron.testing import run_ranks

SPEC = "fp8_e4m3/b32/e8m0"


class _NaNOnDecode:
    """A layer's communicator whose compressed all-reduce returns NaN on decode steps (one row)."""

    def __init__(self, comm):
        self._comm = comm

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def all_reduce(self, x, codec, **kw):
        out = self._comm.all_reduce(x, codec, **kw)
        return out * float("nan") if x.shape[0] * x.shape[1] == 1 else out


def _generation(rank, world):
    from megatron.core import parallel_state

    from tpcomp_megatron.inference.finite import NonFiniteLogits, check_generation, check_logits
    from tpcomp_megatron.inference.loop import full_logits, greedy_generate
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression

    _ctx = init_megatron(world)  # noqa: F841
    model = tiny_gpt(world).eval()
    group = parallel_state.get_tensor_model_parallel_group()
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    out = {}

    def attempt(key, **kw):
        gen = greedy_generate(model, prompt, 4, vocab_size=256)
        try:
            check_generation(model, prompt, gen, vocab_size=256, group=group, what=f"[{key}] generation", **kw)
            out[key] = ("ok", gen.nonfinite_step)
        except NonFiniteLogits as e:
            out[key] = ("error", gen.nonfinite_step, str(e))

    handle = apply_tp_compression(model, CompressionConfig(spec=SPEC, min_bytes=0, link="cpu"))
    attempt("clean")
    layer = model.decoder.layers[1].self_attention.linear_proj  # the codec breaks at layer 1, decode only
    layer.tp_compression = dataclasses.replace(layer.tp_compression, comm=_NaNOnDecode(layer.tp_compression.comm))
    attempt("codec")
    handle.remove()
    with torch.no_grad():  # a NaN weight in rank 1's shard alone: rank 0 sees it first after the all-reduce
        if rank == 1:
            model.decoder.layers[0].mlp.linear_fc1.weight[3, 5] = float("nan")
    attempt("weight")
    tokens = torch.cat([prompt, prompt], 1)
    try:
        check_logits(full_logits(model, tokens, vocab_size=256), model,
                     lambda: full_logits(model, tokens, vocab_size=256), what="[on] prefill", group=group)
        out["prefill"] = ("ok",)
    except NonFiniteLogits as e:
        out["prefill"] = ("error", str(e))
    return out


def test_generation_names_the_first_non_finite_layer_on_every_rank():
    outs = run_ranks(_generation, 2, timeout_s=120)
    for out in outs:
        assert out["clean"] == ("ok", None)
        status, step, msg = out["codec"]
        assert status == "error" and step == 2, out["codec"]  # the prompt's token was finite
        assert msg.startswith("[codec] generation, from generated token 2: the logits are non-finite (NaN or inf), "
                              "not a result; first non-finite output: decoder.layers.1.self_attention.linear_proj "
                              "(transformer layer 1, counting from 0)"), msg
        status, step, msg = out["weight"]
        assert status == "error" and step == 1 and "decoder.layers.0.mlp.linear_fc1 " in msg, out["weight"]
        assert out["prefill"][0] == "error" and "decoder.layers.0.mlp.linear_fc1 " in out["prefill"][1]
    assert outs[0]["weight"] == outs[1]["weight"]  # both ranks name rank 1's shard


@pytest.fixture()
def poisoned(monkeypatch):
    """Simulated all-reduces whose codec is in `codecs` return NaN (a codec that breaks)."""
    from tpcomp_megatron.quality import simtp

    real, codecs = simtp.simulated_all_reduce, []

    def poisoned_reduce(codec, partials, **kw):
        out = real(codec, partials, **kw)
        return out * float("nan") if any(codec is c or str(getattr(codec, "spec", "")) == c for c in codecs) else out
    monkeypatch.setattr(simtp, "simulated_all_reduce", poisoned_reduce)
    return codecs


def test_a_simulated_point_is_marked_naming_the_layer_and_a_ranking_refused(tiny, poisoned):
    from tpcomp_megatron.codecs import make_codec
    from tpcomp_megatron.inference.finite import NonFiniteLogits
    from tpcomp_megatron.quality.metrics import Totals
    from tpcomp_megatron.quality.models import load_model
    from tpcomp_megatron.quality.records import environment, nonfinite_summary, quality_record, summary_line
    from tpcomp_megatron.quality.sensitivity import layer_sensitivity
    from tpcomp_megatron.quality.simtp import SimulatedTP
    from tpcomp_megatron.quality.sweep import Plan, compare
    from tpcomp_megatron.quality.text import make_windows

    model, tok, _ = load_model(tiny["hf"])
    sim = SimulatedTP(model)
    windows = make_windows(tok, tiny["text"], seq_len=32, windows=2)
    names = list(sim.layers)
    target = next(n for n in names if n.startswith("decoder.layers.1.") and n.endswith("linear_fc2"))
    bad = copy.copy(make_codec(SPEC))
    poisoned.append(bad)
    clean = {n: make_codec(SPEC) for n in names}
    lines = []
    base, (broken, fine), _ = compare(model, sim, windows, [Plan(3, {**clean, target: bad}), Plan(3, clean)],
                                      labels=["broken", "fine"], log=lines.append)
    assert fine.nonfinite is None and broken.nonfinite.startswith("window 1: first non-finite output: ")
    assert "layers.1." in broken.nonfinite and "transformer layer 1," in broken.nonfinite, broken.nonfinite
    assert any(line.startswith("broken: NaN or inf logits at window 1") for line in lines), lines
    rec = quality_record(model="m", text="t", totals=broken, baseline=base, world_size=3, simulated=True, codec=SPEC,
                         bits=8.25, calibration="none", env={})
    assert rec["nonfinite"] == broken.nonfinite and "NON-FINITE logits" in summary_line(rec, "x")
    ok = quality_record(model="m", text="t", totals=fine, baseline=base, world_size=3, simulated=True, codec=SPEC,
                        bits=8.25, calibration="none", env={})
    assert "nonfinite" not in ok and nonfinite_summary([ok]) is None
    assert nonfinite_summary([rec, ok]).startswith(f"non-finite logits at 1 of 2 points (marked 'nonfinite' in the "
                                                   f"records): TP=3 {SPEC} (window 1: ")
    with pytest.raises(NonFiniteLogits, match=rf"compressing only {target} \(codec {SPEC}\) gives NaN or inf logits"):
        layer_sensitivity(model, sim, windows, tp=3, codecs={n: bad if n == target else clean[n] for n in names})


def test_eval_quality_marks_the_record_and_exits_2_with_one_line(tiny, poisoned, tmp_path, capsys):
    from tpcomp_megatron.quality.eval_cli import main

    clean = "fp8_e4m3/b32/e8m0up"
    poisoned.append(SPEC)  # every layer: layer 0's attention output is the first
    out = tmp_path / "q.jsonl"
    rc = main(["--model", tiny["hf"], "--tp", "3", "--codecs", SPEC, clean, "--text", tiny["text"], "--seq-len", "32",
               "--windows", "1", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tpcomp-")]  # (not
    assert rc == 2 and len(err) == 1, err  # transformers' progress bars)
    assert err[0].startswith(f"tpcomp-eval-quality: error: non-finite logits at 1 of 2 points") and "layers.0." in err[0]
    records = {r["codec"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "layers.0." in records[SPEC]["nonfinite"] and "nonfinite" not in records[clean]
