"""The CPU adapter: what it replaces, that everything comes back, and that it never runs on GPU.

The adapter's effect on real models (GPTModel forward with the default causal mask, sequence
parallelism, dist_checkpointing save/load, TP=1/2/4) is exercised by tests/test_convert_e2e.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import megatron.core.fusions.fused_softmax as fused_softmax
import megatron.core.tensor_parallel.random as mrandom
from tpcomp_megatron.megatron.cpu import (
    CpuRNGStatesTracker,
    cpu_megatron,
    cpu_megatron_active,
    megatron_device_context,
)


def _state():
    return (
        torch.cuda.current_device,
        torch.cuda.synchronize,
        mrandom._CUDA_RNG_STATE_TRACKER,
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        fused_softmax.get_default_causal_mask,
    )


def _same(a, b) -> bool:
    return all(x is y for x, y in zip(a, b, strict=True))


def test_patches_inside_and_restores_after():
    before = _state()
    with cpu_megatron() as tracker:
        assert cpu_megatron_active()
        assert torch.cuda.current_device() == torch.device("cpu")
        torch.cuda.synchronize()  # a no-op instead of "Torch not compiled with CUDA"
        assert mrandom.get_cuda_rng_tracker() is tracker
        mask = fused_softmax.get_default_causal_mask(3)
        assert mask.device.type == "cpu" and mask.tolist() == [
            [False, True, True],
            [False, False, True],
            [False, False, False],
        ]
    assert _same(_state(), before) and not cpu_megatron_active()


def test_restores_after_an_exception_and_nests():
    before = _state()
    with pytest.raises(KeyError):
        with cpu_megatron() as outer:
            with cpu_megatron() as inner:
                assert inner is outer  # the inner block reuses the outer patch
            assert cpu_megatron_active()  # ...and undoing nothing when it exits
            raise KeyError("boom")
    assert _same(_state(), before)


def test_refuses_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = _state()
    with pytest.raises(RuntimeError, match="on a GPU run Megatron as it is"):
        with cpu_megatron():
            pass
    assert _same(_state(), before)
    assert isinstance(megatron_device_context("cuda"), contextlib.nullcontext)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        megatron_device_context("meta")


def test_model_parallel_seed_and_fork_behave_like_cuda():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    with cpu_megatron() as tracker:
        # tp_rank etc. given, so no parallel state is needed; Megatron calls our tracker's add().
        model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
        assert set(tracker.get_states()) >= {"model-parallel-rng", "data-parallel-rng"}
        outer = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
        with tracker.fork():
            b = torch.rand(4)
        assert not torch.equal(a, b)  # a forked stream continues where it stopped
        again = CpuRNGStatesTracker()
        again.add("model-parallel-rng", 5 + 2718)
        with again.fork():
            assert torch.equal(torch.rand(4), a)  # same seed, same numbers
        with pytest.raises(RuntimeError, match="model_parallel_cuda_manual_seed"):
            with CpuRNGStatesTracker().fork():
                pass
        with pytest.raises(ValueError, match="already tracked"):
            again.add("other", 5 + 2718)
    assert not parallel_state.model_parallel_is_initialized()
