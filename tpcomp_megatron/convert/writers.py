"""Checkpoint folders: atomic output, legacy per-rank files, and torch_dist (dist_checkpointing).

Layout of a converted checkpoint (both formats loadable by Megatron-LM with `--load <format dir>`):

    OUT/tpcomp_config.json                              LlamaModelConfig
    OUT/torch_dist/latest_checkpointed_iteration.txt    "release"
    OUT/torch_dist/release/                             dist_checkpointing, reshardable
    OUT/legacy/latest_checkpointed_iteration.txt        "release"
    OUT/legacy/release/mp_rank_XX/model_optim_rng.pt    {"model": rank XX's state dict, ...}
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tpcomp_megatron.models.core.config import LlamaModelConfig

from .mapping import EXTRA_STATE_LINEARS, MappingError, merge_shards, shard_for_rank
from .safe_load import check_torch_dist

CONFIG_NAME = "tpcomp_config.json"
DIGEST_NAME = "tpcomp_config.sha256"
"""Written next to CONFIG_NAME: the digest of the config the tensors were written with, so an
edited config that still matches the tensors' shapes (4 heads x 16 -> 2 x 32) is refused."""
_UNDIGESTED = ("tokenizer", "source")  # where files live: moving them is no change to the model


def config_digest(cfg) -> str:
    """sha256 of every field of `cfg` that shapes the tensors' meaning (not where files live)."""
    import hashlib
    import json

    fields = {k: v for k, v in cfg.to_dict().items() if k not in _UNDIGESTED}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
TORCH_DIST, LEGACY = "torch_dist", "legacy"
FORMATS = (TORCH_DIST, LEGACY)
_TRACKER = "latest_checkpointed_iteration.txt"
_RELEASE = "release"
# Megatron-LM's current checkpoint_version; it only changes how very old QKV layouts are read.
_CHECKPOINT_VERSION = 3.0


def _libc_renameat2():
    """glibc's renameat2 (Linux >= 3.15, glibc >= 2.28), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_no_replace(src: Path, dest: Path) -> None:
    """Rename `src` to `dest`, failing with FileExistsError if `dest` exists, even if it appears
    at the last moment (an empty folder there would be replaced silently by a plain rename)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(err), str(dest))
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL / ENOSYS: no support here, fall back
            raise OSError(err, os.strerror(err), str(dest))
    if os.path.lexists(dest):  # without renameat2: as close as a check and a rename get
        raise FileExistsError(errno.EEXIST, "File exists", str(dest))
    os.rename(src, dest)


def check_output_vs_source(output: str | os.PathLike[str], source: str | os.PathLike[str]) -> None:
    """Refuse an output path that is the source, holds it or lies inside it (a source folder; a
    file source, e.g. GGUF, has no inside): writing there (and, with --force, replacing it) would
    destroy or mix into the model being read."""
    out, src = Path(output).resolve(), Path(source).resolve()
    if out == src or out in src.parents or (src.is_dir() and src in out.parents):
        raise ValueError(f"output {output} is, holds or lies inside the source {source}; "
                         "choose an output folder outside the source")


def _clean_stale(dest: Path) -> None:
    """Remove temporary folders this function left next to `dest` in runs that were killed (their
    process no longer exists); another live conversion's are left alone."""
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = tmp.name[len(f".{dest.name}.tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or not tmp.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


_WRITE_FAILURES = ("unexpected pos", "file write failed", "No space left on device")


def _write_failed(e: BaseException) -> bool:
    """Whether `e` is a writer running out of room: torch's zip writer says 'unexpected pos' or
    'file write failed' when the disk fills, others ENOSPC."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return isinstance(e, (RuntimeError, OSError)) and any(s in str(e) for s in _WRITE_FAILURES)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it becomes `path`, on error it is removed.

    An existing `path` is an error unless `force`; then it is replaced only after the new folder is
    complete, so a failed run never leaves a half-written or missing output. Without `force`,
    anything that appears at `path` while the folder is written (another conversion, a folder made
    by hand) is never replaced: the run fails with FileExistsError and its own output is removed.
    The temporary folder is named `.<name>.tmp-<pid>-*`; one left by a killed run is removed by the
    next run to the same path.
    """
    dest = Path(path).absolute()
    if dest.exists() and not force:
        raise FileExistsError(f"output {dest} already exists; choose another path or pass --force")
    if not dest.parent.is_dir():
        raise FileNotFoundError(
            f"the folder {dest.parent} for the output does not exist; create it"
        )
    _clean_stale(dest)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    except OSError as e:
        raise OSError(e.errno, f"cannot write in {dest.parent} ({e.strerror}); choose a writable output folder") from e
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _write_failed(e):
            raise OSError(errno.ENOSPC, f"writing the output next to {dest} failed ({str(e).strip()[:200]}); "
                          "is the disk full? Nothing was written") from e
        raise
    old = None
    if force and dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rmdir(old)
        os.rename(dest, old)
    try:
        rename_no_replace(tmp, dest)
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(dest):
            os.rename(old, dest)  # put the replaced folder back
        raise FileExistsError(f"output {dest} appeared while converting (another conversion, or a folder "
                              "made meanwhile); it was left as it is and this run's output discarded") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_tracker(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _TRACKER).write_text(_RELEASE + "\n")
    return folder / _RELEASE


def _release_dir(folder: Path) -> Path:
    tracker = folder / _TRACKER
    if not tracker.exists():
        raise FileNotFoundError(f"{folder} has no {_TRACKER}; is it a converted checkpoint folder?")
    try:
        tag = tracker.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        tag = None
    if tag != _RELEASE and not (tag or "").isdigit():
        raise ValueError(f"{tracker} must hold 'release' or an iteration number; it holds something else "
                         "(a damaged or foreign checkpoint folder)")
    return folder / (tag if tag == _RELEASE else f"iter_{int(tag):07d}")


def extra_state_keys(cfg: LlamaModelConfig) -> list[str]:
    """The `_extra_state` entries Megatron's local linears put in a state dict (value None)."""
    keys = [
        f"decoder.layers.{i}.{m}._extra_state"
        for i in range(cfg.num_layers)
        for m in EXTRA_STATE_LINEARS
    ]
    return keys + ["output_layer._extra_state"]


def write_legacy(
    folder: Path,
    cfg: LlamaModelConfig,
    global_sd: dict[str, torch.Tensor],
    on_rank: Callable[[int], None] | None = None,
) -> None:
    """Per-rank `mp_rank_XX/model_optim_rng.pt` files for TP=`cfg.tensor_parallel_size`."""
    tp = cfg.tensor_parallel_size
    release = _write_tracker(folder)
    extras = dict.fromkeys(extra_state_keys(cfg))
    for r in range(tp):
        shard: dict[str, Any] = {k: shard_for_rank(k, t, r, tp) for k, t in global_sd.items()}
        shard.update(extras)
        rank_dir = release / f"mp_rank_{r:02d}"
        rank_dir.mkdir(parents=True)
        state = {"model": shard, "checkpoint_version": _CHECKPOINT_VERSION, "iteration": 0}
        torch.save(state, rank_dir / "model_optim_rng.pt")
        if on_rank is not None:
            on_rank(r)


def load_legacy_rank(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s model state dict (no `_extra_state`), loaded with weights_only=True."""
    path = _release_dir(Path(folder)) / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; was the checkpoint written for this TP size?")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or "model" not in state:
        raise MappingError(f"{path} has no 'model' state dict")
    return {k: v for k, v in state["model"].items() if not k.endswith("._extra_state")}


def read_legacy(folder: Path, cfg: LlamaModelConfig) -> dict[str, torch.Tensor]:
    """Global tensors merged from every rank's file."""
    ranks = [load_legacy_rank(folder, r) for r in range(cfg.tensor_parallel_size)]
    keys = set(ranks[0])
    for r, sd in enumerate(ranks[1:], 1):
        if set(sd) != keys:
            raise MappingError(
                f"rank {r} holds different tensors than rank 0: {sorted(set(sd) ^ keys)[:6]}"
            )
    return {k: merge_shards(k, [sd[k] for sd in ranks]) for k in sorted(keys)}


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise MappingError(
            f"{what}: missing tensors {missing[:6]}, unexpected tensors {unexpected[:6]}"
        )


def write_torch_dist(
    folder: Path, cfg: LlamaModelConfig, global_sd: dict[str, torch.Tensor]
) -> None:
    """A dist_checkpointing checkpoint, written by one TP=1 process with the padded shapes."""
    from megatron.core import dist_checkpointing

    from tpcomp_megatron.models.core.builder import build_gpt_model

    from .megatron_env import single_rank_megatron

    release = _write_tracker(folder)
    release.mkdir()
    with single_rank_megatron():
        model = build_gpt_model(cfg, perform_initialization=False)
        _load_into(model, global_sd, "building the torch_dist checkpoint")
        state = {
            "model": model.sharded_state_dict(),
            "checkpoint_version": _CHECKPOINT_VERSION,
            "iteration": 0,
        }
        try:
            dist_checkpointing.save(state, str(release))
        except EOFError as e:
            # dist_checkpointing starts writer processes with "spawn", which re-imports __main__.
            raise RuntimeError(
                "dist_checkpointing could not start its writer processes; call the converter "
                "from under `if __name__ == '__main__':` in scripts (or use tpcomp-convert)"
            ) from e


def read_torch_dist(folder: Path, cfg: LlamaModelConfig) -> dict[str, torch.Tensor]:
    """Global tensors of a torch_dist checkpoint, loaded in one TP=1 process."""
    from tpcomp_megatron.models.core.builder import build_gpt_model

    from .megatron_env import single_rank_megatron

    with single_rank_megatron():
        model = build_gpt_model(cfg, perform_initialization=False)
        load_torch_dist_into(model, folder)
        return {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("._extra_state")
        }


def load_torch_dist_into(model: torch.nn.Module, folder: Path) -> None:
    """Load a torch_dist checkpoint into a built model at the current TP size (any size)."""
    from megatron.core import dist_checkpointing

    release = _release_dir(Path(folder))
    check_torch_dist(release)  # before anything of it is unpickled
    sharded = model.sharded_state_dict()
    _check_torch_dist_tensors(sharded, dist_checkpointing.load_tensors_metadata(str(release)), release)
    loaded = dist_checkpointing.load({"model": sharded}, str(release))  # type: ignore[operator]
    _load_into(model, loaded["model"], f"loading {release}")


def _check_torch_dist_tensors(sharded: dict, stored: dict, release: Path) -> None:
    """The checkpoint's tensors against the model's, both ways, by name and global shape (layers
    are an axis of the stacked layer tensors): a loader reads only what the model asks for, so a
    config that describes fewer layers than were stored would silently drop the rest."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    # tensors and tensor factories (GLU weights are stored through one) by key; shapes where known
    want = {t.key: tuple(getattr(t, "global_shape", ())) for t in nested_values(sharded)
            if hasattr(t, "key") and "_extra_state" not in t.key}
    have = {k: tuple(t.global_shape) for k, t in stored.items()
            if hasattr(t, "global_shape") and "_extra_state" not in k}
    problems = []
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing:
        problems.append(f"missing tensors {missing[:6]}")
    if extra:
        problems.append(f"tensors the config does not describe {extra[:6]}")
    wrong = [f"{k}: stored {have[k]}, config {want[k]}" for k in sorted(set(want) & set(have))
             if want[k] and want[k] != have[k]]
    if wrong:
        problems.append(f"shapes that differ {wrong[:4]}")
    if problems:
        raise MappingError(f"{release} does not match its {CONFIG_NAME}: " + "; ".join(problems))
