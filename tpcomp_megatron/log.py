"""The project's warnings that a run repeats (every layer, every call): said once per process."""

from __future__ import annotations

import logging

_SAID: set = set()


def log_once(message: str) -> None:
    """`message` as a warning of the "tpcomp_megatron" logger, the first time it is given."""
    if message not in _SAID:
        _SAID.add(message)
        logging.getLogger("tpcomp_megatron").warning(message)
