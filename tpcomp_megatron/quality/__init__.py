"""Accuracy of compressed TP communication on real models: simulated TP, calibration, evaluation.

simtp (partial sums of TP=N in one process) -> calib (statistics, outlier channels, per-layer
codecs) -> sweep / metrics (perplexity, top-1 agreement, KL against the uncompressed model) ->
realtp (the same on real gloo ranks through apply_tp_compression) -> calibrate_cli / eval_cli
(`tpcomp-calibrate`, `tpcomp-eval-quality`). models / text fetch the real models and texts.
"""

from .calib import PartialSumStats, build_calibration, layer_codecs
from .simtp import SimulatedTP, exact_sum, megatron_name, simulated_all_reduce

__all__ = ["PartialSumStats", "SimulatedTP", "build_calibration", "exact_sum", "layer_codecs", "megatron_name",
           "simulated_all_reduce"]
