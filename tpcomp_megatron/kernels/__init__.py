"""Fused Triton kernels of the codecs.

The operations `tpcomp_megatron.ops` dispatches CUDA tensors to, bit-exact with the codecs'
PyTorch reference (`tpcomp_megatron.codecs`):

* `encode(codec, x, *, source)`: quantize and pack in one pass.
* `decode_sum(codec, payloads, hidden, *, sources, dtype)`: dequantize and sum n payloads.
* `decode_sum_list(codec, [payload, ...], hidden, *, sources, dtype)`: `decode_sum` of separate
  buffers (peers' symmetric-memory slots) read where they lie.
* `decode_sum_encode(codec, payloads, hidden, *, sources, out_source)`: the two-shot middle,
  dequantize, sum and requantize without leaving registers.
* `decode_each(codec, payloads, hidden, *, sources, dtype)`: dequantize n payloads side by side.
* `encode_feedback(codec, x, debt, *, source)`: encode x + debt and update the error-feedback
  debt in the same pass (block and low-rank codecs).
* `prepare_encode` / `prepare_decode`: the validated launch plan of one of these for tensors of
  one row bucket, to call again and again (the collectives' kits, `comm/engine.py`).

One route for eager calls and torch.compile: every call runs its codec's plan (`plans.py`),
eager with prepared launches, traced with the custom ops `torch.ops.tpcomp.*` whose
implementations are those same launches (`steps.py`).

Files by layer, each importing only those before it: `numerics.py` (bit-exact rounding and
scales), `pack.py` (codes and scales <-> bytes), `tables.py` (per-codec device tables),
`launch.py` (tiles, `Launcher`, the fast launch behind `fast_launch_supported()`), `block.py`
(block, hybrid and low-rank kernels) and `outlier.py` (static outlier codec kernels) with their
launchers, `checks.py` (validation), `steps.py` (kernel steps: prepared launches, and the custom
ops), `plans.py` (per-codec plans), `api.py` (the validated public functions). README.md has the
details. Built while TRITON_INTERPRET=1 is set, the kernels run on CPU tensors in Triton's
interpreter (that is how CI tests them).
"""

from .api import (FEEDBACK_CODECS, INTERPRETED, SUPPORTED_CODECS, decode_each, decode_sum, decode_sum_encode,
                  decode_sum_list, encode, encode_feedback, prepare_decode, prepare_encode)

__all__ = ["FEEDBACK_CODECS", "INTERPRETED", "SUPPORTED_CODECS", "decode_each", "decode_sum", "decode_sum_encode",
           "decode_sum_list", "encode", "encode_feedback", "prepare_decode", "prepare_encode"]
