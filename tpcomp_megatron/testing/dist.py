"""Run a function on N real ranks (one process each) over gloo, for CPU tests.

Each rank is a fresh `spawn` process that joins a `FileStore` rendezvous, runs `fn(rank, world_size,
*args)` and reports its return value (pickled) or its traceback. A rank that hangs is killed when the
join timeout runs out, and the caller gets an error naming it, never a hung test session.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from typing import Any, Callable


def _worker(fn, rank, world_size, store_path, pg_timeout_s, result_path, args, env) -> None:
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        out = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        out = ("error", traceback.format_exc())
    with open(result_path, "wb") as f:
        pickle.dump(out, f)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a peer that died leaves nothing to tear down cleanly
        pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return each rank's result.

    `fn` must be importable (a module-level function) because ranks are spawned. Raises
    `RuntimeError` with the failing rank's traceback, or naming the ranks that did not finish in
    `timeout_s`.
    """
    ctx = mp.get_context("spawn")
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="tpcomp-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        results = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world_size)]
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, r, world_size, store, pg_timeout_s, results[r], args, env),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        for p in procs:
            left = (deadline - datetime.datetime.now()).total_seconds()
            p.join(max(left, 0.1))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise RuntimeError(f"ranks {hung} of {world_size} did not finish in {timeout_s:.0f} s")
        outs = []
        for r, path in enumerate(results):
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} and no result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"rank {r} of {world_size} failed:\n{value}")
            outs.append(value)
        return outs
