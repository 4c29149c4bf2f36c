"""CompressedRowParallelLinear / CompressedColumnParallelLinear against stock Megatron layers."""

import time

import pytest
import torch

from tpcomp_megatron.codecs import make_codec
from tpcomp_megatron.comm import CompressedComm, GatePolicy
from tpcomp_megatron.megatron import (CompressedColumnParallelLinear, CompressedRowParallelLinear,
                                      LayerCompression)
from tpcomp_megatron.testing import run_ranks

from megatron_helpers import init_megatron, one_row_parallel_layer, tiny_config


def _row_pair(cls_a, cls_b, config, seed):
    from megatron.core.tensor_parallel.layers import RowParallelLinear  # noqa: F401

    layers = []
    for cls in (cls_a, cls_b):
        torch.manual_seed(seed)  # CPU init draws the full weight from this stream, then splits
        layers.append(cls(256, 64, config=config, init_method=torch.nn.init.xavier_normal_, bias=True,
                          input_is_parallel=True, skip_bias_add=False))
    return layers


def _layers(rank, world):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    _ctx = init_megatron(world)  # keep a reference: the CPU adapter lives as long as it does
    comm = CompressedComm(parallel_state.get_tensor_model_parallel_group(), GatePolicy(min_bytes=0, link="cpu"))
    results = {}
    for sp in (False, True):
        cfg = tiny_config(world, sp=sp)
        stock, ours = _row_pair(RowParallelLinear, CompressedRowParallelLinear, cfg, 11)
        with torch.no_grad():
            stock.bias.normal_()
            ours.bias.copy_(stock.bias)
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(4 * world, 2, 256 // world, generator=gen, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y_stock, _ = stock(x)
        y_off, _ = ours(x2)
        results[(sp, "off_equal")] = torch.equal(y_stock, y_off)
        ours.tp_compression = LayerCompression(comm, make_codec("int8/b32/bf16"))
        y_on, _ = ours(x2)
        results[(sp, "on_rel_err")] = ((y_on - y_stock).abs().max() / y_stock.abs().max()).item()
        results[(sp, "on_differs")] = not torch.equal(y_on, y_stock)
        g = torch.randn_like(y_stock)
        (y_stock * g).sum().backward()
        (y_on * g).sum().backward()
        results[(sp, "grad_input_equal")] = torch.equal(x.grad, x2.grad)
        results[(sp, "grad_weight_close")] = torch.allclose(stock.weight.grad, ours.weight.grad, rtol=0.05, atol=1e-3)
    # column-parallel: the sequence-parallel all-gather of its input
    cfg = tiny_config(world, sp=True)
    cols = []
    for cls in (ColumnParallelLinear, CompressedColumnParallelLinear):
        torch.manual_seed(5)
        cols.append(cls(64, 96, config=cfg, init_method=torch.nn.init.xavier_normal_, bias=False, gather_output=False))
    x = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_stock, _ = cols[0](x)
    results["col_off_equal"] = torch.equal(y_stock, cols[1](x2)[0])
    cols[1].tp_compression = LayerCompression(comm, make_codec("int8/b32/bf16"))
    y_on, _ = cols[1](x2)
    results["col_on_rel_err"] = ((y_on - y_stock).abs().max() / y_stock.abs().max()).item()
    g = torch.randn_like(y_stock)
    (y_stock * g).sum().backward()
    (y_on * g).sum().backward()
    results["col_grad_input_equal"] = torch.equal(x.grad, x2.grad)
    results["calls"] = comm.stats.calls_compressed
    return results


@pytest.mark.parametrize("world", [2])
def test_layers_match_stock_megatron(world):
    for res in run_ranks(_layers, world):
        for sp in (False, True):
            assert res[(sp, "off_equal")], "compression off must be bit-identical to stock Megatron"
            assert res[(sp, "on_differs")]
            # INT8 with bf16 block scales: half a step of 127 levels per rank, so < 2 x 1/254 of
            # the block max per rank; relative to the output max, 2 ranks: < 2%.
            assert res[(sp, "on_rel_err")] < 0.02, res
            # Backward is exact (identity through all-reduce, exact all-gather through
            # reduce-scatter), so the input gradient does not depend on the forward codec.
            assert res[(sp, "grad_input_equal")]
            assert res[(sp, "grad_weight_close")]
        assert res["col_off_equal"] and res["col_on_rel_err"] < 0.02 and res["col_grad_input_equal"]
        assert res["calls"] > 0


def _apply_errors(rank, world):
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression

    _ctx = init_megatron(world)  # noqa: F841
    cfg = CompressionConfig(spec="int4", min_bytes=0, link="cpu")
    errors = {}
    empty = torch.nn.Sequential(torch.nn.Linear(4, 4))
    try:
        apply_tp_compression(empty, cfg)
    except ValueError as e:
        errors["none_found"] = str(e)

    class Attn(torch.nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.linear_proj = proj

    class Foreign(torch.nn.Linear):  # stands in for Transformer Engine's row-parallel linear
        pass

    foreign = torch.nn.Module()
    foreign.self_attention = Attn(Foreign(4, 4))
    try:
        apply_tp_compression(foreign, cfg)
    except ValueError as e:
        errors["foreign"] = str(e)
    torch.manual_seed(0)
    stock = torch.nn.Module()
    stock.self_attention = Attn(RowParallelLinear(64, 64, config=tiny_config(world), init_method=torch.nn.init.zeros_,
                                                  bias=False, input_is_parallel=True, skip_bias_add=True))
    handle = apply_tp_compression(stock, cfg)
    errors["swapped"] = type(stock.self_attention.linear_proj).__name__
    handle.remove()
    errors["restored"] = type(stock.self_attention.linear_proj).__name__
    errors["attr_gone"] = "tp_compression" not in stock.self_attention.linear_proj.__dict__
    return errors


def test_apply_errors_and_undo():
    errors = run_ranks(_apply_errors, 1)[0]
    assert "no tensor-parallel layer to compress" in errors["none_found"]
    assert "not Megatron's RowParallelLinear" in errors["foreign"] and "local" in errors["foreign"]
    assert errors["swapped"] == "CompressedRowParallelLinear" and errors["restored"] == "RowParallelLinear"
    assert errors["attr_gone"]


def _apply_overrides(rank, world):
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression

    _ctx = init_megatron(world)  # noqa: F841

    def layer():
        m = torch.nn.Module()
        m.self_attention = torch.nn.Module()
        m.self_attention.linear_proj = RowParallelLinear(64, 64, config=tiny_config(world), init_method=torch.nn.init.zeros_,
                                                         bias=False, input_is_parallel=True, skip_bias_add=True)
        m.mlp = torch.nn.Module()
        m.mlp.linear_fc2 = RowParallelLinear(64, 64, config=tiny_config(world), init_method=torch.nn.init.zeros_,
                                             bias=False, input_is_parallel=True, skip_bias_add=True)
        return m

    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList([layer() for _ in range(3)])
    cfg = CompressionConfig(spec="fp4_e2m1/b32/e8m0up", min_bytes=0, link="cpu",
                            overrides=(("decoder.layers.0.*", "fp8_e4m3/b32/e8m0up"), ("*.2.mlp.*", "none")))
    handle = apply_tp_compression(model, cfg)
    got = {}
    for name, module in model.named_modules():
        if name.endswith(("linear_proj", "linear_fc2")):
            lc = module.__dict__.get("tp_compression")
            got[name] = str(lc.codec.spec) if lc is not None else type(module).__name__
    handle.remove()
    restored = all(type(m) is RowParallelLinear for n, m in model.named_modules() if n.endswith(("linear_proj", "linear_fc2")))
    try:
        apply_tp_compression(model, CompressionConfig(spec="int4", link="cpu", overrides=(("decoder.layer.0.*", "none"),)))
        unused = None
    except ValueError as e:
        unused = str(e)
    return got, restored, unused


def test_per_layer_overrides():
    got, restored, unused = run_ranks(_apply_overrides, 2)[1]
    assert got == {
        "decoder.layers.0.self_attention.linear_proj": "fp8_e4m3/b32/e8m0up",
        "decoder.layers.0.mlp.linear_fc2": "fp8_e4m3/b32/e8m0up",
        "decoder.layers.1.self_attention.linear_proj": "fp4_e2m1/b32/e8m0up",
        "decoder.layers.1.mlp.linear_fc2": "fp4_e2m1/b32/e8m0up",
        "decoder.layers.2.self_attention.linear_proj": "fp4_e2m1/b32/e8m0up",
        "decoder.layers.2.mlp.linear_fc2": "RowParallelLinear",  # 'none': left exact, class untouched
    }
    assert restored
    assert unused and "match no compressed row-parallel layer" in unused and "decoder.layer.0.*" in unused


def _link_mismatch(rank, world):
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression

    _ctx = init_megatron(world)  # noqa: F841
    model = one_row_parallel_layer(world, 1024)
    cfg = CompressionConfig(spec="fp4_e2m1/b32/e6m2", link="cpu" if rank == 0 else "nvlink")
    t0 = time.monotonic()
    try:
        apply_tp_compression(model, cfg)
    except ValueError as e:
        return str(e), time.monotonic() - t0
    return None, time.monotonic() - t0


def test_ranks_differing_only_in_link_fail_at_setup():
    """Ranks whose gates would choose different collectives (here: only the link class differs,
    so at 1 MB one compresses and the other does not) fail at apply_tp_compression, naming the
    setting, instead of hanging in their first forward (a regression times out here)."""
    for msg, elapsed in run_ranks(_link_mismatch, 2, timeout_s=90, pg_timeout_s=30):
        assert msg and "different compression configurations" in msg
        assert "link=cpu" in msg and "link=nvlink" in msg
        assert elapsed < 10, f"the refusal took {elapsed:.1f} s"


def _calibration_of_another_model(rank, world):
    from tpcomp_megatron.calibration import Calibration
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression

    _ctx = init_megatron(world)  # noqa: F841
    model = one_row_parallel_layer(world, 64)
    name = "self_attention.linear_proj"
    cal = Calibration(meta={"tp_size": world, "hidden": 64, "model": "other-model", "version": 2,
                            "layers": [name]},
                      stats={name: (-torch.ones(world + 1, 64), torch.ones(world + 1, 64))},
                      channels={name: torch.tensor([1, 5])})
    got = {}
    for model_name in ("tiny-model", "other-model", None):
        cfg = CompressionConfig(spec="outlier_int4/k32", calibration="unused.safetensors", link="cpu",
                                model=model_name)
        try:
            apply_tp_compression(model, cfg, calibration=cal).remove()
            got[model_name] = None
        except ValueError as e:
            got[model_name] = str(e)
    return got


def test_a_calibration_made_for_another_model_is_refused():
    """Same hidden size, same TP, another model: refused by name when the model's name is known
    (generate.py passes it), accepted for the right model and when no name is given."""
    for got in run_ranks(_calibration_of_another_model, 2):
        assert got["tiny-model"] and "made for model 'other-model', not 'tiny-model'" in got["tiny-model"]
        assert got["other-model"] is None and got[None] is None
