"""The deployment step (megatron/deploy.py): a configuration reads nothing; `read_inputs` reads
its files once and refuses a bad one by name; `resolve` maps every compressed layer by its exact
name (no patterns left), shares one codec object per codec value, and `apply_tp_compression` of
the resolved `Deployment` gives the model what applying the configuration gives it; a deployment
saved as a recipe deploys again to the same plan."""

from __future__ import annotations

import pytest
import torch

from megatron_helpers import init_megatron, tiny_gpt
from tpcomp_megatron.testing import run_ranks


def test_a_configuration_reads_no_file(tmp_path):
    from tpcomp_megatron.megatron import CompressionConfig, read_inputs

    missing = tmp_path / "missing.safetensors"
    cfg = CompressionConfig(recipe=str(missing))  # constructing it opens nothing
    assert cfg.enabled
    with pytest.raises(ValueError, match="cannot read the recipe .*missing.safetensors"):
        read_inputs(cfg)
    bad = tmp_path / "cal.safetensors"
    bad.write_bytes(b"not a calibration")
    cfg = CompressionConfig(spec="outlier+fp4_e2m1/b32/k32", calibration=str(bad))
    with pytest.raises((ValueError, OSError), match="cal.safetensors"):
        read_inputs(cfg)


def _deploy(rank, world):
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression, resolve

    _ctx = init_megatron(world)  # noqa: F841
    torch.manual_seed(0)
    model = tiny_gpt(world)
    cfg = CompressionConfig(spec="fp4", min_bytes=0, link="cpu",
                            overrides=(("decoder.layers.0.*", "fp8"), ("*.linear_proj", "none")))
    d = resolve(cfg, model)
    names = [n for n, _ in model.named_modules() if n.endswith(("linear_proj", "linear_fc2"))]
    got = {n: (None if c is None else str(c.spec)) for n, c in d.reductions.items()}
    codecs = {id(c) for c in d.reductions.values()}
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = apply_tp_compression(model, d)
        via_deployment = model(tokens, None, attention_mask=None)
        h.remove()
        h = apply_tp_compression(model, cfg)
        via_config = model(tokens, None, attention_mask=None)
        h.remove()
    return names, got, len(codecs), len(d.reductions), d.digest, torch.equal(via_deployment, via_config)


def _round_trip(rank, world, tmp):
    """A deployment saved as a recipe deploys again to the same plan and the same outputs."""
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression, resolve, to_recipe
    from tpcomp_megatron.models import LlamaModelConfig
    from tpcomp_megatron.recipe import save_recipe

    _ctx = init_megatron(world)  # noqa: F841
    torch.manual_seed(0)
    model = tiny_gpt(world)
    mc = LlamaModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8, num_kv_heads=4,
                          head_dim=8, vocab_size=256, max_position_embeddings=64)
    cfg = CompressionConfig(spec="fp4", min_bytes=0, link="cpu", overrides=(("decoder.layers.1.mlp.*", "fp8"),))
    first = resolve(cfg, model, model_config=mc)
    path = f"{tmp}/plan.safetensors"
    if rank == 0:
        save_recipe(path, to_recipe(first, mc, made_by={"command": "test"}))
    torch.distributed.barrier()
    again = resolve(CompressionConfig(recipe=path, min_bytes=0, link="cpu"), model, model_config=mc)
    tokens = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    outs = []
    with torch.no_grad():
        for d in (first, again):
            h = apply_tp_compression(model, d)
            outs.append(model(tokens, None, attention_mask=None))
            h.remove()
    return first.plan, again.plan, torch.equal(*outs)


def test_resolve_maps_exact_names_and_attaches_what_the_config_gives():
    for names, got, codecs, n, digest, same in run_ranks(_deploy, 2, timeout_s=300):
        assert set(got) <= set(names) and all("*" not in n for n in got)  # exact module names
        # the first matching pattern wins: layer 0 all fp8, the other attention projections exact
        # (not attached: no error feedback), the other MLPs the spec
        want = {n: "fp8_e4m3/b32/e8m0up" for n in names if n.startswith("decoder.layers.0.")}
        want |= {n: "fp4_e2m1/b32/e6m2" for n in names if n.endswith("linear_fc2") and n not in want}
        assert got == want, got
        assert codecs == 2 and n == len(got)  # one codec object per codec value
        assert len(digest) == 16 and same


def test_a_deployment_saved_as_a_recipe_deploys_again_the_same(tmp_path):
    for first, again, same in run_ranks(_round_trip, 2, str(tmp_path), timeout_s=300):
        assert first == again and len(first) == 4 and "none" not in first.values()
        assert first["decoder.layers.1.mlp.linear_fc2"] == "fp8_e4m3/b32/e8m0up" and same
