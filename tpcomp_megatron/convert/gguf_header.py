"""Read a GGUF file's metadata keys without touching its tensors.

transformers (and gguf's `GGUFReader`) parse the whole header in Python, a tokenizer of 150k
entries included, before anything can be checked; the converter only needs a few scalar keys
(`general.architecture`, `<arch>.attention.key_length`) to refuse an unsupported model at once.
This reader walks the key-value section with `struct`, skips arrays without decoding them, and
stops at the first key it does not need to read on from (the tokenizer keys come last in files
written by llama.cpp). `read_gguf_header` also reads the tensor list that follows (names,
dimensions, types; never the data), for the size checks in `gguf_source`.
Layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO, Callable

_MAGIC = b"GGUF"
# GGUF value types -> struct format (8: string, 9: array are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DEPTH = 8  # arrays of arrays: llama.cpp writes none deeper than 2


class GGUFHeaderError(ValueError):
    """The file is not a GGUF file, or its header is cut short."""


class _Reader:
    def __init__(self, f: BinaryIO, order: str, path: str) -> None:
        self.f, self.order, self.path = f, order, path
        self.size = os.fstat(f.fileno()).st_size

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise GGUFHeaderError(f"{self.path}: the GGUF header is cut short; re-download the file")
        return struct.unpack(self.order + fmt, data)[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > self.size - self.f.tell():  # a corrupt length: refuse before reading (or allocating) it
            raise GGUFHeaderError(f"{self.path}: a GGUF header string of {n} bytes runs past the end of the "
                                  f"file ({self.size} bytes): the file is corrupt or cut short")
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFHeaderError(f"{self.path}: the GGUF header is cut short; re-download the file")
        return data.decode("utf-8", errors="replace")

    def skip(self, n: int, what: str) -> None:
        """Seek `n` bytes on, refusing a length past the end of the file (a seek would take it, or
        overflow: 'cannot fit int into an offset-sized integer', OSError 22)."""
        if n > self.size - self.f.tell():
            raise GGUFHeaderError(f"{self.path}: a GGUF header {what} of {n} bytes runs past the end of the file "
                                  f"({self.size} bytes): the file is corrupt or cut short")
        self.f.seek(n, os.SEEK_CUR)

    def skip_string(self) -> None:
        self.skip(self.unpack("Q"), "string")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _ARRAY:
            if depth >= _MAX_DEPTH:
                raise GGUFHeaderError(f"{self.path}: GGUF header arrays nested deeper than {_MAX_DEPTH}: the file is corrupt")
            etype, n = self.unpack("I"), self.unpack("Q")
            if etype in _SCALARS:
                self.skip(n * struct.calcsize(_SCALARS[etype]), "array")
            else:
                if n > (self.size - self.f.tell()) // 8:  # every string or array element takes 8 bytes or more
                    raise GGUFHeaderError(f"{self.path}: a GGUF header array of {n} elements runs past the end of "
                                          "the file: the file is corrupt or cut short")
                for _ in range(n):
                    self.skip_value(etype, depth + 1)
            return None
        raise GGUFHeaderError(f"{self.path}: unknown GGUF value type {vtype}")

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        if vtype == _STRING:
            self.skip_string()
        else:
            self.value(vtype, depth)


def read_gguf_metadata(
    path: str | os.PathLike[str], *, stop: Callable[[str], bool] = lambda key: False
) -> dict[str, Any]:
    """The metadata keys of a GGUF file up to the first key for which `stop(key)` holds, as
    {key: value}; arrays are skipped (value None). No tensor is read."""
    return _read(str(path), stop, tensors=False)[0]


def read_gguf_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], int]]]:
    """Every metadata key (arrays as None) and every tensor's (dims, GGML type) by name, dims in
    GGUF order (the fastest-varying first: `token_embd.weight` is (hidden, vocab)). No tensor data
    is read; a header whose tensor list cannot fit the file is refused."""
    return _read(str(path), lambda key: False, tensors=True)


_MAX_DIMS = 4  # GGML_MAX_DIMS
_MIN_TENSOR_INFO = 24  # name length (8), dimension count (4), type (4), offset (8)


def _read(path: str, stop: Callable[[str], bool], *, tensors: bool
          ) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], int]]]:
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise GGUFHeaderError(f"{path} is not a GGUF file (no GGUF magic); is it complete?")
        r = _Reader(f, "<", path)
        version = r.unpack("I")
        if version & 0xFFFF == 0:  # a big-endian file read little-endian
            r.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise GGUFHeaderError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors = r.unpack("Q")
        n_kv = r.unpack("Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            if stop(key):
                break
            meta[key] = r.value(r.unpack("I"))
        infos: dict[str, tuple[tuple[int, ...], int]] = {}
        if tensors:
            if n_tensors > (r.size - f.tell()) // _MIN_TENSOR_INFO:
                raise GGUFHeaderError(f"{path}: the GGUF header lists {n_tensors} tensors, more than the file can "
                                      "describe: the file is corrupt or cut short")
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.unpack("I")
                if not 1 <= n_dims <= _MAX_DIMS:
                    raise GGUFHeaderError(f"{path}: GGUF tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} "
                                          "are possible): the file is corrupt")
                dims = tuple(r.unpack("Q") for _ in range(n_dims))
                infos[name] = (dims, r.unpack("I"))
                r.unpack("Q")  # data offset
    return meta, infos
