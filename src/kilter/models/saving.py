"""Saving and restoring model weights in Hugging Face format (LoRA merged or kept as adapters)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from kilter.errors import KilterError
from kilter.models.lora import is_peft


def save_model(model, tokenizer, path: Path, merge_lora: bool = False) -> None:
    """Save in Hugging Face format; with ``merge_lora`` a LoRA model is merged into plain weights."""
    if is_peft(model) and merge_lora:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(path, safe_serialization=True)
    elif is_peft(model):  # the adapter being trained; not auxiliary ones (models/value.py's critic placeholders)
        model.save_pretrained(path, safe_serialization=True, selected_adapters=list(model.active_adapters))
    else:
        model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def load_trainable_weights(model, path: Path) -> None:
    """Restore weights written by ``save_model`` (without merge) into an identical model."""
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(Path(path) / "adapter_model.safetensors")))
        return
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise KilterError(f"checkpoint {path} has no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if really_missing or unexpected:
        raise KilterError(f"checkpoint {path} does not match the model (missing {really_missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
