"""LoRA adapters through peft, and gradient checkpointing: what turns a loaded model into a trainable one."""

from __future__ import annotations

import torch
from pydantic import Field

from kilter.config import BaseConfig
from kilter.errors import ConfigError


class LoraSection(BaseConfig):
    """Low-rank adapters through peft: only the adapters train; the base stays frozen."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = Field(8, gt=0)
    """Adapter rank."""
    alpha: float = Field(16.0, gt=0)
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or 'all-linear'."""
    merge_on_save: bool = True
    """Merge the adapters into the base weights when writing final/ (loads with plain transformers)."""


def apply_lora(model, lora: LoraSection, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model
    from peft.utils.error import PeftError

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type=task_type,
                        modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
    try:
        return get_peft_model(model, config)
    except (PeftError, ValueError) as exc:
        # a module name the model does not have (or a module LoRA cannot adapt): say which names exist
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and name})
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"lora.target_modules={lora.target_modules!r} does not fit this model ({first}); its linear "
                          f"layers are {', '.join(linear) or 'none'} (or use all-linear)") from None


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def enable_gradient_checkpointing(model) -> None:
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_peft(model):
        model.enable_input_require_grads()


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_parameters(model) -> str:
    """"1.23M of 4.56M parameters trainable", for a run's start-up line."""
    trainable, total = count_parameters(model)
    return f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable"
