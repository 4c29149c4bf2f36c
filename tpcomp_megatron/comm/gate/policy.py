"""The gate's per-call answer: whether a collective is compressed, and if not, why.

`GatePolicy` holds what a run decided once (`resolve.py`): link class, transport, algorithm, and
one of the three sources of the size decision, in this order: an explicit size override
(`min_bytes`), a measured table (`table.py`: compressed exactly where compression was measured
faster on this machine), or the seed thresholds (`seed.py`, scaled by the codec's width and
kernel cost). `ineligible` is the one function the collectives call: it gives the reason a call
goes exact (one string), or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...codecs.base import SUPPORTED_DTYPES, Codec
from .links import LINK_BYTES_PER_S, LINKS, detect_link
from .seed import HOST_EXTRA_US, NEVER, SEED_THRESHOLDS
from .table import GateTable, TableKey, path_name

ALGORITHMS = ("auto", "one_shot", "two_shot")
TRANSPORTS = ("auto", "nccl", "symm_mem")

@dataclass(frozen=True, kw_only=True)
class GatePolicy:
    """How the compressed collectives decide, per call, whether and how to compress."""

    algorithm: str = "auto"
    """'auto' (one-shot for world size <= 3, two-shot above), 'one_shot' or 'two_shot'."""
    link: str = "auto"
    """Link class for the threshold table; 'auto' detects it once."""
    min_bytes: int | None = None
    """Override of the table: compress messages of at least this many bytes (bf16). 0: always."""
    transport: str = "auto"
    """How one-shot payloads travel: 'nccl' (all-gather), 'symm_mem' (peer reads over NVLink
    from symmetric memory), or 'auto' (symm_mem on NVLink with CUDA, else nccl)."""
    thresholds: dict = field(default_factory=lambda: dict(SEED_THRESHOLDS))
    table: GateTable | None = None
    """A table measured on this machine (`tpcomp-tune`): all-reduces of the paths it measured are
    compressed where it measured compression faster, instead of by the thresholds (`min_bytes`
    still overrides both).
    A table measured under another key is refused by `table_refusal` / `check_group`."""

    def __post_init__(self) -> None:
        if self.table is not None and not isinstance(self.table, GateTable):
            raise ValueError(f"table must be a GateTable (GateTable.load(path)), got {type(self.table).__name__}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; valid: {list(ALGORITHMS)}")
        if self.link != "auto" and self.link not in LINKS:
            raise ValueError(f"unknown link class {self.link!r}; valid: 'auto', {list(LINKS)}")
        if self.min_bytes is not None and self.min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {self.min_bytes}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r}; valid: {list(TRANSPORTS)}")
        if self.link == "auto":
            object.__setattr__(self, "link", detect_link())
        if self.transport == "auto":
            object.__setattr__(self, "transport", "symm_mem" if self.link == "nvlink" else "nccl")

    def describe(self) -> str:
        """Canonical text of every setting that decides which collective a rank calls (the link
        class as resolved on this rank, transport, algorithm, size override, threshold table and
        host costs): ranks whose texts differ would post different collectives and hang, so it is
        part of the cross-rank configuration check."""
        table = ",".join(f"{link}/{world}:{b}" for (link, world), b in sorted(self.thresholds.items()))
        host = ",".join(f"{a}:{us}" for a, us in sorted(HOST_EXTRA_US.items()))
        measured = self.table.digest if self.table is not None else "none"
        return (f"link={self.link} transport={self.transport} algorithm={self.algorithm} "
                f"min_bytes={self.min_bytes} thresholds=[{table}] host_us=[{host}] table={measured}")

    def table_refusal(self, group) -> str | None:
        """Why the measured table cannot serve `group` (another device, world size, link or
        torch / NCCL version, table format: the message names the fields), or None."""
        if self.table is None:
            return None
        import torch.distributed as dist

        run = TableKey.current(dist.get_world_size(group), self.link, dist.get_backend(group))
        return self.table.refusal(run)

    def check_group(self, group) -> None:
        """Raise ValueError where the measured table does not match `group`'s run (`table_refusal`)."""
        why = self.table_refusal(group)
        if why:
            raise ValueError(why)

    def table_path(self, codec: Codec, algorithm: str) -> str | None:
        """The measured table's name of this all-reduce path (one-shot payloads travel by the
        policy's transport, two-shot ones by NCCL), or None where the table did not measure it."""
        if self.table is None:
            return None
        transport = self.transport if algorithm == "one_shot" else "nccl"
        path = path_name(str(codec.spec), algorithm, transport)
        return path if self.table.measures(path) else None

    def threshold(self, world_size: int, codec: Codec, hidden: int, extra_cost: float = 1.0,
                  algorithm: str = "one_shot") -> int:
        """Smallest message (bf16 bytes) worth compressing with `codec`; `extra_cost` multiplies
        the codec's kernel cost (error feedback's own work, `feedback.feedback_cost`). Never below
        the size whose link time saved pays the host time the compressed call adds (`host_floor`)."""
        if self.min_bytes is not None:
            return self.min_bytes
        base = self.thresholds.get((self.link, world_size))
        if base is None:  # unmeasured world size: nearest measured one below, else never
            known = [w for (link, w) in self.thresholds if link == self.link and w <= world_size]
            base = self.thresholds[(self.link, max(known))] if known else NEVER
        # Fewer bytes saved per message, or costlier kernels -> a larger message is needed to pay
        # for the kernels. Over NVLink a codec whose kernels cost more than the block codec's never
        # pays: the link moves the bytes faster than those kernels run (codec.kernel_cost).
        cost = codec.kernel_cost * extra_cost
        if cost > 1.0 and self.link == "nvlink":
            return NEVER
        saving_4bit = 1 - 4.25 / 16
        saving = max(1 - codec.bits_per_value(hidden) / 16, 1e-3)
        return max(int(base * saving_4bit / saving * cost), self.host_floor(algorithm, saving))

    def host_floor(self, algorithm: str, saving: float) -> int:
        """The bf16 message size whose link time saved (a fraction `saving` of its bytes, at the
        link class's all-reduce rate) equals the host time a compressed call adds."""
        host_s = HOST_EXTRA_US.get(algorithm, max(HOST_EXTRA_US.values())) * 1e-6
        return int(host_s * LINK_BYTES_PER_S.get(self.link, min(LINK_BYTES_PER_S.values())) / saving)

    def choose_algorithm(self, world_size: int) -> str:
        if self.algorithm != "auto":
            return self.algorithm
        # one-shot sends (N-1) payloads per rank, two-shot 2(N-1)/N: two-shot wins from N = 4 on.
        return "one_shot" if world_size <= 3 else "two_shot"


def ineligible(x: torch.Tensor, codec: Codec, world_size: int, policy: GatePolicy, *,
               rows_divisible: bool = False, extra_cost: float = 1.0, algorithm: str = "one_shot",
               op: str = "all_reduce") -> str | None:
    """Why `x` must take the exact collective, or None when it can be compressed (`extra_cost`,
    `algorithm`: see `GatePolicy.threshold`). A pure function of its arguments (the policy is
    frozen): callers cache its answer per shape, dtype and codec. All-reduces (`op`) follow the
    policy's measured table where it measured their path; the sequence-parallel collectives and
    unmeasured codecs (e.g. calibrated ones), the thresholds."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype}"
    if x.dim() == 0 or x.numel() == 0:
        return "empty or scalar tensor"
    hidden = x.shape[-1]
    why = codec.ineligible(hidden)
    if why:
        return why
    if rows_divisible and x.shape[0] % world_size:
        return f"first dimension {x.shape[0]} not divisible by world size {world_size}"
    path = policy.table_path(codec, algorithm) if policy.min_bytes is None and op == "all_reduce" else None
    if path is not None:
        return policy.table.why_exact(path, x.numel() * 2, extra_cost)
    if x.numel() * 2 < policy.threshold(world_size, codec, hidden, extra_cost, algorithm):
        return "below size threshold"
    return None
