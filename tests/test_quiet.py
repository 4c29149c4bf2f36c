"""Quiet by default: the named noise is hidden inside the block, nothing else is, and the filters
are restored after it."""

import warnings

from tpcomp_megatron.quiet import NOISE, quiet_warnings


def _warn_from(module: str, message: str, category=UserWarning) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_warnings():
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
    return [str(w.message) for w in seen]


def test_named_noise_is_hidden_and_the_rest_shows():
    noise = NOISE[0]
    msg = noise.message + ". Falling back to local implementations"
    assert _warn_from("megatron.core.optimizer", msg, noise.category) == []
    assert _warn_from("tpcomp_megatron.comm", msg, noise.category) == [msg]  # another module: shown
    assert _warn_from("megatron.core.optimizer", "a new warning", noise.category) == ["a new warning"]


def test_filters_are_restored_and_verbose_changes_nothing():
    before = list(warnings.filters)
    with quiet_warnings():
        assert len(warnings.filters) == len(before) + len(NOISE)
    assert warnings.filters == before
    with quiet_warnings(enabled=False):
        assert warnings.filters == before
