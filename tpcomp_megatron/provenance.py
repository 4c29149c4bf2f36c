"""Where a record, calibration file or recipe came from: this package's version and, where it runs
from a git checkout, that checkout's commit (never the commit of whatever folder the user stands
in); a GGUF model by what its header says it is, not by its file name."""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def checkout_commit() -> str | None:
    """The short commit of the checkout this package runs from (`-dirty` with uncommitted changes
    to tracked files), or None for an installed copy (site-packages, a wheel)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != PACKAGE_DIR.parent:  # a folder inside some other repository
        return None
    rev = _git("rev-parse", "--short", "HEAD")
    if rev is None:
        return None
    return rev + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def provenance() -> dict:
    """{"version": the package's, "git": the checkout's commit or None}."""
    return {"version": __version__, "git": checkout_commit()}


def gguf_model_name(path: str | Path) -> str:
    """`<general.name> (<architecture>, <size label>)` from a GGUF file's header, e.g.
    'Smollm2 135M 8k Lc100K Mix1 Ep2 (llama, 135M)'; the file name stands in for a missing name."""
    from .convert.gguf_header import read_gguf_metadata

    meta = read_gguf_metadata(path, stop=lambda key: key.startswith("tokenizer."))
    name = meta.get("general.name") or Path(path).name
    details = [str(meta[k]) for k in ("general.architecture", "general.size_label") if meta.get(k)]
    return f"{name} ({', '.join(details)})" if details else str(name)


def source_model_name(source: str | Path) -> str:
    """How records name a model given by path: a GGUF file by its header, a folder by its name."""
    path = Path(source)
    return gguf_model_name(path) if path.suffix == ".gguf" and path.is_file() else path.name
