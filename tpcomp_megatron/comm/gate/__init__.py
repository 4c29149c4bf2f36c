"""The gate: whether each compressed collective pays, decided in one place.

* `links.py`: the link class (detected once), its speed, whether symmetric memory can serve it;
* `seed.py`: the seed thresholds and host costs, where nothing was measured;
* `table.py`: tables measured on a machine (`tpcomp-tune`), their key and cache;
* `config.py`, `measure.py`: what a measurement times and the timing itself (handed the
  collectives to time: the gate sits below them);
* `probe.py`: a short measurement at start-up where no table serves the run;
* `resolve.py`: the decision order, stated once (explicit override > measured table > probe >
  seed), run at `apply_tp_compression`;
* `policy.py`: `GatePolicy` and `ineligible`, the per-call answer (one reason a call goes exact).
"""

from .links import LINK_BYTES_PER_S, LINKS, detect_link, symm_mem_available
from .policy import ALGORITHMS, TRANSPORTS, GatePolicy, ineligible
from .seed import HOST_EXTRA_US, NEVER, SEED_THRESHOLDS

__all__ = ["ALGORITHMS", "HOST_EXTRA_US", "LINKS", "LINK_BYTES_PER_S", "NEVER", "SEED_THRESHOLDS", "TRANSPORTS",
           "GatePolicy", "detect_link", "ineligible", "symm_mem_available"]
