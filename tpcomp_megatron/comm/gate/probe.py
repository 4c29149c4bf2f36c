"""Probes at apply time: where no measured table serves a run, a few timed collectives decide.

The gate's resolution (`resolve.py`) calls `probe_table` when it finds no table for this machine
(no `--tp-comm-gate-table`, nothing in the cache) and probing is asked for or the default: a short
`tune` over the real group, at a few message sizes of the model's hidden size, of the exact
all-reduce and the configured codecs' paths, eager only. Every rank gets the slowest rank's times
(the tune's MAX all-reduce), so every rank builds the same table and the gate decides the same
everywhere. Conservative when unsure: few samples, so a path must be measured `PROBE_MARGIN`
faster (not the tune's 5%); below the smallest probed size, between sizes where either neighbour
lost, and for codecs not probed (calibrated ones) the gate stays with the exact path or the seed
thresholds. The table lives in memory for this run;
`tpcomp-tune` measures more (every size, graph replay) and is cached.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...codecs import make_codec, needs_calibration, parse_codec_spec
from .config import TuneConfig
from .measure import Collectives, tune
from .table import GateTable

PROBE_TOKENS = (16, 256, 2048, 8192)
"""Message rows probed: decode-sized, short and long prefill chunks."""
PROBE_MARGIN = 0.2
"""How much faster a compressed path must be measured, with a probe's few samples."""
PROBE_ITERS, PROBE_REPEATS = 5, 3
"""Calls per timed sample, samples per path and size (the median counts)."""


def probe_codecs(specs: Sequence, hidden: int) -> tuple[str, ...]:
    """The codec specs a probe can time: uncalibrated, and able to compress rows of `hidden`."""
    out = []
    for spec in specs:
        spec = parse_codec_spec(str(spec)) if spec is not None else None
        if spec is None or needs_calibration(spec) or make_codec(spec).ineligible(hidden):
            continue
        out.append(str(spec))
    return tuple(dict.fromkeys(out))


def probe_table(group, *, hidden: int, codecs: Sequence[str], algorithm: str, link: str,
                collectives: Collectives) -> GateTable:
    """A measured table from a few collectives over `group`, timed through `collectives`
    (`measure.tune`; collective: every rank calls it with the same arguments)."""
    cfg = TuneConfig(hidden=hidden, tokens=PROBE_TOKENS, codecs=tuple(codecs), algorithms=(algorithm,),
                     link=link, exact_symm=False, graph=False, warmup=2, iters=PROBE_ITERS, repeats=PROBE_REPEATS,
                     margin=PROBE_MARGIN)
    table = tune(cfg, group, collectives=collectives).table
    table.meta["source"] = "probe at apply_tp_compression"
    return table
