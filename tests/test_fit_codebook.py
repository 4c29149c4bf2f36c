"""tools/fit_codebook.py: its model of the quantizer is the codec's, and its Lloyd-Max fit
converges to a fixed point that beats where it started."""

import importlib.util
from pathlib import Path

import torch

from tpcomp_megatron.codecs import make_codec
from tpcomp_megatron.codecs.formats import LLOYD_LEVELS

_spec = importlib.util.spec_from_file_location("fit_codebook", Path(__file__).parents[1] / "tools" / "fit_codebook.py")
fit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit)


def _blocks(n: int, gen: torch.Generator) -> torch.Tensor:
    """Heavy-tailed rows (Student-t, 4 degrees of freedom) at random magnitudes, as blocks of 32."""
    z = torch.randn(n, 32, generator=gen)
    chi = torch.randn(n, 32, 4, generator=gen).pow(2).sum(-1) / 4
    return z / chi.sqrt() * torch.exp(torch.randn(n, 1, generator=gen))


def test_quantizer_model_is_the_codecs():
    """What the fitting tool assumes a value decodes to is what the lloyd4 codec decodes it to."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    x = _blocks(64, gen)
    levels = torch.tensor(LLOYD_LEVELS["lloyd4"], dtype=torch.float32) / fit.GRID
    v, scale, idx = fit.quantize(x, levels)
    model = torch.sign(x) * levels[idx] * scale
    codec = make_codec("lloyd4/b32/e6m2")
    got = codec.decode_f32(codec.encode(x.reshape(8, 256)), 256).reshape(64, 32)
    assert torch.equal(got, model)


def test_lloyd_max_reaches_a_better_fixed_point():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    blocks = _blocks(4000, gen)
    start = torch.linspace(0.05, 1, 8)
    levels = fit.lloyd_max(blocks, 8, iters=60)
    assert levels[-1] == 1 and bool((levels.diff() > 0).all())
    assert fit.snr_db(blocks, levels) > fit.snr_db(blocks, start) + 0.5
    step = fit.lloyd_max(blocks, 8, iters=1, start=levels)  # a fixed point: one more step moves little
    assert (step - levels).abs().max() < 2e-3
    zero = fit.lloyd_max(blocks, 8, iters=60, zero=True)
    assert zero[0] == 0 and fit.snr_db(blocks, zero) < fit.snr_db(blocks, levels)
