"""`tpcomp-tune`: measure on the user's machine which collective is fastest at each message size.

Kept apart from the per-call runtime: the runtime only reads the table this writes
(`tpcomp_megatron/comm/table.py`). config (what to measure) -> measure (timing on the real group,
slowest rank decides) -> report (readable table, plot) -> cli (the console script).
"""

from .config import DEFAULT_CODECS, DEFAULT_TOKENS, TuneConfig
from .measure import TuneResult, tune

__all__ = ["DEFAULT_CODECS", "DEFAULT_TOKENS", "TuneConfig", "TuneResult", "tune"]
