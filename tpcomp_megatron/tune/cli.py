"""`tpcomp-tune`: measure this machine once; the gate then follows the table it writes.

    torchrun --nproc-per-node 2 -m tpcomp_megatron.tune.cli --model CKPT --out gate_table.json
    tpcomp-tune --hidden 5120                      # one process: a 1-rank group (tool check only)

Every rank runs the same measurements over the real group (NCCL on GPUs, gloo on CPU); rank 0
prints the table and writes `--out`; the local rank 0 of every host stores it in the cache
(`~/.cache/tpcomp-megatron/gate/`), where `apply_tp_compression` finds it for a run with the same
device, world size, link and versions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..comm.gate import LINKS
from ..comm.gate.config import DEFAULT_CODECS, DEFAULT_TOKENS, TUNE_ALGORITHMS, TUNE_TRANSPORTS, TuneConfig
from ..comm.gate.table import store_in_cache
from ..console import refuse
from ..quiet import VERBOSE_HELP, quiet_warnings
from . import tune
from .report import format_table, plot
from .watchdog import Watchdog, group_timeout

DEFAULT_TIMEOUT_S = 60.0
"""How long a rank waits without progress (a sample timed) before giving up."""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tpcomp-tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = ap.add_mutually_exclusive_group(required=True)
    shape.add_argument("--model", metavar="CKPT", help="converted checkpoint (tpcomp-convert): hidden size and layers")
    shape.add_argument("--hidden", type=int, help="hidden size (the all-reduced rows' width)")
    ap.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS),
                    help="message rows to measure (default: powers of two, 1 to 8192)")
    ap.add_argument("--codecs", nargs="+", default=list(DEFAULT_CODECS), metavar="SPEC")
    ap.add_argument("--algorithms", nargs="+", choices=TUNE_ALGORITHMS, default=list(TUNE_ALGORITHMS))
    ap.add_argument("--transports", nargs="+", choices=TUNE_TRANSPORTS, default=["auto"])
    ap.add_argument("--link", choices=("auto",) + LINKS, default="auto",
                    help="link class recorded in the key (default: detected, as the gate detects it)")
    ap.add_argument("--no-graph", action="store_true", help="eager timings only (CUDA)")
    ap.add_argument("--no-symm-exact", action="store_true",
                    help="skip PyTorch's symmetric-memory bf16 all-reduces (comparison only)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--margin", type=float, default=0.05,
                    help="compress only where measured at least this fraction faster (default 0.05)")
    ap.add_argument("--out", metavar="PATH", help="write the table (JSON) here (rank 0)")
    ap.add_argument("--no-cache", action="store_true", help="do not store the table in the cache")
    ap.add_argument("--cache-dir", metavar="DIR", help="cache folder (default ~/.cache/tpcomp-megatron/gate)")
    ap.add_argument("--plot", metavar="PNG", help="plot speedup against message size (matplotlib; rank 0)")
    ap.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                    help="process group when not already initialized (auto: NCCL with CUDA, else gloo)")
    ap.add_argument("--pg", choices=("mirror", "fake"), default=None,
                    help="instead: one process standing in for rank 0 of --world-size ranks (testing/onerank.py): "
                         "its host and kernel time without a link; the table's link is the stand-in's name, so "
                         "no real run uses it")
    ap.add_argument("--world-size", type=int, default=2, help="with --pg: the world size simulated")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                    help="give up, with one line, when a rank makes no progress for this long: another rank "
                         f"stopped, dead or stuck (default {DEFAULT_TIMEOUT_S:.0f})")
    ap.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return ap


def _init(backend: str, pg: str | None = None, world_size: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """The default group from torchrun's environment, a 1-rank group without it, or (`pg`) a
    one-process stand-in for rank 0 of `world_size` ranks. The group's timeout is longer than the
    watchdog's (`timeout_s`), whose line must come first."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if pg == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        return
    if pg == "mirror":
        from ..testing.onerank import register_mirror_backend

        register_mirror_backend()
        dist.init_process_group("mirror", store=dist.HashStore(), rank=0, world_size=world_size)
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kw = {}
    if backend == "nccl":
        kw["device_id"] = torch.device("cuda", torch.cuda.current_device())
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=group_timeout(timeout_s), **kw)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)


def model_shape(checkpoint: str | os.PathLike) -> tuple[int, int]:
    """(hidden, layers) of a converted checkpoint (`tpcomp-convert` output folder)."""
    from ..convert.load import load_config

    cfg = load_config(checkpoint)
    return cfg.hidden_size, cfg.num_layers


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    try:
        hidden, layers = (args.hidden, None) if args.model is None else model_shape(args.model)
        cfg = TuneConfig(hidden=hidden, tokens=tuple(args.tokens), codecs=tuple(args.codecs),
                         algorithms=tuple(args.algorithms), transports=tuple(args.transports), link=args.link,
                         exact_symm=not args.no_symm_exact, graph=not args.no_graph, warmup=args.warmup,
                         iters=args.iters, repeats=args.repeats, margin=args.margin, model=args.model,
                         layers=layers)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    if args.world_size < 1:
        ap.error(f"--world-size must be >= 1, got {args.world_size}")
    if not args.timeout > 0:
        ap.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    with Watchdog("tpcomp-tune", args.timeout) as dog:
        return _run(args, cfg, dog)


def _run(args, cfg: TuneConfig, dog: Watchdog) -> int:
    own = not dist.is_initialized()
    if own:
        dog.beat("joining the process group: started")
        _init(args.backend, args.pg, args.world_size, args.timeout)
    try:
        try:
            result = tune(cfg, progress=dog.beat)
        except (ValueError, FileNotFoundError) as e:  # every rank refuses alike, and says why (refuse)
            return refuse("tpcomp-tune", e)
        dog.beat("measured; writing the table")
        table, rank = result.table, dist.get_rank()
        if rank == 0:
            print(format_table(table), flush=True)
            if args.out:
                print(f"table written to {table.save(args.out)}")
            if args.plot:
                plot(table, args.plot)
                print(f"plot written to {args.plot}")
        if not args.no_cache and int(os.environ.get("LOCAL_RANK", rank)) == 0:
            where = store_in_cache(table, Path(args.cache_dir) if args.cache_dir else None)
            print(f"rank {rank}: table cached at {where}", flush=True)
    finally:
        if own:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # `python -m tpcomp_megatron.tune.cli`, as torchrun starts it
    with quiet_warnings(enabled="--verbose" not in sys.argv):
        sys.exit(main())
