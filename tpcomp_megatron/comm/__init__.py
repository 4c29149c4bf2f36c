"""Compressed collectives: who sends what, when compression is used, and what it saved."""

from .collectives import CollectiveError, CompressedComm
from .consistency import check_same_config
from .gate import ALGORITHMS, LINKS, SEED_THRESHOLDS, TRANSPORTS, GatePolicy, detect_link, ineligible
from .stats import CommStats

__all__ = [
    "ALGORITHMS", "LINKS", "SEED_THRESHOLDS", "TRANSPORTS", "CollectiveError", "CommStats", "CompressedComm",
    "GatePolicy", "check_same_config", "detect_link", "ineligible",
]
