"""Compressed collectives: who sends what, when compression is used, and what it saved."""

from .collectives import CollectiveError, CompressedComm
from .consistency import check_same_config
from .gate import ALGORITHMS, DEFAULT_THRESHOLDS, LINKS, TRANSPORTS, GatePolicy, detect_link, ineligible
from .stats import CommStats

__all__ = [
    "ALGORITHMS", "DEFAULT_THRESHOLDS", "LINKS", "TRANSPORTS", "CollectiveError", "CommStats", "CompressedComm",
    "GatePolicy", "check_same_config", "detect_link", "ineligible",
]
