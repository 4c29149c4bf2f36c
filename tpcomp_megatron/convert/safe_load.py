"""Refuse a torch_dist checkpoint whose pickled parts would run code when loaded.

dist_checkpointing (torch's distributed checkpoint) unpickles a checkpoint's `.metadata` with plain
`pickle`, its `common.pt` with `torch.load`, and every non-tensor item stored in the `.distcp` files
(extra states) with `torch.load(weights_only=False)`: a tampered checkpoint runs code on every rank
that loads it. Before any of that, `check_torch_dist` reads those same bytes with loaders that
build only data: `.metadata` with an unpickler that resolves nothing but the distributed-checkpoint
metadata classes, torch.Size, dtypes and layouts; `common.pt` and each stored item with
`torch.load(weights_only=True)`. Anything else is refused, naming the file and what it asked for.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds a pickle that would run code (or build objects) beyond plain data."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes a distributed-checkpoint `.metadata` is made of (classes defined
    in torch's checkpoint metadata, planner and filesystem modules; torch.Size; dtypes; layouts)."""

    def find_class(self, module: str, name: str):
        obj = None
        if module in _DCP_MODULES:
            import importlib

            candidate = getattr(importlib.import_module(module), name, None)
            if isinstance(candidate, type) and candidate.__module__ == module:
                obj = candidate
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        elif (module, name) in _ALLOWED:
            obj = super().find_class(module, name)
        if obj is None:
            raise UnsafeCheckpoint(f"it asks for {module}.{name}")
        return obj


def _weights_only(data: bytes, where: str) -> None:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"{where} holds a pickle that torch.load(weights_only=True) refuses, so loading "
                               f"it would run code or build arbitrary objects ({str(e).splitlines()[0]}); the "
                               "checkpoint is refused: re-convert it from its Hugging Face source") from None


def check_torch_dist(release: Path) -> None:
    """Raise UnsafeCheckpoint (a ValueError) unless every pickled part of the torch_dist checkpoint
    in `release` is plain data; nothing in it is executed to find out."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    path = release / ".metadata"
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"{path} would run code when loaded ({e}); the checkpoint is refused: "
                               "re-convert it from its Hugging Face source") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a distributed-checkpoint metadata file ({type(e).__name__}: {e})") from None
    if not hasattr(meta, "state_dict_metadata") or not hasattr(meta, "storage_data"):
        raise ValueError(f"{path} is not a distributed-checkpoint metadata file")
    common = release / "common.pt"
    if common.exists():
        _weights_only(common.read_bytes(), str(common))
    storage = getattr(meta.storage_data, "values", lambda: [])()
    for info in storage:  # tensor items too: a read outside the folder is refused before any read
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or (release / rel).resolve().parent != release.resolve():
            raise UnsafeCheckpoint(f"{path} points a stored item outside the checkpoint ({rel!r})")
    for fqn, item in meta.state_dict_metadata.items():
        if not isinstance(item, BytesStorageMetadata):
            continue  # tensors are raw bytes, never unpickled
        info = meta.storage_data.get(MetadataIndex(fqn))
        if info is None:
            raise ValueError(f"{path}: no storage for the stored item {fqn!r}")
        file = release / info.relative_path
        if file.resolve().parent != release.resolve():
            raise UnsafeCheckpoint(f"{path} points item {fqn!r} outside the checkpoint ({info.relative_path})")
        with open(file, "rb") as f:
            f.seek(info.offset)
            _weights_only(f.read(info.length), f"{file} (item {fqn!r})")
