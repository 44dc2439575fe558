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
        adapted = get_peft_model(model, config)
    except (PeftError, ValueError) as exc:
        # a module name the model does not have (or a module LoRA cannot adapt): say which names exist
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and name})
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"lora.target_modules={lora.target_modules!r} does not fit this model ({first}); its linear "
                          f"layers are {', '.join(linear) or 'none'} (or use all-linear)") from None
    fuse_lora(adapted)
    return adapted


def _fused_class():
    """peft's LoRA ``Linear`` with the adapter's B product, its scaling and the sum in one ``addmm``."""
    global _FUSED
    if _FUSED is not None:
        return _FUSED
    from peft.tuners.lora import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        """``base(x) + s * B(A(dropout(x)))`` as ``base(x).addmm_(A(dropout(x)), B^T, alpha=s)``.

        peft computes the sum in three passes over the (tokens, out) output -- the B product, the
        multiplication by s, the addition -- plus a multiplication in the backward; ``addmm_``
        accumulates the product into the base output in place, scaled, in one kernel, and its
        backward scales only the rank-r gradients.  Same function (float rounding aside).  Anything
        else (adapters disabled or merged, several adapters, DoRA and other variants, a LoRA bias,
        peft's mixed-batch ``adapter_names``, a dtype mismatch outside autocast) runs peft's own forward.
        """

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if args or kwargs or self.disable_adapters or self.merged:
                return super().forward(x, *args, **kwargs)
            active = [name for name in self.active_adapters if name in self.lora_A]
            if len(active) != 1 or active[0] in self.lora_variant or self.lora_B[active[0]].bias is not None:
                return super().forward(x, *args, **kwargs)
            name = active[0]
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            autocast = torch.is_autocast_enabled(x.device.type)
            if not autocast and not (self.base_layer.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
                return super().forward(x)
            result = self.base_layer(x).contiguous()  # a fresh output already: no copy
            h = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
            w = lora_b.weight.t()
            if autocast:  # autocast casts for addmm, not for the in-place addmm_
                h, w = h.to(result.dtype), w.to(result.dtype)
            result.view(-1, result.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), w, alpha=self.scaling[name])
            return result

    FusedLoraLinear.__qualname__ = "FusedLoraLinear"  # picklable as kilter.models.lora.FusedLoraLinear
    _FUSED = FusedLoraLinear
    return _FUSED


_FUSED = None


def __getattr__(name: str):
    if name == "FusedLoraLinear":  # built on first use, so importing this module does not import peft
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fuse_lora(model) -> int:
    """Turn the model's plain-``nn.Linear`` LoRA layers into :func:`_fused_class` layers; how many.

    Checked once on the first layer against peft's forward (outputs and the gradients of x, A and
    B on a probe); a mismatch keeps peft's layers (fast path ``fused_lora``).  Only the forward
    changes: the modules keep their weights, names and peft's type, so saving, merging and
    ``disable_adapter()`` work as before.
    """
    from peft.tuners.lora import Linear as LoraLinear

    from kilter import fastpaths

    fused = _fused_class()
    layers = [m for m in model.modules() if type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear
              and not m.fan_in_fan_out]
    if not layers:
        return 0
    first = layers[0]
    name = next(iter(first.lora_A))
    weight = first.base_layer.weight
    probe = torch.randn(2, 3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)

    def run(forward) -> list[torch.Tensor]:
        x = probe.clone().requires_grad_(True)
        params = [first.lora_A[name].weight, first.lora_B[name].weight]
        saved = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            y = forward(first, x)
            grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1]).to(y)).sum(), [x, *params],
                                        allow_unused=True)
        finally:
            for p, flag in zip(params, saved):
                p.requires_grad_(flag)
        return [y.detach(), *[torch.zeros(()) if g is None else g for g in grads]]

    b = first.lora_B[name].weight
    kept = b.detach().clone()
    try:
        with torch.no_grad():  # B is zero after peft's init: check with a random one, then put it back
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)).to(b) * 0.1)
        with torch.enable_grad():
            want, got = run(LoraLinear.forward), run(fused.forward)
        ok = all(torch.allclose(g, w, atol=1e-5, rtol=1e-4) for g, w in zip(got, want))
        reason = "" if ok else "its fused forward gives other outputs or gradients than peft's"
    except fastpaths.PROBE_ERRORS as exc:
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    finally:
        with torch.no_grad():
            b.copy_(kept)
    if not fastpaths.decide("fused_lora", ok, reason):
        return 0
    for module in layers:
        module.__class__ = fused
    return len(layers)


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
