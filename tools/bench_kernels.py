"""Achieved bandwidth of the fused codec kernels vs a device-to-device copy, in one run.

    python tools/bench_kernels.py --out benchmarks/results/kernels_<device>_<date>.jsonl
    python tools/bench_kernels.py --tune          # tile sweep of the main kernels (prints a table)

For each codec and message size (bf16 bytes of one `[rows, hidden]` partial sum, 1 MB..256 MB)
it times encode, decode_sum and decode_each of `--sources` payloads, and decode_sum_encode (the
two-shot middle), each as GPU time from CUDA-graph replay (L2 flushed before every call, host overhead
excluded; see `_ms`), next to `copy_` of the same bf16 message timed the same way. `eager_ms`
adds the wall time of one eager call (host overhead included). Bytes moved count each input read once and each output
written once; GB/s = 1e9 bytes per second; `fraction_of_copy` = kernel GB/s over copy GB/s at the
same message size. `fraction_of_copy_same_bytes` compares with a copy that moves as many bytes as
the kernel: below about 32 MB a copy's GB/s still grows with its size (launch and DRAM latency
are a large part of its time), so a kernel that writes 4x fewer bytes than it reads is held to a
bar the copy itself does not reach at that size; both are recorded. One JSON record per line,
fields as in benchmarks/results/README.md `kernels_*.jsonl`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

import torch

DEFAULT_CODECS = ["fp4_e2m1/b32/e8m0", "int4/b32/e8m0", "outlier_int4", "outlier+fp4_e2m1/b32",
                  "fp8_e4m3/b32/e8m0", "fp6_e2m3/b32/bf16", "int8/b32/e8m0"]
DEFAULT_SIZES_MB = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _params(hidden: int, sources: int, gen: torch.Generator):
    """Outlier parameters from the statistics of random data shaped like a partial sum."""
    from tpcomp_megatron.codecs import OutlierParams

    scale = _channel_scale(hidden, gen)
    sample = torch.randn(sources + 1, 512, hidden, generator=gen) * scale
    chans = scale.topk(-(-hidden // 64)).indices.sort().values
    return OutlierParams.from_stats(sample.amin(1), sample.amax(1), chans)


def _bases(hidden: int, sources: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """Low-rank codec bases: orthonormal directions per source (their values do not change the
    work, only K does)."""
    return torch.linalg.qr(torch.randn(sources + 1, hidden, rank, generator=gen)).Q.transpose(1, 2).contiguous()


def _make(spec: str, hidden: int, sources: int, params):
    from tpcomp_megatron.codecs import LowRankSpec, make_codec, parse_codec_spec

    parsed = parse_codec_spec(spec)
    if isinstance(parsed, LowRankSpec):
        return make_codec(parsed, _bases(hidden, sources, parsed.rank, torch.Generator().manual_seed(1)))
    return make_codec(parsed, params)


def _channel_scale(hidden: int, gen: torch.Generator) -> torch.Tensor:
    scale = torch.rand(hidden, generator=gen) + 0.5
    scale[torch.randperm(hidden, generator=gen)[: -(-hidden // 64)]] *= 30  # outlier channels
    return scale


def _inputs(rows: int, hidden: int, sources: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scale = _channel_scale(hidden, torch.Generator().manual_seed(0)).cuda()
    return [torch.randn(rows, hidden, device="cuda", dtype=torch.float32, generator=gen).mul_(scale).bfloat16()
            for _ in range(sources)]


_FLUSH: list[torch.Tensor] = []


def _flush() -> None:
    """Evict the L2 cache (50-60 MB on H100/H200) by writing 256 MB."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    _FLUSH[0].zero_()


def _replay_ms(graph: torch.cuda.CUDAGraph, times: int = 5) -> float:
    ms = []
    for _ in range(times):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        ms.append(start.elapsed_time(end))
    return sorted(ms)[len(ms) // 2]


def _ms(fn, reps: int = 20) -> float:
    """GPU time of one call, host overhead excluded: `reps` (L2 flush, call) pairs captured in
    one CUDA graph, minus a graph of the `reps` flushes alone; median of 5 replays each."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile, build the codec's device tables
        _flush()
    torch.cuda.current_stream().wait_stream(stream)
    both, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(both):
        for _ in range(reps):
            _flush()
            fn()
    with torch.cuda.graph(flush_only):
        for _ in range(reps):
            _flush()
    for _ in range(3):  # a call far shorter than the flush can vanish in the flush's jitter: retry
        ms = (_replay_ms(both) - _replay_ms(flush_only)) / reps
        if ms > 0:
            break
    else:
        ms = float("nan")  # below the noise of this method; recorded as such, not as a speed
    del both, flush_only
    return ms


def _eager_ms(fn) -> float:
    """Wall time of one eager call, host overhead (validation, dispatch, launch) included: what a
    caller outside CUDA graphs pays per kernel when the GPU is not the bottleneck."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _record(kernel, codec, elements, ms, moved, copy_gbps, meta) -> dict:
    gbps = moved / ms / 1e6 if ms == ms else float("nan")
    return {"kernel": kernel, "codec": codec, "elements": elements, "ms": round(ms, 5), "bytes_moved": moved,
            "gbps": round(gbps, 1), "copy_gbps": round(copy_gbps, 1), "fraction_of_copy": round(gbps / copy_gbps, 3),
            **meta}


_SAME_BYTES: dict[int, float] = {}


def _copy_gbps_moving(moved: int) -> float:
    """GB/s of a device-to-device copy that reads and writes `moved` bytes in all (cached per size)."""
    if moved not in _SAME_BYTES:
        a = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        _SAME_BYTES[moved] = 2 * a.nbytes / _ms(lambda: b.copy_(a)) / 1e6
        del a, b
    return _SAME_BYTES[moved]


def bench(args, meta) -> list[dict]:
    from tpcomp_megatron import kernels as K
    from tpcomp_megatron.codecs import REDUCED

    params = _params(args.hidden, args.sources, torch.Generator().manual_seed(0))
    n, hidden, out = args.sources, args.hidden, []
    for size_mb in args.sizes_mb:
        rows = max(1, (size_mb << 20) // (2 * hidden))
        elements = rows * hidden
        xs = _inputs(rows, hidden, n, seed=size_mb)
        y = torch.empty_like(xs[0])
        copy_ms = _ms(lambda: y.copy_(xs[0]))
        copy_gbps = 2 * xs[0].nbytes / copy_ms / 1e6
        out.append({**_record("copy", "none", elements, copy_ms, 2 * xs[0].nbytes, copy_gbps, meta),
                    "message_mb": size_mb, "rows": rows, "hidden": hidden})
        for spec in args.codecs:
            codec = _make(spec, hidden, n, params)
            p = torch.stack([K.encode(codec, x, source=i) for i, x in enumerate(xs)])
            pb = p[0].nbytes
            srcs = list(range(n))
            cases = [
                ("encode", lambda: K.encode(codec, xs[0], source=0), xs[0].nbytes + pb),
                ("decode_sum", lambda: K.decode_sum(codec, p, hidden, sources=srcs, dtype=torch.bfloat16),
                 n * pb + 2 * elements),
                ("decode_sum_encode", lambda: K.decode_sum_encode(codec, p, hidden, sources=srcs, out_source=REDUCED),
                 (n + 1) * pb),
                ("decode_each", lambda: K.decode_each(codec, p, hidden, sources=srcs, dtype=torch.bfloat16),
                 n * pb + 2 * n * elements),
            ]
            for kernel, fn, moved in cases:
                rec = _record(kernel, spec, elements, _ms(fn), moved, copy_gbps, meta)
                same = _copy_gbps_moving(moved)
                rec.update(message_mb=size_mb, rows=rows, hidden=hidden, sources=n, eager_ms=round(_eager_ms(fn), 5),
                           copy_same_bytes_gbps=round(same, 1), fraction_of_copy_same_bytes=round(rec["gbps"] / same, 3))
                out.append(rec)
                print(f"{spec:24s} {kernel:18s} {size_mb:4d} MB {rec['ms']:9.4f} ms {rec['gbps']:7.0f} GB/s "
                      f"{rec['fraction_of_copy']:6.2f} of copy ({copy_gbps:.0f}); eager call {rec['eager_ms']:.4f} ms",
                      flush=True)
        torch.cuda.empty_cache()
    return out


TUNE_BLOCK = [(1, 1024, 4), (2, 1024, 4), (2, 1024, 2), (4, 512, 2), (4, 1024, 4), (8, 1024, 4), (8, 1024, 8), (16, 1024, 8), (16, 512, 4), (16, 512, 8),
              (32, 256, 8), (4, 2048, 8), (8, 2048, 8), (32, 512, 8)]
TUNE_STATIC = [(1, 1024, 4), (2, 1024, 4), (2, 1024, 8), (4, 1024, 8), (4, 512, 4), (8, 512, 8),
               (2, 2048, 8), (1, 2048, 8)]


def tune(args, meta) -> list[dict]:
    """Time the main kernels under each candidate tile, through the launchers."""
    from tpcomp_megatron import kernels as K
    from tpcomp_megatron.codecs import make_codec
    from tpcomp_megatron.kernels import block as kb
    from tpcomp_megatron.kernels import outlier as ko
    from tpcomp_megatron.kernels.launch import Tiles
    from tpcomp_megatron.kernels.tables import outlier_tables

    params = _params(args.hidden, args.sources, torch.Generator().manual_seed(0))
    hidden, n, out = args.hidden, args.sources, []
    for size_mb in args.tune_sizes_mb:
        rows = (size_mb << 20) // (2 * hidden)
        xs = _inputs(rows, hidden, n, seed=size_mb)
        y = torch.empty_like(xs[0])
        copy_gbps = 2 * xs[0].nbytes / _ms(lambda: y.copy_(xs[0])) / 1e6
        for spec in args.tune_codecs:
            codec = make_codec(spec, params)
            p = torch.stack([K.encode(codec, x, source=i) for i, x in enumerate(xs)])
            enc, dec = torch.empty_like(p[0]), torch.empty_like(xs[0])
            static = spec.startswith("outlier_int4")
            for r, t, w in args.tune_tiles or (TUNE_STATIC if static else TUNE_BLOCK):
                tiles = Tiles(r, t, w)
                if static:
                    tb = outlier_tables(codec, xs[0].device)
                    fe = lambda: ko.launch_static_encode(xs[0], enc, lo=tb.lo, inv=tb.inv, chan=tb.chan, src_row=0, tiles=tiles)
                    fd = lambda: ko.launch_static_decode(p, dec, hidden=hidden, lo=tb.lo, step=tb.step, lo_out=tb.lo,
                                                         inv=tb.inv, slot=tb.slot, chan=tb.chan, first=tb.first,
                                                         window_max=tb.window_max, src_start=0,
                                                         src_step=1, each=False, tiles=tiles)
                else:
                    base = codec.block if hasattr(codec, "block") else codec
                    outl = None
                    if hasattr(codec, "block"):
                        tb = outlier_tables(codec, xs[0].device)
                        outl = (tb.slot, tb.first, tb.chan, tb.window_max)
                    kw = dict(element=base.spec.element, block=base.spec.block, scale=base.spec.scale,
                              data_bytes=base.data_bytes(hidden), outliers=outl, slots_off=base.row_bytes(hidden),
                              tiles=tiles)
                    fe = lambda: kb.launch_block_encode(xs[0], enc, **kw)
                    fd = lambda: kb.launch_block_decode(p, dec, hidden=hidden, encode=False, **kw)
                for kernel, fn, moved in (("encode", fe, xs[0].nbytes + p[0].nbytes),
                                          ("decode_sum", fd, n * p[0].nbytes + xs[0].nbytes)):
                    rec = _record(kernel, spec, rows * hidden, _ms(fn), moved, copy_gbps, meta)
                    rec.update(message_mb=size_mb, tiles=[r, t, w])
                    out.append(rec)
                    print(f"{spec:24s} {kernel:12s} {size_mb:4d} MB R={r:3d} T={t:5d} w={w:2d} "
                          f"{rec['ms']:8.4f} ms {rec['gbps']:7.0f} GB/s {rec['fraction_of_copy']:.2f}", flush=True)
    return out


def _cell(r: dict) -> str:
    same = r.get("fraction_of_copy_same_bytes")
    return f"{r['gbps']:.0f} ({r['fraction_of_copy']:.2f}" + (f" / {same:.2f})" if same is not None else ")")


def markdown(records: list[dict]) -> str:
    """A table per kernel: rows = codec, columns = message size, cells = GB/s (fraction of copy /
    of a copy moving as many bytes)."""
    meta = records[0]
    sizes = sorted({r["message_mb"] for r in records if "message_mb" in r})
    lines = [f"# Fused codec kernels: {meta['device']}, {meta['date']}", "",
             f"Command: `{meta['command']}` (commit {meta['git']}, torch {meta['torch']}). GPU time per call from "
             "CUDA-graph replay (L2 flushed before each call, host overhead excluded); GB/s counts every input read once "
             "and every output written once; in parentheses the fraction of a device-to-device copy of the "
             "same bf16 message, then of a copy moving as many bytes as the kernel, both measured in the same run.", ""]
    copy = {r["message_mb"]: r["gbps"] for r in records if r["kernel"] == "copy"}
    lines += ["| | " + " | ".join(f"{s} MB" for s in sizes) + " |", "|---|" + "---|" * len(sizes),
              "| copy GB/s | " + " | ".join(f"{copy[s]:.0f}" for s in sizes) + " |", ""]
    for kernel in ("encode", "decode_sum", "decode_sum_encode", "decode_each"):
        rows = [r for r in records if r["kernel"] == kernel]
        if not rows:
            continue
        lines += [f"## {kernel}", "", "| codec | " + " | ".join(f"{s} MB" for s in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for codec in dict.fromkeys(r["codec"] for r in rows):
            cells = {r["message_mb"]: r for r in rows if r["codec"] == codec}
            lines.append(f"| {codec} | " + " | ".join(
                _cell(cells[s]) if s in cells else "" for s in sizes) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS)
    ap.add_argument("--sizes-mb", nargs="+", type=int, default=DEFAULT_SIZES_MB)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--sources", type=int, default=2, help="payloads summed / decoded (the TP world size)")
    ap.add_argument("--out", help="JSON Lines file to append to")
    ap.add_argument("--md", help="Markdown summary of this run to write")
    ap.add_argument("--git", default=os.environ.get("GIT_COMMIT", "unknown"), help="commit measured")
    ap.add_argument("--tune", action="store_true", help="sweep tile shapes instead")
    ap.add_argument("--tune-tiles", nargs="+", type=lambda v: tuple(int(i) for i in v.split(",")),
                    help="tiles to sweep, each R,T,WARPS (default: the built-in lists)")
    ap.add_argument("--tune-sizes-mb", nargs="+", type=int, default=[8, 64])
    ap.add_argument("--tune-codecs", nargs="+", default=["fp4_e2m1/b32/e8m0", "int4/b32/e8m0", "outlier_int4",
                                                         "outlier+fp4_e2m1/b32"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA device")
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "command": "python tools/bench_kernels.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "git": args.git, "torch": torch.__version__}
    records = tune(args, meta) if args.tune else bench(args, meta)
    if args.out:
        with open(args.out, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    if args.md and not args.tune:
        with open(args.md, "w") as f:
            f.write(markdown(records) + "\n")


if __name__ == "__main__":
    main()
