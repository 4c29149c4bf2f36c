"""Counters a user can read: what the compressed collectives sent, against what bf16 would have."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class CommStats:
    """Per-communicator counters; bytes are those each rank sends, by the algorithm's formula.

    `bytes_baseline` is what the exact collective in the input dtype (ring algorithms) would have
    sent for the same calls, so `bytes_baseline / bytes_sent` is the compression achieved.
    """

    calls_compressed: int = 0
    calls_fallback: int = 0
    bytes_sent: int = 0
    bytes_baseline: int = 0
    fallback_reasons: Counter = field(default_factory=Counter)

    def record_compressed(self, sent: int, baseline: int) -> None:
        self.calls_compressed += 1
        self.bytes_sent += sent
        self.bytes_baseline += baseline

    def record_fallback(self, reason: str, sent: int) -> None:
        self.calls_fallback += 1
        self.fallback_reasons[reason] += 1
        self.bytes_sent += sent
        self.bytes_baseline += sent

    @property
    def compression_ratio(self) -> float:
        return self.bytes_baseline / self.bytes_sent if self.bytes_sent else 1.0

    def reset(self) -> None:
        self.__init__()

    def summary(self) -> str:
        return (
            f"{self.calls_compressed} compressed / {self.calls_fallback} exact collectives; "
            f"sent {self.bytes_sent / 2**20:.2f} MiB vs {self.bytes_baseline / 2**20:.2f} MiB exact "
            f"({self.compression_ratio:.2f}x fewer bytes)"
        )
