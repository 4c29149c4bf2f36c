"""Inference: greedy generation with a KV cache, tokenizers, and compression comparisons."""
