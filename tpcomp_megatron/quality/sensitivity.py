"""Per-layer sensitivity of the compressed reductions, and mixed plans built from it.

`layer_sensitivity` compresses one row-parallel layer at a time (every other reduction exact) at
TP=N and scores each layer by the mean KL of the model's next-token distribution against the
uncompressed model. Run it on calibration text, never on the evaluation text. Where a few layers
dominate (in SmolLM2-135M at TP=8 with FP4: the last MLP, the first two layers and one middle MLP), a
plan that sends those layers with a wider codec and all others with the narrow one costs a few
tenths of a bit per value on average (`mixed_codecs`, `plan_bits`). Where sensitivity is spread
more evenly (Gemma 3 270M), `allocate` gives every layer its own codec among several widths
(3, 4 and 5 bits): the least summed KL within a bits budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from ..codecs.base import Codec
from ..inference.finite import NonFiniteLogits
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
    for name, tot in zip(names, totals):  # a NaN KL would rank anywhere: no ranking at all
        if tot.nonfinite:
            raise NonFiniteLogits(f"compressing only {name} (codec {codecs[name].spec}) gives NaN or inf logits, "
                                  f"at {tot.nonfinite}; no ranking can be made with this codec")
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


BITS_UNIT = 10_000
"""`allocate` counts bits per value in units of 1 / BITS_UNIT (every codec's cost rounded up)."""


def allocate(sensitivity: Mapping[str, Mapping[str, float]], bits: Mapping[str, float],
             budget: float) -> dict[str, str]:
    """Each layer's codec such that the summed single-layer KL is least and the mean bits per value
    stay within `budget`: a multiple-choice knapsack, solved exactly by dynamic programming over
    the layers. `sensitivity` maps each candidate codec (spec) to its `layer_sensitivity`, `bits`
    each codec to its bits per value (every reduction carries the same number of values, so the
    plan's bits are the mean over layers). Costs are rounded up to 1 / BITS_UNIT of a bit, so a
    plan never exceeds the budget. Summing single-layer KLs assumes the layers' errors add: for
    Gemma 3 270M at TP=8 the sum is within 10% of the all-layer KL. Returns layer -> codec spec."""
    import numpy as np

    specs = list(sensitivity)
    if not specs:
        raise ValueError("allocate: no candidate codecs")
    layers = list(sensitivity[specs[0]])
    for s in specs:
        if sorted(sensitivity[s]) != sorted(layers):
            raise ValueError(f"allocate: codec {s} was measured on other layers than {specs[0]}")
        if s not in bits:
            raise ValueError(f"allocate: no bits per value for codec {s}")
    cost = [math.ceil(bits[s] * BITS_UNIT - 1e-6) for s in specs]
    cap = math.floor(budget * len(layers) * BITS_UNIT + 1e-6)
    if min(cost) * len(layers) > cap:
        raise ValueError(f"allocate: even every layer on the cheapest codec ({min(bits.values()):.4f} bits) "
                         f"is over the budget of {budget} bits per value")
    unit = math.gcd(cap, *cost)
    cost, cap = [c // unit for c in cost], cap // unit
    best = np.zeros(cap + 1)  # least summed KL of the layers so far within c units
    choice = np.zeros((len(layers), cap + 1), dtype=np.int16)
    for i, layer in enumerate(layers):
        new = np.full(cap + 1, np.inf)
        for j, (s, c) in enumerate(zip(specs, cost)):
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[:cap + 1 - c] + sensitivity[s][layer]
            better = cand < new
            new[better], choice[i, better] = cand[better], j
        best = new
    plan, c = {}, cap
    for i in reversed(range(len(layers))):
        j = int(choice[i, c])
        plan[layers[i]] = specs[j]
        c -= cost[j]
    return {n: plan[n] for n in layers}
