"""Codec spec strings <-> typed, validated configs.

Grammar (parts separated by '/', order free after the first):

* ``none``: no compression.
* Block codec (arXiv 2411.09510): ``<element>[/b<block>][/<scale>]``, e.g. ``fp4_e2m1/b32/e8m0``,
  ``int4/b16/bf16``. Defaults: block 32, scale e8m0.
* Static outlier codec (arXiv 2411.07942): ``outlier_int4[/k<N>]``: one channel in N (default 64)
  travels in bf16, the rest as 4-bit codes with calibrated per-channel ranges.
* Hybrid: ``outlier+<block spec>[/k<N>]``, e.g. ``outlier+fp4_e2m1/b32``: calibrated outlier
  channels in bf16, every other channel through the block codec.
* Low-rank: ``lowrank+<block spec>[/r<K>][/c<element>]``, e.g. ``lowrank+fp4_e2m1/b32/e6m2/r4``:
  each row's coordinates on K calibrated directions travel in bf16 or, with ``/c<element>``,
  block-coded like the residual (same block size and scale type, that element format; K a
  multiple of the block size), the rest of the row through the block codec (codecs/lowrank.py).
  Default K = 4.
* Presets (codecs/presets.py): ``fp4``, ``fp6``, ``fp8``, each the name of one block spec above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .formats import FORMATS
from .presets import PRESETS

BLOCK_SIZES = (8, 16, 32, 64, 128)
SCALE_BITS = {"e8m0": 8, "e8m0up": 8, "e6m2": 8, "e6m2d": 4, "bf16": 16}
"""Bits of a block's own scale (`e6m2d`: a 4-bit delta, plus one E6M2 byte per DELTA_GROUP values)."""
E8M0_SCALES = ("e8m0", "e8m0up")
DELTA_GROUP = 128
"""Values per shared E6M2 byte of the `e6m2d` scale type."""
OUTLIER_INT4 = "outlier_int4"
HYBRID_PREFIX = "outlier+"
LOWRANK_PREFIX = "lowrank+"
MAX_RANK = 128


@dataclass(frozen=True, kw_only=True)
class BlockSpec:
    """Microscaling block codec: one shared scale per `block` consecutive values of a row."""

    element: str
    """Element format, one of `FORMATS`."""
    block: int = 32
    """Values per shared scale; one of `BLOCK_SIZES`."""
    scale: str = "e8m0"
    """'e8m0' (power of two, OCP MX rule), 'e8m0up' (power of two rounded up: no saturation),
    'e6m2' (8-bit unsigned float, 2 mantissa bits), 'e6m2d' (the same scales, as 4-bit deltas from
    one E6M2 byte per 128 values; codecs/block.py) or 'bf16'."""

    def __post_init__(self) -> None:
        if self.element not in FORMATS:
            raise ValueError(f"unknown element format {self.element!r}; valid: {sorted(FORMATS)}")
        if self.block not in BLOCK_SIZES:
            raise ValueError(f"block size {self.block} not supported; valid: {list(BLOCK_SIZES)}")
        if self.scale not in SCALE_BITS:
            raise ValueError(f"unknown scale type {self.scale!r}; valid: {sorted(SCALE_BITS)}")
        if self.scale == "e6m2d" and self.block >= DELTA_GROUP:
            raise ValueError(f"e6m2d scales are deltas within groups of {DELTA_GROUP} values: the block "
                             f"size {self.block} must be smaller")

    @property
    def unit(self) -> int:
        """Values a row length must be a multiple of: the block, or e6m2d's group."""
        return DELTA_GROUP if self.scale == "e6m2d" else self.block

    def bits_per_value(self, hidden: int | None = None) -> float:
        group = 8 / DELTA_GROUP if self.scale == "e6m2d" else 0.0
        return FORMATS[self.element].bits + SCALE_BITS[self.scale] / self.block + group

    def __str__(self) -> str:
        return f"{self.element}/b{self.block}/{self.scale}"


@dataclass(frozen=True, kw_only=True)
class OutlierSpec:
    """Calibrated outlier channels in bf16; the rest static INT4 (`base=None`) or a block codec."""

    ratio: int = 64
    """One channel in `ratio` is an outlier: k = ceil(hidden / ratio)."""
    base: BlockSpec | None = None
    """None: static per-channel 4-bit codes (the paper's method). A BlockSpec: the hybrid."""

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, int) or self.ratio < 2:
            raise ValueError(f"outlier ratio k{self.ratio} must be an integer >= 2 (k64: 1/64)")

    def num_outliers(self, hidden: int) -> int:
        return -(-hidden // self.ratio)

    def bits_per_value(self, hidden: int) -> float:
        # Outlier slots stay in the low-bit part as dead codes: simpler, aligned kernels for
        # 4 bits x k extra per row (0.06 bits/value at k = hidden/64).
        low = 4.0 if self.base is None else self.base.bits_per_value()
        return low + 16.0 * self.num_outliers(hidden) / hidden

    def __str__(self) -> str:
        if self.base is None:
            return f"{OUTLIER_INT4}/k{self.ratio}"
        return f"{HYBRID_PREFIX}{self.base}/k{self.ratio}"


@dataclass(frozen=True, kw_only=True)
class LowRankSpec:
    """A block codec on what is left of each row after its projection on `rank` calibrated
    directions; the row's `rank` coordinates travel in bf16 (`coords` None) or block-coded with
    element format `coords` and the base's block size and scale type."""

    base: BlockSpec
    rank: int = 4
    coords: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"low-rank r{self.rank}: the rank must be an integer in [1, {MAX_RANK}]")
        if self.coords is not None:
            if self.coords not in FORMATS:
                raise ValueError(f"unknown coordinate format c{self.coords!r}; valid: {sorted(FORMATS)}")
            if self.rank % self.base.block:
                raise ValueError(f"r{self.rank} with coded coordinates (/c{self.coords}): the rank must be a "
                                 f"multiple of the block size {self.base.block}")

    @property
    def coord_spec(self) -> BlockSpec | None:
        """How the coordinates are coded (None: bf16). A row of K coordinates is too short for
        e6m2d's groups: they take plain E6M2 scales."""
        if self.coords is None:
            return None
        scale = "e6m2" if self.base.scale == "e6m2d" else self.base.scale
        return BlockSpec(element=self.coords, block=self.base.block, scale=scale)

    def coord_bits(self) -> float:
        """Bits of one row's coordinates."""
        per = 16.0 if self.coords is None else self.coord_spec.bits_per_value()
        return per * self.rank

    def bits_per_value(self, hidden: int) -> float:
        return self.base.bits_per_value() + self.coord_bits() / hidden

    def __str__(self) -> str:
        return f"{LOWRANK_PREFIX}{self.base}/r{self.rank}" + ("" if self.coords is None else f"/c{self.coords}")


CodecSpec = Union[BlockSpec, OutlierSpec, LowRankSpec]
CALIBRATED = (OutlierSpec, LowRankSpec)
"""Spec types whose codecs need a calibration file."""


def needs_calibration(spec: CodecSpec | None) -> bool:
    return isinstance(spec, CALIBRATED)

_VALID = (
    "a preset (" + ", ".join(PRESETS) + "), 'none', '<element>[/b<block>][/<scale>]' (elements: "
    + ", ".join(sorted(FORMATS))
    + f"; blocks: {', '.join(map(str, BLOCK_SIZES))}; scales: e8m0, e8m0up, e6m2, e6m2d, bf16), "
    "'outlier_int4[/k<N>]', 'outlier+<block spec>[/k<N>]' or 'lowrank+<block spec>[/r<K>][/c<element>]'"
)


def _number(digits: str) -> int:
    """ASCII digits only: `int()` also takes '٣٢', '+32', ' 32' and '3_2', which a spec must not
    (two ranks spelling one spec two ways, or a typo taken as a size)."""
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 6:
        raise ValueError
    return int(digits)


def parse_codec_spec(text: str) -> CodecSpec | None:
    """Parse a spec string; `None` means no compression. Raises ValueError naming valid choices."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty codec spec; valid forms: {_VALID}")
    if not text.isascii():  # lower() maps some non-ASCII letters onto ASCII ones (the Kelvin sign to 'k')
        raise ValueError(f"codec spec {text!r} holds non-ASCII characters; valid forms: {_VALID}")
    s = text.strip().lower()
    if s == "none":
        return None
    if s in PRESETS:
        return parse_codec_spec(PRESETS[s].spec)
    hybrid = s.startswith(HYBRID_PREFIX)
    lowrank = s.startswith(LOWRANK_PREFIX)
    prefix = HYBRID_PREFIX if hybrid else LOWRANK_PREFIX if lowrank else ""
    parts = s[len(prefix):].split("/")
    head, opts = parts[0], parts[1:]
    block = scale = ratio = rank = coords = None
    for opt in opts:
        try:
            if opt in SCALE_BITS and scale is None:
                scale = opt
            elif opt.startswith("b") and block is None:
                block = _number(opt[1:])
            elif opt.startswith("k") and ratio is None:
                ratio = _number(opt[1:])
            elif opt.startswith("r") and rank is None:
                rank = _number(opt[1:])
            elif opt.startswith("c") and coords is None and len(opt) > 1:
                coords = opt[1:]
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"bad or repeated part {opt!r} in codec spec {text!r}; valid forms: {_VALID}") from None
    try:
        if rank is not None and not lowrank:
            raise ValueError("'/r<K>' (rank) needs the 'lowrank+' prefix")
        if coords is not None and not lowrank:
            raise ValueError("'/c<element>' (coordinate format) needs the 'lowrank+' prefix")
        if head == OUTLIER_INT4 and not prefix:
            if block is not None or scale is not None:
                raise ValueError(f"{OUTLIER_INT4} has static per-channel scales: drop '/b..' and the scale type")
            return OutlierSpec(ratio=64 if ratio is None else ratio)
        if head in FORMATS:
            base = BlockSpec(element=head, block=32 if block is None else block, scale=scale or "e8m0")
            if hybrid:
                return OutlierSpec(ratio=64 if ratio is None else ratio, base=base)
            if ratio is not None:
                raise ValueError("'/k<N>' (outlier ratio) needs the 'outlier+' prefix")
            if lowrank:
                return LowRankSpec(base=base, rank=4 if rank is None else rank, coords=coords)
            return base
    except ValueError as e:
        raise ValueError(f"invalid codec spec {text!r}: {e}; valid forms: {_VALID}") from None
    raise ValueError(f"unknown codec {head!r} in spec {text!r}; valid forms: {_VALID}")
