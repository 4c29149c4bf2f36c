"""`tpcomp-tune`: measure on the user's machine which collective is fastest at each message size.

The measurement itself is the gate's (`tpcomp_megatron/comm/gate/`: `config.py` what to measure,
`measure.py` the timing, `table.py` the table it writes and the cache the runtime reads); this
package is the tool around it: `cli.py` (the console script, its watchdog `watchdog.py`) and
`report.py` (readable table, plot). The runtime never imports it.
"""

from __future__ import annotations

from typing import Callable

from ..comm import CompressedComm
from ..comm.gate.config import DEFAULT_CODECS, DEFAULT_TOKENS, TuneConfig
from ..comm.gate.measure import TuneResult
from ..comm.gate.measure import tune as _measure


def tune(cfg: TuneConfig, group=None, *, progress: Callable[[str], None] | None = None) -> TuneResult:
    """Measure every path of `cfg` over `group` (default: the world) through the compressed
    collectives (`comm.CompressedComm`); collective: every rank calls it with the same `cfg`."""
    return _measure(cfg, group, collectives=CompressedComm, progress=progress)


__all__ = ["DEFAULT_CODECS", "DEFAULT_TOKENS", "TuneConfig", "TuneResult", "tune"]
