"""The gate's seed: what it decides by where no measured table serves a run.

Compression pays only when the bytes saved take longer to send than the extra work takes; below a
message size (per link class, world size and codec width) the exact collective wins.
`SEED_THRESHOLDS` maps (link, world size) to the smallest bf16 message worth compressing with a
~4-bit codec (`policy.GatePolicy.threshold` scales it by the codec's saving and kernel cost), never
below the size whose link time saved pays the host time a compressed call adds (`HOST_EXTRA_US`).
Conservative on purpose: `tpcomp-tune` measures the real crossovers of a machine (`table.py`).
"""

from __future__ import annotations

NEVER = 1 << 62
"""A threshold no message reaches."""

SEED_THRESHOLDS: dict[tuple[str, int], int] = {
    ("nvlink", 2): 64 << 20,
    ("pcie_class", 2): 8 << 20,
    ("network_class", 2): 1 << 20,
    ("cpu", 2): 1 << 20,
}
"""(link, world_size) -> min bf16 bytes. Conservative (2026-11-23, no GPU measurement); a world
size not listed takes the nearest listed one below it."""

HOST_EXTRA_US = {"one_shot": 67.0, "two_shot": 130.0}
"""Host time one compressed all-reduce adds over the exact collective inside a real eager prefill,
per algorithm: one TP rank of a 10-layer Llama-2-13B (TP=2, one-shot) / 70B (TP=8, two-shot)
shape at 512 tokens, where the forward is host-bound, fp4_e2m1/b32/e6m2, H100, 2026-12-06, with
the collectives' set-up kits (comm/engine.py, then named replays): the larger of two runs, off and
on timed in pairs (tools/bench_prefill.py, benchmarks/results/host_overhead_replays_2026-12-06.md:
52-67 / 117-130 us; 106 / 209 before the replays). Such a prefill pays it in full, whatever the
link. Reduce-scatter and all-gather (one collective and two kernels each, like the one-shot) take
the one-shot figure."""
