"""Model loading, the tiny built-in model, presets, heads and LoRA."""

from kilter.models.loading import ensure_pad_token, load_causal_lm, load_tokenizer, resolve_model_path

__all__ = ["ensure_pad_token", "load_causal_lm", "load_tokenizer", "resolve_model_path"]
