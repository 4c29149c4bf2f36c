"""Run a function on N real ranks (one process each) over gloo, for CPU tests.

Each rank is a fresh `spawn` process that joins a `FileStore` rendezvous, runs `fn(rank, world_size,
*args)` and reports its return value (pickled) or its traceback. A rank that hangs is killed when the
join timeout runs out, and the caller gets an error naming it, never a hung test session.

Gloo's rendezvous can fail under load (`Gloo connectFullMesh failed ... Connection closed by peer`
with the suite beside other work on two cores). A failed rendezvous cannot be retried on the same
store (its keys are spent), so the whole launch is retried: fresh processes, a fresh store.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Callable

RENDEZVOUS_ATTEMPTS = 3
"""Launches tried when a rank's rendezvous fails (load, never the code under test)."""
MIN_RENDEZVOUS_TIMEOUT_S = 60.0
"""Gloo's connect timeout at least this long, whatever the collectives' timeout: under load a peer
can take long to start (spawn imports torch)."""


def join_gloo(rank: int, world_size: int, store_path: str, timeout_s: float, attempt: int) -> None:
    """Join the gloo group of this launch (`attempt`: which launch, for tests that inject failures)."""
    import torch.distributed as dist

    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _dump(path: str, out: tuple) -> None:
    with open(path + ".tmp", "wb") as f:  # whole or absent: the parent polls for it
        pickle.dump(out, f)
    os.replace(path + ".tmp", path)


def _worker(fn, rank, world_size, store_path, pg_timeout_s, result_path, args, env, rendezvous, attempt) -> None:
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        rendezvous(rank, world_size, store_path, max(pg_timeout_s, MIN_RENDEZVOUS_TIMEOUT_S), attempt)
        if pg_timeout_s < MIN_RENDEZVOUS_TIMEOUT_S:  # the collectives keep the timeout asked for
            dist.group.WORLD.set_timeout(datetime.timedelta(seconds=pg_timeout_s))
    except BaseException:  # noqa: BLE001 - the parent retries the launch
        _dump(result_path, ("rendezvous", traceback.format_exc()))
        return
    try:
        out = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        out = ("error", traceback.format_exc())
    _dump(result_path, out)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a peer that died leaves nothing to tear down cleanly
        pass


def _read(path: str):
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        return None


def _launch(ctx, fn, world_size, args, timeout_s, pg_timeout_s, env, rendezvous, attempt, tmp):
    """One launch: ("ok", results), ("rendezvous", traceback) or raises for a rank's failure or hang."""
    store = os.path.join(tmp, "store")
    results = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world_size)]
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(fn, r, world_size, store, pg_timeout_s, results[r], args, env, rendezvous, attempt))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    failed_rendezvous = None
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            # a rank whose rendezvous failed leaves its peers waiting for it: stop them now
            for path in results:
                got = _read(path) if os.path.exists(path) else None
                if got is not None and got[0] == "rendezvous":
                    failed_rendezvous = got
            if failed_rendezvous:
                break
            alive = [p for p in procs if p.is_alive()]  # (a rank may end between two looks)
            if alive:
                alive[0].join(0.05)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    outs = [_read(path) for path in results]
    failed_rendezvous = failed_rendezvous or next((o for o in outs if o is not None and o[0] == "rendezvous"), None)
    if failed_rendezvous:
        return failed_rendezvous
    if hung:
        raise RuntimeError(f"ranks {hung} of {world_size} did not finish in {timeout_s:.0f} s")
    for r, out in enumerate(outs):
        if out is None:
            raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} and no result")
        if out[0] != "ok":
            raise RuntimeError(f"rank {r} of {world_size} failed:\n{out[1]}")
    return "ok", [value for _, value in outs]


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
    rendezvous: Callable[[int, int, str, float, int], None] = join_gloo,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return each rank's result.

    `fn` must be importable (a module-level function) because ranks are spawned. A launch whose
    rendezvous fails is retried whole (up to `RENDEZVOUS_ATTEMPTS` launches, `timeout_s` each);
    `fn` only runs once every rank has joined, but where one rank's join failed after its peers
    joined, those peers may have started `fn`: it must not mind running again. `rendezvous` is how
    a rank joins (`join_gloo`; tests inject failures through it). Raises `RuntimeError` with the
    failing rank's traceback, or naming the ranks that did not finish in `timeout_s`.
    """
    ctx = mp.get_context("spawn")
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    failures = []
    for attempt in range(RENDEZVOUS_ATTEMPTS):
        with tempfile.TemporaryDirectory(prefix="tpcomp-ranks-") as tmp:
            status, value = _launch(ctx, fn, world_size, args, timeout_s, pg_timeout_s, env, rendezvous, attempt, tmp)
        if status == "ok":
            return value
        failures.append(value.strip().splitlines()[-1])
    raise RuntimeError(f"gloo rendezvous of {world_size} ranks failed in {RENDEZVOUS_ATTEMPTS} launches "
                       f"(fresh processes and store each): {failures}")
