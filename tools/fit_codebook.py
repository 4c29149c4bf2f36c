"""Fit the codebook element formats (`LLOYD_LEVELS` in tpcomp_megatron/codecs/formats.py).

    tpcomp-calibrate --model gemma3-270m --tp 8 --text sotu-1901 --tokens 2048 --output cal_gemma3-270m.safetensors
    tpcomp-calibrate --model smollm2-135m --tp 8 --text sotu-1901 --tokens 2048 --output cal_smollm2-135m.safetensors
    python tools/fit_codebook.py --calibration cal_{model}.safetensors

Runs one window of the calibration text through each model at simulated TP (the row-parallel
partial sums real ranks form), and keeps every rank's partial sums of every layer, first row
(BOS) left out, twice: as they are and with their low-rank part removed (the calibration's
rank-4 directions, as `lowrank+.../r4` sends them). Each layer and rank is scaled to unit RMS,
cut into blocks of 32 and pooled (300,000 random blocks per set). Lloyd-Max iterations then fit
the magnitudes of a sign + magnitude codebook to what the codec quantizes: each value divided by
its block's E6M2 scale, which maps the block maximum to the top level. A level moves to the
centroid of its cell, each value weighted by its squared scale (the error the model sees is the
error times the scale), and the top level stays 1. Levels are rounded to multiples of 2**-12.

Fitted in this order with one seed: 8 levels (lloyd4), 8 levels with one of them held at zero
(shown for comparison: it spends a code on 0), 16 levels (lloyd5), 4 levels (lloyd3). With the
defaults this reproduces `LLOYD_LEVELS`; the last lines say whether it did. Prints each fit's
SNR on every set beside that of the float (integer) format of its width: INT3, FP4 E2M1, FP5 E2M2.
"""

from __future__ import annotations

import argparse
import sys

import torch

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
E2M2 = torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7]) / 7
INT3 = torch.tensor([0, 1, 2, 3]) / 3
REFERENCE = {4: ("INT3", INT3), 8: ("E2M1", E2M1), 16: ("E2M2", E2M2)}
"""The float (integer) format of the same width each fit is compared with."""
GRID = 4096
FITS = (("lloyd4", 8, False), ("lloyd4 with a zero level", 8, True), ("lloyd5", 16, False), ("lloyd3", 4, False))


def normalized_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """A rank's partial sums `[rows, hidden]` at unit RMS, as blocks `[n, block]` (all-zero
    blocks dropped: they carry nothing to fit)."""
    x = x.float()
    b = (x / x.pow(2).mean().sqrt().clamp_min(1e-30)).reshape(-1, block)
    return b[b.abs().amax(1) > 0]


def quantize(blocks: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(|value| / scale, the block's E6M2 scale, the nearest level's index) for `blocks` [n, B]
    and ascending magnitudes `levels` whose last is the top (ties go to the lower level)."""
    from tpcomp_megatron.codecs.block import e6m2_round, e6m2_value

    amax = blocks.abs().amax(1, keepdim=True)
    scale = e6m2_value(e6m2_round(amax * torch.tensor(1.0 / float(levels[-1]))))
    v = blocks.abs() * (1.0 / scale)
    return v, scale, torch.bucketize(v, (levels[1:] + levels[:-1]) / 2)


def snr_db(blocks: torch.Tensor, levels: torch.Tensor) -> float:
    v, scale, idx = quantize(blocks, levels)
    err = ((v - levels[idx]) * scale).pow(2).sum()
    return float(10 * torch.log10(blocks.pow(2).sum() / err))


def lloyd_max(blocks: torch.Tensor, n: int, *, iters: int = 80, sample: int = 400_000,
              zero: bool = False, start: torch.Tensor | None = None) -> torch.Tensor:
    """`n` ascending magnitudes (top 1.0; with `zero` the first held at 0) fitted on a random
    sample of `blocks` from `start` (default evenly spaced from 0.05): each step moves every
    level to its cell's scale-weighted centroid."""
    sub = blocks[torch.randperm(blocks.shape[0])[:sample]]
    levels = torch.linspace(0.05, 1, n) if start is None else start
    for _ in range(iters):
        v, scale, idx = quantize(sub, levels)
        w = scale.expand_as(v).pow(2)
        num = torch.zeros(n).index_add_(0, idx.flatten(), (v * w).flatten())
        den = torch.zeros(n).index_add_(0, idx.flatten(), w.flatten())
        new = num / den.clamp_min(1e-30)
        if zero:
            new[0] = 0
        levels = new / new[-1]  # the scale maps the block maximum to the top level
    return levels


def capture(model_name: str, tp: int, text: str, seq_len: int) -> dict[str, torch.Tensor]:
    """Every row-parallel layer's partial sums `[tp, rows, hidden]` for one window of `text`."""
    from tpcomp_megatron.quality.models import load_model
    from tpcomp_megatron.quality.simtp import SimulatedTP
    from tpcomp_megatron.quality.text import make_windows

    model, tok, _ = load_model(model_name)
    window = make_windows(tok, text, seq_len=seq_len, windows=1)
    sim = SimulatedTP(model)
    partials: dict[str, torch.Tensor] = {}
    with torch.no_grad(), sim.session(tp=tp, observer=lambda name, p: partials.__setitem__(name, p.detach().clone())):
        model(window.inputs[0:1])
    return partials


def model_sets(model_name: str, calibration: str, args) -> dict[str, torch.Tensor]:
    """The model's pooled blocks with ('<model> lowrank') and without ('<model>') their rank-4 part."""
    from tpcomp_megatron.calibration import load_calibration
    from tpcomp_megatron.codecs.lowrank import coordinates, lowrank_sum
    from tpcomp_megatron.quality.calib import layer_codecs

    partials = capture(model_name, args.tp, args.text, args.seq_len)
    codecs = layer_codecs("lowrank+fp4_e2m1/b32/e6m2/r4", list(partials), load_calibration(calibration))
    lowrank, plain = [], []
    for name, p in partials.items():
        for r, x in enumerate(p[:, 1:].float()):
            basis = codecs[name].basis(r, x.device)
            plain.append(x)
            lowrank.append(x - lowrank_sum(coordinates(x, basis)[None], basis[None]))
    return {f"{model_name} lowrank": torch.cat([normalized_blocks(x, args.block) for x in lowrank]),
            model_name: torch.cat([normalized_blocks(x, args.block) for x in plain])}


def main(argv: list[str] | None = None) -> int:
    from tpcomp_megatron.codecs.formats import LLOYD_LEVELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    ap.add_argument("--calibration", required=True,
                    help="calibration file at --tp per model ('{model}' is replaced by the model name)")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--text", default="sotu-1901")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--per-set", type=int, default=300_000, help="blocks drawn from each set into the pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    sets: dict[str, torch.Tensor] = {}
    for m in a.models:
        sets.update(model_sets(m, a.calibration.replace("{model}", m), a))
    torch.manual_seed(a.seed)
    pool = torch.cat([s[torch.randperm(s.shape[0])[:a.per_set]] for s in sets.values()])
    fitted = {}
    for name, n, zero in FITS:
        levels = torch.round(lloyd_max(pool, n, zero=zero) * GRID) / GRID
        fitted[name] = tuple(int(x) for x in (levels * GRID).tolist())
        print(f"{name}: levels x {GRID} = {fitted[name]}")
        ref_name, ref = REFERENCE[n]
        for set_name, blocks in sets.items():
            print(f"    {set_name:24s} {snr_db(blocks, levels):6.2f} dB  ({ref_name} "
                  f"{snr_db(blocks, ref):6.2f} dB)")
    for name in LLOYD_LEVELS:
        same = fitted[name] == LLOYD_LEVELS[name]
        print(f"{name}: {'reproduces' if same else 'differs from'} LLOYD_LEVELS[{name!r}] {LLOYD_LEVELS[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
