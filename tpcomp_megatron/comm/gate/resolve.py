"""The gate's one resolution step: where a run's size decisions come from, in one stated order.

At `apply_tp_compression` (every rank alike) the size decision comes from the first of:

1. an explicit override: `min_bytes` (a size, no table read), a table named by path, or 'seed'
   (the seed thresholds);
2. the table measured on this machine (`tpcomp-tune`), cached under this run's key (`table.py`:
   device, world size, link, torch and NCCL versions, table format);
3. a probe: a few collectives timed over the group now (`probe.py`), where asked for, or by
   default on NCCL groups;
4. the seed thresholds (`seed.py`).

`resolve` is local (it reads files and detects the link, once; no collective) and returns a
`GateResolution`: the policy, one line naming the source, and why a named or cached table cannot
serve the run (refused, naming the fields). The ranks compare its `describe()` before `finish`
runs the probe, a collective. Per call, the policy's `ineligible` gives the one reason a
collective goes exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch.distributed as dist

from ...log import log_once
from .links import detect_link
from .measure import Collectives
from .policy import GatePolicy
from .probe import probe_codecs, probe_table
from .table import SEED, TableKey, choose_table


@dataclass(frozen=True)
class GateResolution:
    """What `resolve` found on this rank."""

    policy: GatePolicy
    source: str
    """Where the size decision comes from (one line, logged once)."""
    refusal: str | None
    """Why the named or cached table cannot serve this run (naming the fields), or None."""
    probes: bool
    """Whether `finish` times collectives over the group (no table, and a probe asked for or the default)."""

    def describe(self) -> str:
        """Part of the cross-rank check: ranks whose texts differ would decide differently, or one
        would probe (a collective) while its peers do not."""
        return f"gate: {self.policy.describe()} refused={self.refusal} probe={self.probes}"

    def finish(self, group, *, hidden: int | None, codecs: Sequence, collectives: Collectives) -> GatePolicy:
        """The policy, with a probed table where `probes` (collective: every rank, after the check);
        `codecs`: the run's codec specs (the uncalibrated ones are probed), `collectives`:
        `comm.CompressedComm`."""
        if self.refusal:
            raise ValueError(self.refusal)
        if not self.probes:
            if self.policy.min_bytes is None:  # (a size override consults no table)
                log_once(f"tpcomp-megatron gate: {self.source}")
            return self.policy
        specs = probe_codecs(codecs, hidden or 0)
        if not hidden or not specs:
            log_once(f"tpcomp-megatron gate: {self.source}")
            return self.policy
        table = probe_table(group, hidden=hidden, codecs=specs, link=self.policy.link, collectives=collectives,
                            algorithm=self.policy.choose_algorithm(dist.get_world_size(group)))
        log_once(f"tpcomp-megatron gate: probed {len(table.rows)} message sizes of hidden {hidden} over the group "
                  f"({table.digest}, {', '.join(specs)}); tpcomp-tune measures this machine in full")
        return dataclasses.replace(self.policy, table=table)


def resolve(group, *, algorithm: str = "auto", link: str = "auto", min_bytes: int | None = None,
            transport: str = "auto", table: str | None = None, probe: bool | None = None) -> GateResolution:
    """This rank's gate for `group` (see the module docstring for the order): `table` a path,
    'seed' or None (the cache); `probe` True / False / None (on NCCL groups only). Never raises for
    a table: a rank alone raising would leave its peers waiting in the configuration check, so a
    refusal is returned, and raised by `finish` after that check."""
    link = detect_link() if link == "auto" else link
    world, backend = dist.get_world_size(group), dist.get_backend(group)
    refusal = None
    try:
        found, source = choose_table(table, TableKey.current(world, link, backend))
    except (OSError, ValueError) as e:
        found, source, refusal = None, "", str(e)
    policy = GatePolicy(algorithm=algorithm, link=link, min_bytes=min_bytes, transport=transport, table=found)
    refusal = refusal or policy.table_refusal(group)
    probes = (found is None and min_bytes is None and table != SEED and world > 1
              and (probe is True or (probe is None and backend == "nccl")))
    return GateResolution(policy, source, refusal, probes)
