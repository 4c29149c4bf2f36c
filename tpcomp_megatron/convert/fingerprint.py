"""A short fingerprint of a model source (Hugging Face folder or GGUF file), for caching conversions.

A cache keyed by the folder's name alone serves one model's conversion for another that happens to
sit in a folder of the same name. The fingerprint covers what a conversion reads: the bytes of the
config files (small) and, for the weight and tokenizer files (large), their names, sizes and
modification times; a GGUF file by its size, time and first MiB (its header and metadata).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CONTENT = ("config.json", "generation_config.json", "tokenizer_config.json")
_HEAD_BYTES = 1 << 20


def source_fingerprint(source: str | os.PathLike[str]) -> str:
    """16 hex digits that change whenever a conversion of `source` could."""
    path = Path(source)
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(_HEAD_BYTES))
        return h.hexdigest()[:16]
    if not path.is_dir():
        raise FileNotFoundError(f"model source {source} does not exist")
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        st = file.stat()
        h.update(f"{file.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if file.name in _CONTENT:
            h.update(file.read_bytes())
    return h.hexdigest()[:16]
