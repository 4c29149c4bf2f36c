"""Per-layer sensitivity of the compressed reductions, and mixed plans built from it.

`layer_sensitivity` compresses one row-parallel layer at a time (every other reduction exact) at
TP=N and scores each layer by the mean KL of the model's next-token distribution against the
uncompressed model. Run it on calibration text, never on the evaluation text. Where a few layers
dominate (in SmolLM2-135M at TP=8 with FP4: the last MLP, the first two layers and one middle MLP), a
plan that sends those layers with a wider codec and all others with the narrow one costs a few
tenths of a bit per value on average (`mixed_codecs`, `plan_bits`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..codecs.base import Codec
from .simtp import SimulatedTP
from .sweep import Plan, compare
from .text import TokenWindows


def layer_sensitivity(model, sim: SimulatedTP, windows: TokenWindows, *, tp: int, codecs: Mapping[str, Codec],
                      feedback: bool = False, log: Callable[[str], None] = lambda s: None) -> dict[str, float]:
    """Layer name -> mean KL (nats) with only that layer's reduction compressed by its codec in
    `codecs` (with `feedback`, its error is carried into the next, exact, reduction and cancelled
    there). One window-major pass: each window's uncompressed logits are computed once for every
    layer."""
    names = list(sim.layers)
    plans = [Plan(tp, {n: codecs[name] if n == name else None for n in names}, feedback=feedback) for name in names]
    _, totals, _ = compare(model, sim, windows, plans, labels=names, log=log)
    out = {name: tot.mean_kl for name, tot in zip(names, totals)}
    for name, kl in out.items():
        log(f"{name}: KL {kl:.5f}")
    return out


def most_sensitive(sensitivity: Mapping[str, float], k: int) -> list[str]:
    """The k layers of largest KL (ties: layer order)."""
    if not 0 <= k <= len(sensitivity):
        raise ValueError(f"cannot promote {k} of {len(sensitivity)} layers")
    order = sorted(sensitivity, key=lambda n: -sensitivity[n])  # stable: equal KL keeps layer order
    return order[:k]


def mixed_codecs(sensitivity: Mapping[str, float], low: Mapping[str, Codec], high: Mapping[str, Codec],
                 k: int) -> dict[str, Codec]:
    """Each layer's `high` codec on the k most sensitive layers, its `low` codec on the others
    (codec maps by layer name: calibrated codecs differ from layer to layer)."""
    top = set(most_sensitive(sensitivity, k))
    return {n: high[n] if n in top else low[n] for n in sensitivity}


def plan_bits(plan: Mapping[str, Codec], hidden: int) -> float:
    """Mean bits per value over the plan's layers (every reduction carries `hidden` values per token)."""
    if not plan:
        raise ValueError("empty plan")
    return sum(c.bits_per_value(hidden) for c in plan.values()) / len(plan)


def budget_promotions(sensitivity: Mapping[str, float], low: Mapping[str, Codec], high: Mapping[str, Codec], hidden: int,
                      budget: float) -> int:
    """The largest k whose plan (`high` on the k most sensitive layers) averages <= `budget` bits
    per value; 0 if even the uniform `low` plan is over the budget (then nothing fits)."""
    k = len(sensitivity)
    while k > 0 and plan_bits(mixed_codecs(sensitivity, low, high, k), hidden) > budget + 1e-9:
        k -= 1
    return k
