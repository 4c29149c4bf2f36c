"""Command-line flags for compression, usable as Megatron-LM's `extra_args_provider`.

    from tpcomp_megatron.args import add_args, config_from_args
    initialize_megatron(extra_args_provider=add_args)          # Megatron-LM scripts
    handle = apply_tp_compression(model, config_from_args(get_args()))

With a plain `argparse` parser it works the same way (`add_args(parser)` returns the parser).
"""

from __future__ import annotations

import argparse

from .codecs import GRAMMAR, PRESETS, parse_codec_spec, parse_point
from .comm import ALGORITHMS, LINKS, TRANSPORTS
from .megatron.config import ROW_LAYERS, CompressionConfig


def _checked(parse):
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return check


_spec = _checked(parse_codec_spec)
_point = _checked(parse_point)


def _override(text: str) -> tuple[str, str]:
    pattern, eq, spec = text.rpartition("=")
    if not eq or not pattern:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PATTERN=SPEC, e.g. 'decoder.layers.0.*=fp8_e4m3/b32/e8m0up'")
    return pattern, _spec(spec)


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("tpcomp-megatron", "compressed tensor-parallel communication")
    g.add_argument("--tp-comm-compression", type=_point, default="none", metavar="SPEC",
                   help=f"codec of the row-parallel all-reduce / reduce-scatter: a preset ({', '.join(PRESETS)}; "
                        "no calibration needed) or an expert spec, e.g. fp4_e2m1/b32/e8m0, int4/b16/bf16, "
                        "outlier_int4/k64, outlier+fp4_e2m1/b32, lowrank+fp4_e2m1/b32/e6m2/r4, optionally with the "
                        f"evaluation tools' options ({GRAMMAR}); 'none' (default) is exact")
    g.add_argument("--tp-comm-compression-layers", nargs="+", choices=sorted(ROW_LAYERS),
                   default=["linear_proj", "linear_fc2"], help="which row-parallel layers to compress")
    g.add_argument("--tp-comm-compression-override", type=_override, action="append", default=[],
                   metavar="PATTERN=SPEC", help="codec for the row-parallel layers whose names match the glob "
                   "PATTERN (first match wins; SPEC may be 'none'); repeatable, e.g. the most sensitive layers "
                   "found by tpcomp-sensitivity: 'decoder.layers.0.*=fp8_e4m3/b32/e8m0up'")
    g.add_argument("--tp-comm-gather-compression", type=_spec, default="none", metavar="SPEC",
                   help="block codec of the sequence-parallel all-gather (default none)")
    g.add_argument("--tp-comm-calibration", default=None, metavar="PATH",
                   help="calibration file from tools/calibrate.py (outlier and low-rank codecs need one)")
    g.add_argument("--tp-comm-recipe", default=None, metavar="PATH",
                   help="a recipe file (tpcomp-calibrate --recipe, tpcomp-sensitivity --allocate --recipe): every "
                        "layer's codec, error feedback and calibration data, checked against the model and TP size "
                        "and applied as one unit (instead of the codec flags)")
    g.add_argument("--tp-comm-error-feedback", action="store_true",
                   help="each rank carries its quantization error into its next compressed reduction "
                        "(same bits; errors cancel along depth instead of adding up)")
    g.add_argument("--tp-comm-algorithm", choices=ALGORITHMS, default="auto")
    g.add_argument("--tp-comm-link", choices=("auto",) + LINKS, default="auto",
                   help="link class for the size gate (default: detected)")
    g.add_argument("--tp-comm-transport", choices=TRANSPORTS, default="auto",
                   help="how one-shot payloads travel: symmetric memory (NVLink peers read each other's slot), "
                        "NCCL's all-gather, or auto (symm_mem on NVLink; NCCL, said once, where it cannot run)")
    g.add_argument("--tp-comm-min-bytes", type=int, default=None, metavar="N",
                   help="compress messages of at least N bytes (bf16), overriding the measured gate; 0 = always")
    g.add_argument("--tp-comm-gate-table", default=None, metavar="PATH",
                   help="the gate's measured table (written by tpcomp-tune on this machine); 'seed': the seed "
                        "thresholds; default: the cached table matching this device, world size, link and "
                        "versions (~/.cache/tpcomp-megatron/gate/), else the seed thresholds")
    g.add_argument("--tp-comm-gate-probe", choices=("auto", "on", "off"), default="auto",
                   help="without a measured table: time a few collectives over the group at startup and let the "
                        "gate follow them (auto: on NCCL groups when no --tp-comm-min-bytes is given)")
    return parser


def config_from_args(args: argparse.Namespace) -> CompressionConfig:
    """The `CompressionConfig` the flags describe (raises ValueError on inconsistent flags)."""
    return CompressionConfig(
        spec=args.tp_comm_compression,
        layers=tuple(args.tp_comm_compression_layers),
        gather_spec=args.tp_comm_gather_compression,
        calibration=args.tp_comm_calibration,
        algorithm=args.tp_comm_algorithm,
        link=args.tp_comm_link,
        transport=args.tp_comm_transport,
        min_bytes=args.tp_comm_min_bytes,
        overrides=tuple(args.tp_comm_compression_override),
        error_feedback=args.tp_comm_error_feedback,
        recipe=args.tp_comm_recipe,
        gate_table=args.tp_comm_gate_table,
        gate_probe={"auto": None, "on": True, "off": False}[args.tp_comm_gate_probe],
    )
