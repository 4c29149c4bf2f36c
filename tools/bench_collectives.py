"""Compressed collectives vs NCCL bf16 (and PyTorch's symmetric-memory two-shot all-reduce), side by side.

Launch one process per GPU, once per link class (NCCL reads its settings at start):

    torchrun --nproc-per-node 2 tools/bench_collectives.py --out results.jsonl
    NCCL_P2P_DISABLE=1 torchrun ...                       # PCIe-class (shared-memory path)
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 torchrun ...    # network-class (sockets)

Rank 0 appends one JSON record per (op, algorithm, size, mode) in the form of
benchmarks/results (format: benchmarks/results/README.md): medians of several timed runs of many calls, eager and under
CUDA-graph replay, each with the NCCL bf16 baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from tpcomp_megatron.codecs import make_codec
from tpcomp_megatron.comm import CompressedComm, GatePolicy, detect_link

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _time(fn, *, graph: bool, target_ms: float = 40.0, reps: int = 5) -> float:
    """Median milliseconds per call of `fn` over `reps` timed runs (every rank runs the same)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    n = int(min(max(target_ms / est, 3), 200))
    est_t = torch.tensor([n], device="cuda")
    dist.all_reduce(est_t, op=dist.ReduceOp.MAX)  # every rank must issue the same number of calls
    n = int(est_t.item())
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(n):
                fn()
        run = g.replay
    else:
        def run():
            for _ in range(n):
                fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    t = torch.tensor([sorted(times)[len(times) // 2]], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank decides a collective's time
    return t.item()


def _symm_two_shot(x: torch.Tensor, group):
    """PyTorch's symmetric-memory two-shot all-reduce, or None where it cannot run."""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
        symm_mem.rendezvous(buf, group)
        buf.copy_(x)
        op = torch.ops.symm_mem.two_shot_all_reduce_
        name = group.group_name
        op(buf, "sum", name)
        torch.cuda.synchronize()
        return lambda: op(buf, "sum", name)
    except Exception as e:  # noqa: BLE001 - a baseline that does not run is skipped, and said so
        if dist.get_rank() == 0:
            print(f"symm_mem two-shot all-reduce unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--codec", default="fp4_e2m1/b32/e8m0")
    ap.add_argument("--hidden", type=int, nargs="+", default=[4096, 5120, 8192])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048, 4096, 8192, 16384])
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    ap.add_argument("--ops", nargs="+", default=["all_reduce", "reduce_scatter", "all_gather"])
    args = ap.parse_args()

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    group = dist.group.WORLD
    rank, n = dist.get_rank(), dist.get_world_size()
    link = detect_link()
    codec = make_codec(args.codec)
    forced = CompressedComm(group, GatePolicy(min_bytes=0, link=link))
    forced_nccl = CompressedComm(group, GatePolicy(min_bytes=0, link=link, transport="nccl"))
    gated = CompressedComm(group, GatePolicy(link=link))
    meta = {
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "command": " ".join(f"{k}={os.environ[k]}" for k in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE") if k in os.environ)
        + " torchrun --nproc-per-node " + str(n) + " " + " ".join(sys.argv),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown",
        "link": link, "world_size": n, "torch": torch.__version__,
    }
    out = open(args.out, "a") if rank == 0 else None
    gen = torch.Generator(device="cuda").manual_seed(rank)
    for hidden in args.hidden:
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
            nbytes = x.numel() * 2
            for mode in args.modes:
                graph = mode == "graph"
                rec = dict(meta, tokens=tokens, hidden=hidden, bytes_bf16=nbytes, graph=graph)
                results = []
                if "all_reduce" in args.ops:
                    buf = x.clone()
                    base = _time(lambda: dist.all_reduce(buf), graph=graph)
                    variants = [("one_shot", lambda: forced.all_reduce(x, codec, algorithm="one_shot")),
                                ("two_shot", lambda: forced.all_reduce(x, codec, algorithm="two_shot")),
                                ("auto", lambda: gated.all_reduce(x, codec))]
                    if forced.policy.transport == "symm_mem":
                        variants.append(("one_shot_nccl", lambda: forced_nccl.all_reduce(x, codec, algorithm="one_shot")))
                    results.append(("all_reduce", "nccl", "none", 16.0, base, base))
                    if link == "nvlink":
                        symm = _symm_two_shot(x, group)
                        if symm is not None:
                            results.append(("all_reduce", "symm_mem_two_shot", "none", 16.0, _time(symm, graph=graph), base))
                    for algo, fn in variants:
                        results.append(("all_reduce", algo, args.codec, codec.bits_per_value(hidden), _time(fn, graph=graph), base))
                if "reduce_scatter" in args.ops and tokens % n == 0:
                    rs_out = x.new_empty(tokens // n, hidden)
                    base = _time(lambda: dist.reduce_scatter_tensor(rs_out, x), graph=graph)
                    results.append(("reduce_scatter", "nccl", "none", 16.0, base, base))
                    results.append(("reduce_scatter", "compressed", args.codec, codec.bits_per_value(hidden),
                                    _time(lambda: forced.reduce_scatter(x, codec), graph=graph), base))
                if "all_gather" in args.ops:
                    ag_out = x.new_empty(tokens * n, hidden)
                    base = _time(lambda: _all_gather(ag_out, x), graph=graph)
                    results.append(("all_gather", "nccl", "none", 16.0, base, base))
                    results.append(("all_gather", "compressed", args.codec, codec.bits_per_value(hidden),
                                    _time(lambda: forced.all_gather(x, codec), graph=graph), base))
                for op, algo, spec, bits, ms, base in results:
                    r = dict(rec, op=op, algorithm=algo, codec=spec, bits_per_value=bits, ms=ms,
                             baseline_ms=base, speedup=base / ms)
                    if out:
                        out.write(json.dumps(r) + "\n")
                        out.flush()
                        print(f"{link:13s} {mode:5s} {op:14s} {algo:18s} {tokens:6d}x{hidden:<5d} "
                              f"{ms:8.4f} ms  base {base:8.4f}  x{base / ms:5.2f}", flush=True)
    if out:
        out.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
