"""Counters a user can read: what the compressed collectives sent, against what bf16 would have."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def _size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


@dataclass
class CommStats:
    """Per-communicator counters; bytes are those each rank sends, by the algorithm's formula.

    `bytes_baseline` is what the exact collective in the input dtype (ring algorithms) would have
    sent for the same calls, so `bytes_baseline / bytes_sent` is the compression achieved.

    Calls are also counted per size (the bytes the exact collective sends per rank: one integer
    key, so a replayed call pays a dict update and no formatting); `by_bucket()` and `summary()`
    group them into powers of two.
    """

    calls_compressed: int = 0
    calls_fallback: int = 0
    bytes_sent: int = 0
    bytes_baseline: int = 0
    fallback_reasons: Counter = field(default_factory=Counter)
    compressed_at: dict = field(default_factory=dict)
    """exact bytes per rank -> compressed calls."""
    fallback_at: dict = field(default_factory=dict)
    """(exact bytes per rank, reason) -> exact calls."""

    def record_compressed(self, sent: int, baseline: int) -> None:
        self.calls_compressed += 1
        self.bytes_sent += sent
        self.bytes_baseline += baseline
        at = self.compressed_at
        at[baseline] = at.get(baseline, 0) + 1

    def record_fallback(self, reason: str, sent: int) -> None:
        self.calls_fallback += 1
        self.fallback_reasons[reason] += 1
        self.bytes_sent += sent
        self.bytes_baseline += sent
        key = (sent, reason)
        self.fallback_at[key] = self.fallback_at.get(key, 0) + 1

    @property
    def compression_ratio(self) -> float:
        return self.bytes_baseline / self.bytes_sent if self.bytes_sent else 1.0

    def reset(self) -> None:
        self.__init__()

    def by_bucket(self) -> dict:
        """{bucket: {"compressed": calls, "exact": {reason: calls}}}; bucket k holds the calls whose
        exact collective sends [2^(k-1), 2^k) bytes per rank (an all-reduce of a bf16 message of B
        bytes sends B at world size 2, 2B(N-1)/N at N)."""
        out: dict = {}
        for nbytes, calls in self.compressed_at.items():
            b = out.setdefault(nbytes.bit_length(), {"compressed": 0, "exact": Counter()})
            b["compressed"] += calls
        for (nbytes, reason), calls in self.fallback_at.items():
            b = out.setdefault(nbytes.bit_length(), {"compressed": 0, "exact": Counter()})
            b["exact"][reason] += calls
        return dict(sorted(out.items()))

    def summary(self) -> str:
        lines = [
            f"{self.calls_compressed} compressed / {self.calls_fallback} exact collectives; "
            f"sent {self.bytes_sent / 2**20:.2f} MiB vs {self.bytes_baseline / 2**20:.2f} MiB exact "
            f"({self.compression_ratio:.2f}x fewer bytes)"
        ]
        buckets = self.by_bucket()
        if buckets:
            lines.append(f"  {'exact bytes/rank':22s} {'compressed':>10s} {'exact':>7s}  why exact")
        for k, b in buckets.items():
            label = f"[{_size(1 << (k - 1)) if k else '0 B'}, {_size(1 << k)})"
            why = "; ".join(f"{r} ({n})" for r, n in b["exact"].most_common())
            lines.append(f"  {label:22s} {b['compressed']:>10d} {sum(b['exact'].values()):>7d}  {why}".rstrip())
        return "\n".join(lines)
