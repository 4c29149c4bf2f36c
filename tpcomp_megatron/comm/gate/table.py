"""Measured gate tables: what `tpcomp-tune` wrote on a machine, and how the gate reads it.

A table belongs to one machine and software stack, its key: the device (GPU name, or 'cpu'), the
world size, the link class, the torch / NCCL versions and the table format (`FORMAT`, raised only
when what a table means changes: upgrading tpcomp-megatron keeps a measured table). For each message size a model
sends (tokens x hidden) it holds the slowest rank's time per call of every path measured: the exact
all-reduce the gate falls back to ('exact'), PyTorch's lossless symmetric-memory all-reduces where
they ran, and each compressed (codec, algorithm, transport), eager and (on CUDA) under CUDA-graph
replay. The gate compresses a message only where the compressed path was measured faster than the
exact one, by the table's margin, in every mode, at the measured sizes on both sides of it.

Tables are read from a path (`--tp-comm-gate-table`) or from a cache folder
(`~/.cache/tpcomp-megatron/gate/`, one file per key: a changed key field finds no file, and the
stale files of the same device, world size and link are removed when looked up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = 2
"""Version of what a table holds and how the gate reads it (1: keyed by the project's version)."""
EXACT = "exact"
"""The path name of the exact collective the gate falls back to (`dist.all_reduce`)."""
MODES = ("eager", "graph")
WHY_FASTER = "gate table: the exact all-reduce was measured faster at this size"
WHY_SMALL = "gate table: below the smallest measured size"


def path_name(codec: str, algorithm: str, transport: str) -> str:
    """The table's name of a compressed all-reduce path."""
    return f"{codec} {algorithm} {transport}"


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


@dataclass(frozen=True, kw_only=True)
class TableKey:
    """The machine and software a table was measured on; a table serves only a run with the same."""

    device: str
    """GPU name as torch reports it, or 'cpu'."""
    world_size: int
    link: str
    """Link class (`links.LINKS`) the measurement ran over."""
    torch: str
    nccl: str
    """NCCL version, or 'none' where the group is not NCCL."""
    format: int = FORMAT
    """The table format it was measured for (`FORMAT`)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            want = int if f.name in ("world_size", "format") else str
            value = getattr(self, f.name)
            if not isinstance(value, want) or isinstance(value, bool) or value == "":
                raise ValueError(f"gate table key field {f.name!r}: expected a non-empty {want.__name__}, got {value!r}")
        if self.world_size < 1:
            raise ValueError(f"gate table key: world_size must be >= 1, got {self.world_size}")

    @classmethod
    def current(cls, world_size: int, link: str, backend: str) -> "TableKey":
        """This process's key for a group of `world_size` ranks of `backend` over `link`."""
        nccl = backend == "nccl"
        gpu = backend != "gloo" and torch.cuda.is_available()  # NCCL, or a stand-in group on the GPU
        return cls(device=torch.cuda.get_device_name(torch.cuda.current_device()) if gpu else "cpu",
                   world_size=world_size, link=link, torch=torch.__version__,
                   nccl=_nccl_version() if nccl else "none")

    def differences(self, run: "TableKey") -> list[str]:
        """'field: table X, this run Y' for every field where `run` differs."""
        return [f"{f.name}: table {getattr(self, f.name)!r}, this run {getattr(run, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(run, f.name)]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def slot(self) -> tuple:
        """What a cache file is for (device, world size, link); the versions decide if it is current."""
        return self.device, self.world_size, self.link


@dataclass(frozen=True, kw_only=True)
class SizeRow:
    """One message size: the slowest rank's ms per call of each path, per mode."""

    tokens: int
    hidden: int
    ms: dict
    """path name -> {mode: ms}."""

    def __post_init__(self) -> None:
        for name in ("tokens", "hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**40:
                raise ValueError(f"size row field {name!r} must be an integer in [1, 2**40), got {value!r:.40}")
        if not isinstance(self.ms, dict) or not all(isinstance(m, dict) for m in self.ms.values()):
            raise ValueError("size row field 'ms' must map each path to {mode: ms}")
        for path, modes in self.ms.items():
            for mode, t in modes.items():
                # a zero, negative or infinite time would make a path win (or lose) everywhere
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
                    raise ValueError(f"size row {self.tokens} x {self.hidden}: time of {path!r} {mode} must be a "
                                     f"positive finite number of ms, got {t!r:.40}")

    @property
    def nbytes(self) -> int:
        """The bf16 message's bytes (the gate's size measure for every dtype)."""
        return self.tokens * self.hidden * 2

    def wins(self, path: str, margin: float, extra: float = 1.0) -> bool:
        """Whether `path`, its time multiplied by `extra` (error feedback's work), beats the exact
        all-reduce by `margin` in every mode both were measured in."""
        mine, exact = self.ms.get(path, {}), self.ms[EXACT]
        modes = [m for m in MODES if m in mine and m in exact]
        return bool(modes) and all(mine[m] * extra * (1 + margin) <= exact[m] for m in modes)


@dataclass(frozen=True, kw_only=True)
class GateTable:
    """A measured table (`tpcomp-tune`); `why_exact` is the gate's answer from it."""

    key: TableKey
    rows: tuple
    """`SizeRow`s, sorted by message size."""
    margin: float = 0.05
    """How much faster (a fraction) compression must be measured to be chosen: timing noise."""
    meta: dict = field(default_factory=dict, compare=False)
    """Provenance (date, command, model, layers, git): not part of the identity."""
    source: str = field(default="", compare=False)
    """Where it was read from (for messages)."""
    digest: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, TableKey):
            raise ValueError(f"gate table key must be a TableKey, got {type(self.key).__name__}")
        if not self.rows:
            raise ValueError(f"gate table {self.source}: no measured sizes")
        rows = tuple(sorted(self.rows, key=lambda r: (r.nbytes, r.tokens)))
        if any(EXACT not in r.ms for r in rows):
            raise ValueError(f"gate table {self.source}: every size needs the '{EXACT}' path's time")
        if not 0 <= self.margin < 1:
            raise ValueError(f"gate table margin must be in [0, 1), got {self.margin}")
        object.__setattr__(self, "rows", rows)
        ident = json.dumps({"key": dataclasses.asdict(self.key), "margin": self.margin,
                            "rows": [dataclasses.asdict(r) for r in rows]}, sort_keys=True)
        object.__setattr__(self, "digest", hashlib.sha256(ident.encode()).hexdigest()[:16])

    @property
    def paths(self) -> list[str]:
        return sorted({p for r in self.rows for p in r.ms})

    def measures(self, path: str) -> bool:
        return all(path in r.ms for r in self.rows)

    def why_exact(self, path: str, nbytes: int, extra: float = 1.0) -> str | None:
        """Why a message of `nbytes` (bf16) must take the exact all-reduce rather than `path` (a
        path it `measures`), or None: compressed only where the measured sizes on both sides of it
        (or the size itself, or, above the largest, the largest) measured `path` faster."""
        if not self.measures(path):
            raise ValueError(f"gate table {self.source or self.digest} did not measure {path}")
        below = [r for r in self.rows if r.nbytes <= nbytes]
        if not below:
            return WHY_SMALL
        above = next((r for r in self.rows if r.nbytes >= nbytes), below[-1])
        if not (below[-1].wins(path, self.margin, extra) and above.wins(path, self.margin, extra)):
            return WHY_FASTER
        return None

    def refusal(self, run: TableKey) -> str | None:
        """Why this table cannot serve a run whose key is `run`, or None."""
        diff = self.key.differences(run)
        if not diff:
            return None
        return (f"gate table {self.source or self.digest} was measured on another setup ({'; '.join(diff)}): "
                "run tpcomp-tune on this machine with this world size, or pass --tp-comm-gate-table seed")

    # -- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        rows = []
        for r in self.rows:
            winners = {p: ("compressed" if r.wins(p, self.margin) else "exact") for p in r.ms if p != EXACT}
            rows.append(dict(dataclasses.asdict(r), bytes=r.nbytes, winner=winners))
        return {"format": FORMAT, "key": dataclasses.asdict(self.key), "margin": self.margin, "meta": self.meta,
                "digest": self.digest, "rows": rows}

    @classmethod
    def from_dict(cls, doc: dict, source: str = "") -> "GateTable":
        where = source or "gate table"
        try:
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, this version reads format {FORMAT}")
            rows = tuple(SizeRow(tokens=r["tokens"], hidden=r["hidden"],
                                 ms={str(p): {str(m): float(t) for m, t in modes.items()} for p, modes in r["ms"].items()})
                         for r in doc["rows"])
            margin = doc.get("margin", 0.05)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)):
                raise ValueError(f"margin must be a number, got {margin!r:.40}")
            return cls(key=TableKey(**doc["key"]), rows=rows, margin=float(margin),
                       meta=dict(doc.get("meta", {})), source=source)
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError, RecursionError) as e:
            raise ValueError(f"{where} is not a tpcomp-tune table ({type(e).__name__}: {e}); "
                             "rewrite it with tpcomp-tune") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GateTable":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"gate table {p} not found; write one with tpcomp-tune --out {p}")
        try:
            doc = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise ValueError(f"gate table {p} is not JSON we read ({type(e).__name__}: {e}); rewrite it with "
                             "tpcomp-tune") from None
        if not isinstance(doc, dict):
            raise ValueError(f"gate table {p} is not a JSON object; rewrite it with tpcomp-tune")
        return cls.from_dict(doc, str(p))

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(p)  # atomic: a reader never sees half a table
        return p


# -- the cache -----------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where tables are cached: $XDG_CACHE_HOME (default ~/.cache)/tpcomp-megatron/gate."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tpcomp-megatron" / "gate"


def cache_path(key: TableKey, root: Path | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{key.device}-w{key.world_size}-{key.link}").strip("-").lower()
    return (root or cache_dir()) / f"{slug}-{key.digest()}.json"


def invalidate_stale(key: TableKey, root: Path | None = None) -> list[str]:
    """Remove cached tables of `key`'s device, world size and link measured under another key
    (new torch or NCCL version, another table format); returns one line per table removed, naming
    the fields."""
    root = root or cache_dir()
    removed = []
    for p in sorted(root.glob("*.json")) if root.is_dir() else ():
        try:
            doc = json.loads(p.read_text())["key"]
            if doc.get("format", 1) != FORMAT:  # an older format: keyed by the project's version
                doc = {k: v for k, v in doc.items() if k != "project"} | {"format": doc.get("format", 1)}
            old = TableKey(**doc)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            continue  # not ours, or being written: leave it
        if old.slot() == key.slot() and old != key:
            p.unlink(missing_ok=True)
            removed.append(f"{p.name} ({'; '.join(old.differences(key))})")
    return removed


def store_in_cache(table: GateTable, root: Path | None = None) -> Path:
    invalidate_stale(table.key, root)
    return table.save(cache_path(table.key, root))


def find_in_cache(key: TableKey, root: Path | None = None) -> tuple[GateTable | None, str]:
    """(the cached table measured under exactly `key`, or None; a line saying what was found)."""
    removed = invalidate_stale(key, root)
    note = f"; invalidated {', '.join(removed)}" if removed else ""
    p = cache_path(key, root)
    if not p.is_file():
        return None, f"no cached table for {key.device}, world size {key.world_size}, link {key.link} in {p.parent}{note}"
    table = GateTable.load(p)
    if table.key != key:  # a file renamed or edited by hand
        return None, f"cached table {p} holds another key ({'; '.join(table.key.differences(key))}){note}"
    return table, f"cached measured table {p} ({table.digest}){note}"


SEED = "seed"
"""`--tp-comm-gate-table seed`: ignore any table, use the seed thresholds."""


def choose_table(choice: str | None, key: TableKey, root: Path | None = None) -> tuple[GateTable | None, str]:
    """The table a run uses, and the sentence to log once about the gate's source: `choice` a path
    (that table, whatever its key: a mismatch is refused later, naming the field), 'seed' (none), or
    None (the cache's table for `key`, else none)."""
    if choice == SEED:
        return None, "seed thresholds (--tp-comm-gate-table seed)"
    if choice is not None:
        table = GateTable.load(choice)
        return table, f"measured table {choice} ({table.digest})"
    table, note = find_in_cache(key, root)
    if table is None:
        return None, f"seed thresholds (conservative): {note}; run tpcomp-tune to measure this machine"
    return table, note
