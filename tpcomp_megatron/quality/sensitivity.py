"""Per-layer sensitivity of the compressed reductions, and mixed plans built from it.

`layer_sensitivity` compresses one row-parallel layer at a time (every other reduction exact) at
TP=N and scores each layer by the mean KL of the model's next-token distribution against the
uncompressed model. Run it on calibration text, never on the evaluation text. Where a few layers
dominate (in SmolLM2-135M at TP=8 with FP4, the first layers' reductions and one middle MLP), a
plan that sends those layers with a wider codec and all others with the narrow one costs a few
tenths of a bit per value on average (`mixed_codecs`, `plan_bits`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..codecs.base import Codec
from .metrics import Totals, add_compared, add_reference
from .simtp import SimulatedTP
from .text import TokenWindows


def compare(model, sim: SimulatedTP, windows: TokenWindows, *, tp: int,
            plans: Sequence[Mapping[str, Codec | None]]) -> tuple[Totals, list[Totals]]:
    """(baseline totals, totals of each plan) over every window; a plan maps every layer to a
    codec or to None (exact)."""
    base, totals = Totals(), [Totals() for _ in plans]
    with torch.no_grad():
        for i in range(windows.inputs.shape[0]):
            x, targets = windows.inputs[i:i + 1], windows.targets(i)
            ref = windows.scored_logits(model(x).logits[0])
            add_reference(base, ref, targets)
            for plan, tot in zip(plans, totals):
                with sim.session(tp=tp, codecs=plan):
                    add_compared(tot, windows.scored_logits(model(x).logits[0]), ref, targets)
    return base, totals


def layer_sensitivity(model, sim: SimulatedTP, windows: TokenWindows, *, tp: int, codec: Codec,
                      log: Callable[[str], None] = lambda s: None) -> dict[str, float]:
    """Layer name -> mean KL (nats) with only that layer's reduction compressed by `codec`."""
    out = {}
    for name in sim.layers:
        _, (tot,) = compare(model, sim, windows, tp=tp, plans=[{n: codec if n == name else None for n in sim.layers}])
        out[name] = tot.mean_kl
        log(f"{name}: KL {out[name]:.5f}")
    return out


def most_sensitive(sensitivity: Mapping[str, float], k: int) -> list[str]:
    """The k layers of largest KL (ties: layer order)."""
    if not 0 <= k <= len(sensitivity):
        raise ValueError(f"cannot promote {k} of {len(sensitivity)} layers")
    order = sorted(sensitivity, key=lambda n: -sensitivity[n])  # stable: equal KL keeps layer order
    return order[:k]


def mixed_codecs(sensitivity: Mapping[str, float], low: Codec, high: Codec, k: int) -> dict[str, Codec]:
    """`high` on the k most sensitive layers, `low` on the others."""
    top = set(most_sensitive(sensitivity, k))
    return {n: high if n in top else low for n in sensitivity}


def plan_bits(plan: Mapping[str, Codec], hidden: int) -> float:
    """Mean bits per value over the plan's layers (every reduction carries `hidden` values per token)."""
    if not plan:
        raise ValueError("empty plan")
    return sum(c.bits_per_value(hidden) for c in plan.values()) / len(plan)
