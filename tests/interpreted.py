"""Triton's CPU interpreter for the kernel tests (test_kernels.py, test_kernel_plans.py).

TRITON_INTERPRET=1 must be set when the kernels are defined (triton.jit reads it), so this module
sets it around its own import of `tpcomp_megatron.kernels` and restores it right after: other test
modules see the environment unchanged. If the kernels were already imported compiled (a GPU run
of the whole suite), the modules importing this one are skipped: tests/gpu/ checks them there.

Tolerance: none. Every payload byte and every output bit must match (NaN matches NaN). The
interpreter's own bf16 conversions are not bit-exact (they truncate, and mangle subnormals); the
kernels never use them (bf16 is converted through its bits, see tpcomp_megatron/kernels/numerics.py), so no
1-ulp allowance is needed.
"""

from __future__ import annotations

import importlib
import os
import warnings
import zlib

import pytest
import torch

pytest.importorskip("triton")


def _import_interpreted_kernels():
    # triton itself is imported first, compiled as everywhere else in the process; only our
    # kernels are defined under the interpreter (they call no @jit function of triton's library).
    import triton  # noqa: F401
    import triton.experimental.gluon  # noqa: F401  (imported lazily at the first launch otherwise)

    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module("tpcomp_megatron.kernels")
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


K = _import_interpreted_kernels()
if not K.INTERPRETED:
    pytest.skip("tpcomp_megatron.kernels was imported compiled before this module (run it in its own "
                "process; tests/gpu/ covers the compiled kernels)", allow_module_level=True)


@pytest.fixture(autouse=True)
def quiet_numpy():
    # The interpreter runs fp32 arithmetic in numpy, which warns on inf * 0 and overflow; those
    # are intended (NaN/Inf blocks) and the results are checked bit for bit.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def gen_for(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))

