"""The policy to train and its frozen reference, for the trainers that compare the two (DPO, KTO)."""

from __future__ import annotations

from kilter.distributed import DistInfo
from kilter.errors import ConfigError
from kilter.models import load_causal_lm, load_tokenizer
from kilter.models.lora import apply_lora, enable_gradient_checkpointing
from kilter.models.reference import Reference


def load_policy(cfg, info: DistInfo):
    """(tokenizer, policy, reference) for DPO/KTO: the reference is built before any update."""
    tokenizer = load_tokenizer(cfg.model)
    max_length = getattr(getattr(cfg, "data", None), "max_length", None)
    model = load_causal_lm(cfg.model, tokenizer, max_length=max_length)
    ref_model = None
    if cfg.ref_model is not None:
        ref_model = load_causal_lm(cfg.ref_model, tokenizer)
        if ref_model.get_input_embeddings().weight.shape[0] != model.get_input_embeddings().weight.shape[0]:
            raise ConfigError(f"ref_model {cfg.ref_model} has a different vocabulary size than model {cfg.model}")
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(info.device)
    model.train()
    if ref_model is not None:
        ref_model.to(info.device)
    return tokenizer, model, Reference(model, ref_model)
