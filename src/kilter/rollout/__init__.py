"""Batched generation (KV cache) behind an engine interface; HF generate by default."""
