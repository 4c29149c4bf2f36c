"""Host time per eager call of each piece of the compressed path, next to NCCL's own calls.

    python tools/bench_host.py --out benchmarks/results/host_<device>_<date>.jsonl

One process, one run, in phases:
1. a real 1-rank NCCL group (gloo on CPU): `dist.all_reduce` and `all_gather_into_tensor` of the
   message, `torch.add` for scale, and the codec ops alone (`encode`, `decode_sum` of 2 sources,
   `decode_sum_encode` and `decode_each` of 8, `encode_feedback`);
2. a stand-in process group of world size 2, then 8 (`--pg`: `mirror`, one local kernel per
   collective, or torch's `fake`, whose all-gather and all-to-all launch one copy per peer): the
   whole `CompressedComm` calls (all-reduce one-shot at 2, two-shot at 8, also with its steps
   launched one by one, `_stepped`, instead of replayed from a CUDA graph; reduce-scatter,
   all-gather), gate and stats included: the path's own host time plus the stand-in's call, whose
   own cost is recorded beside them;
3. the 1-rank NCCL group again (the reference's spread across the run).

Each figure is N back-to-back eager calls then one device sync, wall time / N, after a warm-up;
the message is small (`--rows` x `--hidden`, bf16) so that the GPU never holds the host back.
`ratio_to_nccl_all_reduce` divides by the quicker of phases 1 and 3's NCCL all-reduce.
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


def per_call_us(fn, calls: int, device: torch.device) -> float:
    for _ in range(max(10, calls // 10)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6


def _init(backend: str, world: int, device: torch.device) -> None:
    if backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    elif backend == "mirror":
        from tpcomp_megatron.testing.onerank import register_mirror_backend

        register_mirror_backend()
        dist.init_process_group("mirror", store=dist.HashStore(), rank=0, world_size=world)
    else:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                **({"device_id": device} if backend == "nccl" else {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", nargs="+", default=["fp4_e2m1/b32/e6m2", "fp6_e2m3/b32/e8m0", "int4/b32/bf16",
                                                    "lloyd4/b32/e6m2d"])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default="", help="free text stored in each record (e.g. which build)")
    ap.add_argument("--pg", choices=["mirror", "fake"], default="mirror",
                    help="the stand-in process group (tpcomp_megatron/testing/onerank.py)")
    ap.add_argument("--profile", action="store_true",
                    help="instead: cProfile of all-reduces (fake group of 8) of the first codec")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.profile:
        return profile(args)

    from tpcomp_megatron import ops
    from tpcomp_megatron.codecs import make_codec, parse_codec_spec
    from tpcomp_megatron.codecs.base import REDUCED
    from tpcomp_megatron.comm import CompressedComm, GatePolicy

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    real = "nccl" if cuda else "gloo"
    git = os.environ.get("GIT_COMMIT") or subprocess.run(  # a copied tree's .git may lag: say it
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "git": git,
            "tag": args.tag, "process_group": args.pg, "rows": args.rows, "hidden": args.hidden, "calls": args.calls}
    x = torch.randn(args.rows, args.hidden, device=device, dtype=torch.bfloat16)
    codecs = {spec: make_codec(parse_codec_spec(spec)) for spec in args.codecs}
    records = []

    def rec(what, codec, world, backend, us):
        records.append(dict(meta, what=what, codec=codec, world_size=world, backend=backend, us_per_call=us))
        print(f"{what:26s} {codec:20s} world {world} {backend:5s} {us:9.1f} us", flush=True)

    def reference(phase: str):
        _init(real, 1, device)
        y = x.clone()
        out = torch.empty(x.numel(), device=device, dtype=x.dtype)
        rec(f"{real}_all_reduce", "none", 1, real, per_call_us(lambda: dist.all_reduce(y), args.calls, device))
        rec(f"{real}_all_gather", "none", 1, real,
            per_call_us(lambda: dist.all_gather_into_tensor(out, x.view(-1)), args.calls, device))
        if phase == "first":
            rec("torch_add", "none", 1, "none", per_call_us(lambda: torch.add(x, x), args.calls, device))
            for spec, codec in codecs.items():
                p2 = torch.stack([ops.encode(codec, x, source=s) for s in range(2)])
                p8 = torch.stack([ops.encode(codec, x, source=s) for s in range(8)])
                debt = torch.zeros(x.shape, device=device, dtype=torch.float32)
                rec("encode", spec, 1, "none", per_call_us(lambda: ops.encode(codec, x, source=0), args.calls, device))
                rec("decode_sum", spec, 2, "none", per_call_us(
                    lambda: ops.decode_sum(codec, p2, args.hidden, sources=range(2), dtype=x.dtype), args.calls, device))
                rec("decode_sum_encode", spec, 8, "none", per_call_us(
                    lambda: ops.decode_sum_encode(codec, p8, args.hidden, sources=range(8), out_source=REDUCED),
                    args.calls, device))
                rec("decode_each", spec, 8, "none", per_call_us(
                    lambda: ops.decode_each(codec, p8, args.hidden, sources=range(8), dtype=x.dtype), args.calls,
                    device))
                rec("encode_feedback", spec, 1, "none", per_call_us(
                    lambda: ops.encode_feedback(codec, x, debt, source=0), args.calls, device))
        dist.destroy_process_group()

    reference("first")
    for world, algo in ((2, "one_shot"), (8, "two_shot")):
        _init(args.pg, world, device)
        rows = x.repeat(world, 1)  # reduce-scatter: rows divisible by the world size
        for spec, codec in codecs.items():
            policy = GatePolicy(algorithm=algo, min_bytes=0, link="pcie_class", transport="nccl")
            stepped = CompressedComm(None, policy, cuda_graphs=False)  # every call launches its steps
            rec(f"all_reduce_{algo}_stepped", spec, world, args.pg,
                per_call_us(lambda: stepped.all_reduce(x, codec), args.calls, device))
            comm = CompressedComm(None, policy)  # eager CUDA calls replayed from graphs (comm/graphs.py)
            rec(f"all_reduce_{algo}", spec, world, args.pg,
                per_call_us(lambda: comm.all_reduce(x, codec), args.calls, device))
            rec("reduce_scatter", spec, world, args.pg,
                per_call_us(lambda: comm.reduce_scatter(rows, codec), args.calls, device))
            rec("all_gather", spec, world, args.pg,
                per_call_us(lambda: comm.all_gather(x, codec), args.calls, device))
            assert comm.stats.calls_fallback == 0, comm.stats.summary()
        y = x.clone()
        out = torch.empty(world * x.numel(), device=device, dtype=x.dtype)
        rec(f"{args.pg}_all_reduce", "none", world, args.pg, per_call_us(lambda: dist.all_reduce(y), args.calls, device))
        rec(f"{args.pg}_all_gather", "none", world, args.pg,
            per_call_us(lambda: dist.all_gather_into_tensor(out, x.view(-1)), args.calls, device))
        dist.destroy_process_group()
    reference("last")

    # The reference is the quicker of its two phases: a slow spell of a shared machine during one of
    # them must not flatter the ratios.
    nccl = min(r["us_per_call"] for r in records if r["what"] == f"{real}_all_reduce")
    with open(args.out, "a") as f:
        for r in records:
            r["ratio_to_nccl_all_reduce"] = r["us_per_call"] / nccl
            f.write(json.dumps(r) + "\n")


def profile(args) -> None:
    """Where the host time of compressed all-reduces goes (cProfile, own time; fake group of 8)."""
    import cProfile
    import pstats

    from tpcomp_megatron.codecs import make_codec, parse_codec_spec
    from tpcomp_megatron.comm import CompressedComm, GatePolicy

    device = torch.device(args.device)
    _init(args.pg, 8, device)
    x = torch.randn(args.rows, args.hidden, device=device, dtype=torch.bfloat16)
    codec = make_codec(parse_codec_spec(args.codecs[0]))
    for algo in ("one_shot", "two_shot"):
        comm = CompressedComm(None, GatePolicy(algorithm=algo, min_bytes=0, link="pcie_class", transport="nccl"))
        per_call_us(lambda: comm.all_reduce(x, codec), 100, device)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            comm.all_reduce(x, codec)
        prof.disable()
        print(algo)
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    # the ways to call the all-gather: the c10d Python API, the group's C++ method, the functional op
    out = torch.empty(8 * x.numel(), device=device, dtype=x.dtype)
    flat = x.view(-1)
    group = dist.group.WORLD
    ways = {"dist.all_gather_into_tensor": lambda: dist.all_gather_into_tensor(out, flat),
            "group._allgather_base": lambda: group._allgather_base(out, flat),
            "_c10d_functional.all_gather_into_tensor_out": lambda: torch.ops._c10d_functional.wait_tensor(
                torch.ops._c10d_functional.all_gather_into_tensor_out(flat, 8, group.group_name, out=out))}
    for name, fn in ways.items():
        try:
            print(f"{name:48s} {per_call_us(fn, args.calls, device):7.1f} us")
        except Exception as e:  # noqa: BLE001
            print(f"{name:48s} failed: {type(e).__name__}: {e}")
    print(f"{'torch.empty':48s} {per_call_us(lambda: torch.empty(x.shape, device=device), args.calls, device):7.1f} us")
    try:
        from tpcomp_megatron.kernels.plans import memo

        for key, plan in memo(codec).items():
            print(key[0], [launch.compiled is not None for launch in getattr(plan, "launches", ())])
    except ImportError:
        pass
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
