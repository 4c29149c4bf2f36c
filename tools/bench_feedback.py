"""What error feedback adds to a rank's codec work in a one-shot all-reduce, on one GPU.

    python tools/bench_feedback.py --out benchmarks/results/feedback_<device>_<date>.jsonl

Per message size (bf16 bytes of one `[rows, hidden]` partial sum) and codec, GPU time (CUDA-graph
replay, L2 flushed, as tools/bench_kernels.py) of one rank's local work without and with feedback:
* plain: encode the bf16 partial sum, decode_sum `--sources` payloads;
* feedback: add the float32 debt, encode the float32 sum, decode the own payload, settle the new
  debt, decode_sum the same payloads (the unfused steps, as post-norm feedback and two-shot take);
* fused: `ops.encode_feedback` (send, encode and settle in one kernel, as pre-norm feedback in a
  one-shot all-reduce takes), decode_sum the same payloads;
* two-shot, plain and fused: encode (or `encode_feedback`) every row, then reduce this rank's
  chunk of the `--sources` payloads (decode_sum_encode; with feedback decode_sum, encode, and the
  chunk's requantization error taken off the debt) and decode the `--sources` reduced chunks;
* post_norm: the same through a Gemma-style post-norm (comm/feedback.py `PostNorm`: the send
  scaled by the gain and the own-RMS estimate and capped per block, the settle through the norm's
  Jacobian on the output rows).
The transfer between them is the same bytes either way and is not timed. `copy_ms` is a copy of
the bf16 message, for scale. One JSON record per line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import _inputs, _ms  # noqa: E402  (tools/ is not a package)


def main(argv: list[str] | None = None) -> int:
    from tpcomp_megatron import ops
    from tpcomp_megatron.codecs import REDUCED, make_codec
    from tpcomp_megatron.comm.feedback import ErrorFeedback, PostNorm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codecs", nargs="+", default=["fp4_e2m1/b32/e6m2", "fp6_e2m3/b32/e8m0"])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--out")
    ap.add_argument("--git", default=os.environ.get("GIT_COMMIT", "unknown"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_feedback needs a CUDA GPU")
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "git": a.git,
            "command": " ".join(shlex.quote(x) for x in ["tools/bench_feedback.py"] + (argv or sys.argv[1:])),
            "hidden": a.hidden, "sources": a.sources}
    records = []
    for spec in a.codecs:
        codec = make_codec(spec)
        for mb in a.sizes_mb:
            rows = mb * 2**20 // (2 * a.hidden)
            (x,) = _inputs(rows, a.hidden, 1, seed=mb)
            parts = _inputs(rows, a.hidden, a.sources, 7)
            payloads = torch.stack([ops.encode(codec, p, source=r) for r, p in enumerate(parts)])
            fb = ErrorFeedback(a.sources)
            # Every timed call starts from this debt: the graph reads a tensor that stays alive
            # (a debt left by the previous call is freed when it is replaced: replays would read it).
            debt0 = (x.float() * 0.05).contiguous()
            norm_module = torch.nn.RMSNorm(a.hidden, eps=1e-6).cuda()
            with torch.no_grad():
                norm_module.weight.normal_().exp_()
            norm = PostNorm.probe(norm_module, a.hidden)
            copy_dst = torch.empty_like(x)

            def plain():
                ops.encode(codec, x, source=0)
                ops.decode_sum(codec, payloads, a.hidden, sources=range(a.sources), dtype=x.dtype)

            def feedback(post_norm=None):  # the library's own steps, as CompressedComm takes them
                fb.debt = debt0
                send = fb.to_send(x, post_norm)
                own = ops.decode_each(codec, ops.encode(codec, send, source=0).unsqueeze(0), a.hidden, sources=[0],
                                      dtype=torch.float32)
                out = ops.decode_sum(codec, payloads, a.hidden, sources=range(a.sources), dtype=x.dtype)
                fb.settle(send, own, out)

            debt = debt0.clone()

            def fused():  # each call leaves the next one a debt of the same size (a rounding error)
                ops.encode_feedback(codec, x, debt, source=0)
                ops.decode_sum(codec, payloads, a.hidden, sources=range(a.sources), dtype=x.dtype)

            chunk = rows // a.sources  # two-shot: this rank reduces one chunk of every source's rows
            chunks = payloads[:, :chunk].contiguous()

            def two_shot_plain():
                ops.encode(codec, x, source=0)
                ops.decode_sum_encode(codec, chunks, a.hidden, sources=range(a.sources), out_source=REDUCED)
                ops.decode_each(codec, chunks, a.hidden, sources=[REDUCED] * a.sources, dtype=x.dtype)

            def two_shot_fused():  # as CompressedComm._two_shot with a debt
                ops.encode_feedback(codec, x, debt, source=0)
                summed = ops.decode_sum(codec, chunks, a.hidden, sources=range(a.sources), dtype=torch.float32)
                reduced = ops.encode(codec, summed, source=REDUCED)
                debt[:chunk] -= ops.decode_each(codec, reduced.unsqueeze(0), a.hidden, sources=[REDUCED],
                                                dtype=torch.float32) - summed
                ops.decode_each(codec, chunks, a.hidden, sources=[REDUCED] * a.sources, dtype=x.dtype)

            ms_two_plain, ms_two_fused = _ms(two_shot_plain), _ms(two_shot_fused)
            ms_plain, ms_fb, ms_copy = _ms(plain), _ms(feedback), _ms(lambda: copy_dst.copy_(x))
            ms_fused = _ms(fused)
            ms_post = _ms(lambda: feedback(norm))
            rec = {"codec": spec, "message_mb": mb, "plain_ms": round(ms_plain, 5), "feedback_ms": round(ms_fb, 5),
                   "feedback_over_plain": round(ms_fb / ms_plain, 3),
                   "fused_ms": round(ms_fused, 5), "fused_over_plain": round(ms_fused / ms_plain, 3),
                   "two_shot_plain_ms": round(ms_two_plain, 5), "two_shot_fused_ms": round(ms_two_fused, 5),
                   "two_shot_fused_over_plain": round(ms_two_fused / ms_two_plain, 3), "post_norm_ms": round(ms_post, 5),
                   "post_norm_over_plain": round(ms_post / ms_plain, 3), "copy_ms": round(ms_copy, 5), **meta}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
