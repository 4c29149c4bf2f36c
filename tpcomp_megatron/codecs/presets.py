"""Preset codec names: `--tp-comm-compression fp4 | fp6 | fp8`, no calibration needed.

Each preset is one block-codec spec, chosen from the measured accuracy records in
`benchmarks/results/` (4088 tokens of Moby Dick, perplexity increase against the uncompressed
model, simulated TP unless said otherwise). The spec strings stay the expert form: a preset name
parses to exactly its spec (`parse_codec_spec('fp6') == parse_codec_spec('fp6_e2m3/b32/e8m0')`).

| preset | spec | bits/value | SmolLM2-135M | Gemma 3 270M | record |
|---|---|---|---|---|---|
| fp8 | fp8_e4m3/b32/e8m0up | 8.25 | TP=8 +0.95%, KL 0.0077 | (e8m0 scale) TP=8 +0.95% | quality_smollm2-135m_cpu-amd-epyc_2026-11-23.jsonl |
| fp6 | fp6_e2m3/b32/e8m0 | 6.25 | TP=2 +0.96% (real ranks +1.08%), TP=8 +0.53% | TP=8 -0.11% (1533 tokens) | quality_smollm2-135m_cpu-amd-epyc_2026-11-23.jsonl, quality_gemma3-270m_cpu-amd-epyc_2026-11-23.jsonl |
| fp4 | fp4_e2m1/b32/e6m2 | 4.25 | TP=2 +14.3%, TP=8 +8.75%; with error feedback TP=2 +6.3%, TP=8 +4.1% | TP=8 +12.1%; with error feedback +6.1% | quality_smollm2-135m_cpu-amd-epyc_2026-11-2{3,4}.jsonl, quality_gemma3-270m_cpu-amd-epyc_2026-11-24.jsonl |

Why these: `fp8` takes the round-up E8M0 scale (`e8m0up`), which never saturates a block's
largest value (the OCP rule's `e8m0` cost FP8 +1.60% on SmolLM2 at TP=8, KL 0.012); `fp6` is the
most compressive uniform codec within 1% on both models; `fp4` takes the E6M2 scale, which
halves FP4's cost against E8M0 (+29.6% -> +14.3% at TP=2) at the same bits. Small models are far
more sensitive than the 7-70B models of the papers: on them FP4 is for use with
`--tp-comm-error-feedback` or a per-layer plan (`tpcomp-sensitivity --allocate`, a recipe file).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named codec spec and the measurement that backs it."""

    spec: str
    """The expert spec string the name stands for."""
    record: str
    """The results file(s) under benchmarks/results/ the choice was made from."""
    accuracy: str
    """The measured perplexity increase, as the record gives it."""


PRESETS: dict[str, Preset] = {
    "fp8": Preset(spec="fp8_e4m3/b32/e8m0up", record="quality_smollm2-135m_cpu-amd-epyc_2026-11-23.jsonl",
                  accuracy="SmolLM2-135M TP=8: +0.95% perplexity, KL 0.0077"),
    "fp6": Preset(spec="fp6_e2m3/b32/e8m0", record="quality_smollm2-135m_cpu-amd-epyc_2026-11-23.jsonl",
                  accuracy="SmolLM2-135M TP=2: +0.96% (real ranks +1.08%), TP=8: +0.53%; Gemma 3 270M TP=8: -0.11%"),
    "fp4": Preset(spec="fp4_e2m1/b32/e6m2", record="quality_smollm2-135m_cpu-amd-epyc_2026-11-24.jsonl",
                  accuracy="SmolLM2-135M TP=8: +8.75%, with error feedback +4.06%; Gemma 3 270M TP=8: +12.1%, "
                           "with error feedback +6.08%"),
}
