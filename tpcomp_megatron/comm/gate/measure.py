"""Time every path over the real process group; the slowest rank's time decides.

Each rank times each (path, message size, mode) the same way, in the same order: a warm-up, then
`repeats` samples of `iters` back-to-back calls between a barrier and a device sync; its median is
the rank's time. One all-reduce (MAX) of all the ranks' times then gives every rank the same
numbers, so every rank derives the same table and the gate decides the same everywhere, whatever
one rank's own timings were. The paths are called exactly as the runtime calls them: the exact
path is `CompressedComm.all_reduce(x, None)` (the gate's fallback: a copy and `dist.all_reduce`),
the compressed ones `CompressedComm.all_reduce(x, codec)` with the gate forced open. The gate
sits below the collectives it decides for, so `tune` is handed them (`collectives`: the caller's
`comm.CompressedComm`) rather than importing them.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from ...codecs import make_codec
from .config import TuneConfig
from .links import detect_link, symm_mem_available
from .policy import GatePolicy
from .table import EXACT, GateTable, SizeRow, TableKey, path_name

Collectives = Callable[..., object]
"""`collectives(group, policy)` -> compressed collectives over `group` deciding by `policy`
(`comm.CompressedComm`): `all_reduce(x, codec)` and `stats` are timed and read."""

STAND_INS = ("mirror", "fake")
"""One-process stand-in groups (testing/onerank.py): one rank's host and kernel work, no link."""
SYMM_EXACT = {"one_shot": "exact symm_mem one_shot", "two_shot": "exact symm_mem two_shot"}
"""Path names of PyTorch's lossless symmetric-memory bf16 all-reduces (for comparison)."""


@dataclass(frozen=True)
class Candidate:
    """One path to time: the exact fallback, a lossless symmetric-memory all-reduce, or a
    compressed (codec, algorithm, transport)."""

    name: str
    codec: str | None = None
    algorithm: str = "one_shot"
    transport: str = "nccl"


@dataclass
class TuneResult:
    table: GateTable
    local_ms: dict = field(default_factory=dict)
    """This rank's own times: (tokens, path, mode) -> ms (the table holds the slowest rank's)."""
    notes: list = field(default_factory=list)
    """What was not measured, and why."""


def _device(backend: str) -> torch.device:
    if backend == "gloo" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def candidates(cfg: TuneConfig, group, link: str) -> tuple[list[Candidate], list[str]]:
    """The paths this group can run, in a fixed order (the same on every rank), and notes on those
    left out."""
    notes = []
    symm_why = "world size 1" if dist.get_world_size(group) == 1 else symm_mem_available(group)
    transports = []
    for t in cfg.transports:
        if t == "auto":
            transports += ["nccl"] + (["symm_mem"] if symm_why is None and link == "nvlink" else [])
        elif t == "symm_mem" and symm_why is not None:
            notes.append(f"transport symm_mem not measured: {symm_why}")
        else:
            transports.append(t)
    out = [Candidate(EXACT)]
    if cfg.exact_symm:
        ops = getattr(torch.ops, "symm_mem", None)
        missing = symm_why or ("this torch has no symm_mem all-reduce ops"
                               if ops is None or not hasattr(ops, "one_shot_all_reduce") else None)
        if missing is None:
            out += [Candidate(SYMM_EXACT[a], algorithm=a, transport="symm_mem") for a in ("one_shot", "two_shot")]
        else:
            notes.append(f"symmetric-memory exact all-reduce not measured: {missing}")
    for codec in cfg.codecs:
        for algo in cfg.algorithms:
            for t in dict.fromkeys(transports if algo == "one_shot" else ["nccl"]):
                out.append(Candidate(path_name(codec, algo, t), codec, algo, t))
    return out, notes


def _symm_exact(c: Candidate, x: torch.Tensor, group) -> Callable[[], object]:
    """PyTorch's symmetric-memory bf16 all-reduce of a buffer shaped like `x` (zeros: the in-place
    two-shot sums it into itself call after call, and zeros stay finite)."""
    import torch.distributed._symmetric_memory as symm_mem

    buf = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device).zero_()
    symm_mem.rendezvous(buf, group)
    name = group.group_name
    if c.algorithm == "one_shot":
        return lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name)
    return lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", name)


def _runner(c: Candidate, x: torch.Tensor, group, link: str, comms: dict, collectives: Collectives
            ) -> Callable[[], object]:
    if c.name in SYMM_EXACT.values():
        return _symm_exact(c, x, group)
    comm = comms.get((c.algorithm, c.transport))
    if comm is None:
        policy = GatePolicy(algorithm=c.algorithm, link=link, min_bytes=0, transport=c.transport)
        comm = comms[(c.algorithm, c.transport)] = collectives(group, policy)
    codec = None if c.codec is None else make_codec(c.codec)
    return lambda: comm.all_reduce(x, codec)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _samples(call: Callable[[], object], per_sample: int, cfg: TuneConfig, group, device, beat) -> float:
    """Median over `cfg.repeats` samples of ms per call (`call` runs `per_sample` calls)."""
    out = []
    for i in range(cfg.repeats):
        _sync(device)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        call()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3 / per_sample)
        beat(f"sample {i + 1} of {cfg.repeats}")
    return statistics.median(out)


def _eager_ms(fn, cfg: TuneConfig, group, device, beat) -> float:
    for _ in range(cfg.warmup):
        fn()

    def loop():
        for _ in range(cfg.iters):
            fn()
    return _samples(loop, cfg.iters, cfg, group, device, beat)


def _graph_ms(fn, cfg: TuneConfig, group, device, what: str, beat) -> float:
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(cfg.iters):
                fn()
    except RuntimeError as e:
        raise RuntimeError(f"CUDA-graph capture of {what} failed ({e}); rerun tpcomp-tune with --no-graph") from e
    graph.replay()
    return _samples(graph.replay, cfg.iters, cfg, group, device, beat)


def _time(c: Candidate, x, mode: str, cfg: TuneConfig, group, link: str, comms: dict, collectives: Collectives,
          device, notes: list, progress: Callable[[str], None]) -> float:
    """This rank's ms per call of `c` on `x` in `mode`. PyTorch's symmetric-memory all-reduces are
    for comparison only: where one fails (size or alignment limits of this torch) it is left out
    (inf: the MAX over ranks keeps it out everywhere); a failing compressed path is an error."""
    what = f"timing {c.name} at {x.shape[0]} tokens ({mode})"
    progress(f"{what}: started")

    def beat(step: str) -> None:
        progress(f"{what}: {step} done")
    try:
        fn = _runner(c, x, group, link, comms, collectives)
        if mode == "eager":
            return _eager_ms(fn, cfg, group, device, beat)
        return _graph_ms(fn, cfg, group, device, f"{c.name} at {x.shape[0]} tokens", beat)
    except RuntimeError as e:
        if c.name not in SYMM_EXACT.values():
            raise
        notes.append(f"{c.name} at {x.shape[0]} tokens ({mode}) failed on rank {dist.get_rank(group)}: {e}")
        return float("inf")


def tune(cfg: TuneConfig, group=None, *, collectives: Collectives,
         progress: Callable[[str], None] | None = None) -> TuneResult:
    """Measure every path of `cfg` over `group` (default: the world) through `collectives`
    (`comm.CompressedComm`); collective: every rank of the group calls it with the same `cfg`.
    `progress(where)` is called after every timed sample and before every collective step
    (tpcomp-tune's watchdog, tune/watchdog.py)."""
    progress = progress or (lambda where: None)
    group = group if group is not None else dist.group.WORLD
    backend = dist.get_backend(group)
    device = _device(backend)
    simulated = backend in STAND_INS
    link = detect_link() if cfg.link == "auto" else cfg.link
    single = dist.get_world_size(group) == 1
    modes = ["eager"] + (["graph"] if cfg.graph and device.type == "cuda" and not single else [])
    cands, notes = candidates(cfg, group, link)
    if simulated:  # a stand-in has no link: its name is the key's link, so no real run takes its table
        notes.append(f"stand-in process group '{backend}': one rank's host and kernel time, no link")
    if single:
        notes.append("world size 1: every collective returns at once (no graph to capture); the table only "
                     "shows the tool works")
    comms: dict = {}
    local: dict = {}
    gen = torch.Generator(device=device).manual_seed(1234 + dist.get_rank(group))
    for tokens in cfg.tokens:
        x = torch.randn(tokens, cfg.hidden, generator=gen, device=device).to(torch.bfloat16)
        for c in cands:
            for mode in modes:
                local[(tokens, c.name, mode)] = _time(c, x, mode, cfg, group, link, comms, collectives, device,
                                                      notes, progress)
        del x
    for (algo, transport), comm in comms.items():  # a compressed path that fell back timed the wrong thing
        if comm.stats.fallback_reasons.keys() - {"layer left exact"}:
            raise RuntimeError(f"{algo} {transport}: a compressed call fell back ({dict(comm.stats.fallback_reasons)})")
    slowest = torch.tensor(list(local.values()), dtype=torch.float64, device=device)
    progress("the all-reduce of every rank's times: started")
    if not simulated:  # (one process: its times are the slowest; a stand-in's all-reduce is no MAX)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    worst = dict(zip(local, slowest.tolist()))
    rows = tuple(SizeRow(tokens=t, hidden=cfg.hidden,  # (a lossless comparison path that failed: left out)
                         ms={c.name: {m: worst[(t, c.name, m)] for m in modes} for c in cands
                             if all(worst[(t, c.name, m)] < float("inf") for m in modes)})
                 for t in cfg.tokens)
    key = TableKey.current(dist.get_world_size(group), backend if simulated else link, backend)
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(["tpcomp-tune"] + sys.argv[1:]),
            "model": cfg.model, "layers": cfg.layers, "modes": modes, "warmup": cfg.warmup, "iters": cfg.iters,
            "repeats": cfg.repeats, "notes": notes, "timing": "slowest rank's median ms per call"}
    return TuneResult(GateTable(key=key, rows=rows, margin=cfg.margin, meta=meta), local, notes)
