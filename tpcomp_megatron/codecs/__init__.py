"""Codecs: what a compressed payload is (reference implementations)."""

from __future__ import annotations

import torch

from ..calibration import OutlierParams
from .base import REDUCED, SUPPORTED_DTYPES, Codec
from .block import BlockCodec
from .formats import FORMATS, ElementFormat
from .lowrank import LowRankCodec
from .outlier import HybridCodec, StaticOutlierCodec
from .point import GRAMMAR, CodecPoint, parse_point
from .presets import PRESETS, Preset
from .spec import BLOCK_SIZES, BlockSpec, CodecSpec, LowRankSpec, OutlierSpec, needs_calibration, parse_codec_spec


def make_codec(spec: CodecSpec | str, params: OutlierParams | torch.Tensor | None = None) -> Codec:
    """Build the codec of a spec; calibrated codecs need the layer's `params`: `OutlierParams`
    (outlier codecs) or bases `[sources, K, hidden]` (low-rank codecs)."""
    if isinstance(spec, str):
        spec = parse_codec_spec(spec)
        if spec is None:
            raise ValueError("spec 'none' has no codec: compression is off")
    if isinstance(spec, BlockSpec):
        return BlockCodec(spec)
    if isinstance(spec, OutlierSpec):
        if params is None:
            raise ValueError(f"codec {spec} needs a calibration file (tools/calibrate.py); none was given")
        return StaticOutlierCodec(spec, params) if spec.base is None else HybridCodec(spec, params)
    if isinstance(spec, LowRankSpec):
        if params is None:
            raise ValueError(f"codec {spec} needs a calibration file with bases (tools/calibrate.py); none was given")
        return LowRankCodec(spec, params)
    raise ValueError(f"not a codec spec: {spec!r}")


def calibrated_params(spec: CodecSpec, calibration, layer: str) -> OutlierParams | torch.Tensor:
    """What layer `layer`'s codec of a calibrated `spec` takes from `calibration` (a
    `tpcomp_megatron.calibration.Calibration`): outlier parameters, or low-rank bases."""
    if isinstance(spec, LowRankSpec):
        return calibration.basis(layer, spec.rank)
    if isinstance(spec, OutlierSpec):
        return calibration.params(layer)
    raise ValueError(f"codec {spec} takes nothing from a calibration file")


__all__ = [
    "BLOCK_SIZES", "FORMATS", "GRAMMAR", "PRESETS", "REDUCED", "SUPPORTED_DTYPES", "BlockCodec", "BlockSpec", "Codec",
    "CodecPoint", "CodecSpec", "ElementFormat", "HybridCodec", "LowRankCodec", "LowRankSpec", "OutlierParams", "OutlierSpec",
    "Preset", "StaticOutlierCodec", "calibrated_params", "make_codec", "needs_calibration", "parse_codec_spec",
    "parse_point",
]
