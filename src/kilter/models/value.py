"""PPO critics over the policy's own weights: ``SharedBaseCritic`` (the LoRA policy's frozen base with the
critic's own adapter and head, ``value.model=shared``) and ``TrunkValueHead`` (a head on the policy's
own hidden states, ``value.model=trunk``, at the end of this module).

With LoRA, PPO's usual critic is a second full model (the reward model or the policy's
backbone, plus its own adapters): a second copy of every frozen weight in memory.  Here the
critic is instead the *policy's* decoder run with a second peft adapter (``value``) in place of
the policy's, plus a ``Linear(hidden, 1)`` head.  Only the adapter and the head are the
critic's parameters; the base weights exist once.

How the two adapters stay apart:

* the critic's adapter weights are :class:`SharedBaseCritic`'s own parameters (registered only
  here, so the policy's optimizer, gradient clipping and checkpoints never see them).  peft
  holds a same-shaped ``kilter_critic`` adapter in the policy whose weights are placeholders
  (frozen, never saved: :func:`kilter.models.saving.save_model` writes the active adapter only):
  for the critic's forward they are swapped for the critic's own with
  :func:`torch.func.functional_call`, and that adapter is the active one (peft's
  ``set_adapter``); afterwards the policy's
  adapter is active again and every ``requires_grad`` flag is what it was.  The autograd graph
  of the critic's forward reaches only the critic's parameters, so a value loss moves nothing
  of the policy and a policy loss nothing of the critic;
* the adapter has the policy's rank and target modules, no dropout (values are regressed on,
  never sampled), and starts as peft starts one (B = 0): at the start the critic reads the
  policy's own hidden states, and the head starts at zero, so V = 0 everywhere.

The critic looks like a ``*ForSequenceClassification`` to the rest of Kilter: ``.model`` is its
body (the decoder run with the adapter), ``.score`` its head, ``.config`` the policy's config,
and its forward pools at the last non-PAD token.  So :func:`kilter.models.reward.token_values`,
the packed and shared-prefix fast paths (:func:`kilter.models.packed.fast_reward_model`) and
:func:`kilter.models.saving.save_model` / ``load_trainable_weights`` work on it unchanged.  Its
saved folder (``critic.safetensors`` + ``critic.json``) holds the adapter and the head only:
it is loaded back into a critic over the same policy, not as a standalone model.

Not combinable with gradient checkpointing: a checkpointed block recomputes its forward in the
backward pass, after the critic's weights were swapped back out.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from torch import nn

from kilter.errors import ConfigError

ADAPTER = "kilter_critic"
CRITIC_FILE = "critic.safetensors"
CRITIC_CONFIG = "critic.json"


def _key(name: str) -> str:
    """A parameter name as a ParameterDict key (no dots allowed)."""
    return name.replace(".", "__")


class _Body(nn.Module):
    """The critic's trunk: the policy's decoder with the critic's adapter.  Registers nothing (the
    decoder belongs to the policy, the adapter weights to the critic)."""

    def __init__(self, critic: SharedBaseCritic):
        super().__init__()
        object.__setattr__(self, "_critic", critic)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **kwargs):  # type: ignore[override]
        return self._critic.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False, **kwargs)


class SharedBaseCritic(nn.Module):
    """V(s_t) from the LoRA policy's frozen base with the critic's own adapter and head.

    ``policy`` is the peft-wrapped causal LM being trained (it gains an inactive ``adapter``
    whose weights are placeholders).  ``forward(input_ids, attention_mask, position_ids)`` returns an
    object with ``logits`` (B, 1): the head at each row's last non-PAD token, as a reward model
    would; per-token values come from :func:`kilter.models.reward.token_values`.
    """

    base_model_prefix = "model"

    def __init__(self, policy: nn.Module, adapter: str = ADAPTER):
        super().__init__()
        if not hasattr(policy, "peft_config"):
            raise ConfigError("value.model=shared shares the LoRA policy's frozen base: set lora.enabled=true "
                              "(or use value.model=policy for a separate critic)")
        base = policy.get_base_model()
        if getattr(base, "is_gradient_checkpointing", False):
            raise ConfigError("value.model=shared cannot be combined with gradient_checkpointing=true (the "
                              "recomputed forward would not see the critic's adapter); turn one of them off")
        if adapter in policy.peft_config:
            raise ConfigError(f"the policy already has an adapter named {adapter!r}")
        config = copy.deepcopy(policy.peft_config[policy.active_adapter])
        config.lora_dropout, config.modules_to_save = 0.0, None
        policy.add_adapter(adapter, config)
        decoder = base.get_decoder()
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_decoder", decoder)
        self.adapter_name = adapter
        names = [n for n, _ in decoder.named_parameters() if f".{adapter}." in n]
        if not names:
            raise ConfigError(f"LoRA put no adapter weights into the decoder of {type(base).__name__}")
        own = dict(decoder.named_parameters())
        self._names = names
        self.adapter = nn.ParameterDict({_key(n): nn.Parameter(own[n].detach().clone()) for n in names})
        for n in names:  # the placeholders never train
            own[n].requires_grad_(False)
        hidden = base.get_input_embeddings().weight.shape[1]
        weight = base.get_input_embeddings().weight
        self.score = nn.Linear(hidden, 1, bias=True, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():  # V = 0 everywhere at the start
            self.score.weight.zero_()
            self.score.bias.zero_()
        self.model = _Body(self)

    # ------------------------------------------------------------------ what Kilter reads

    @property
    def config(self):
        return self._policy.config

    def get_input_embeddings(self):
        return self._policy.get_input_embeddings()

    @contextlib.contextmanager
    def _critic_adapter(self):
        """The critic's adapter active in the shared decoder; everything as it was afterwards."""
        flags = [(p, p.requires_grad) for p in self._decoder.parameters()]
        before = list(self._policy.active_adapters)
        self._policy.base_model.set_adapter(self.adapter_name)
        try:
            yield
        finally:
            self._policy.base_model.set_adapter(before)
            for p, flag in flags:
                p.requires_grad_(flag)

    def trunk(self, **inputs):
        """The decoder's output (``last_hidden_state`` ...) with the critic's adapter."""
        weights = {n: self.adapter[_key(n)] for n in self._names}
        with self._critic_adapter():
            return torch.func.functional_call(self._decoder, weights, args=(), kwargs=inputs, strict=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **kwargs):  # type: ignore[override]
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)[0]
        scores = self.score(hidden)
        pad = self.config.pad_token_id
        if pad is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:  # the last non-PAD token, as transformers' sequence classifiers pool
            columns = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (columns * (input_ids != pad)).argmax(-1)
        return SequenceClassifierOutputWithPast(logits=scores[torch.arange(len(last), device=last.device), last])

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        """``critic.safetensors`` (adapter + head) and ``critic.json``; what
        :func:`kilter.models.saving.load_trainable_weights` reads back into a critic over the same policy."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / CRITIC_FILE))
        lora = self._policy.peft_config[self.adapter_name]
        (path / CRITIC_CONFIG).write_text(json.dumps({
            "kind": "kilter-shared-critic", "adapter": self.adapter_name, "r": lora.r, "lora_alpha": lora.lora_alpha,
            "target_modules": sorted(lora.target_modules) if isinstance(lora.target_modules, set)
            else lora.target_modules,
            "note": "the critic's LoRA adapter and value head over the policy's frozen base; not a standalone model",
        }, indent=1) + "\n")


# --------------------------------------------------------------------------- value head on the policy's trunk

TRUNK_KIND = "kilter-trunk-value-head"


class TrunkValueHead(nn.Module):
    """V(s_t) = a ``Linear(hidden, 1)`` head on the *policy's own* last hidden states (``value.model=trunk``).

    The classic shared-trunk actor-critic (Ziegler et al. 2019's lm-human-preferences, TRL's old
    ``AutoModelForCausalLMWithValueHead``): one forward of the policy gives both the token log-probs
    and the values, and the value loss backpropagates into the policy's trainable weights (its LoRA
    adapters, or all of them without LoRA) beside the policy loss, weighted by ``value.vf_coef``.
    So the critic costs one head per token instead of a second forward and backward of the base.

    The head is this module's only parameter (zero at the start: V = 0 everywhere).  It reads the
    decoder's output through a forward hook (:meth:`reading`) for the one forward a scoring call
    makes, so every path that runs the policy's decoder -- the padding-free and shared-prefix
    wrappers, the plain padded forward -- hands it its hidden states unchanged.  Gradient
    checkpointing works (blocks recompute inside the decoder; its output is what the head read).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        base = policy.get_base_model() if hasattr(policy, "peft_config") else policy
        try:
            decoder = base.get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        if not isinstance(decoder, nn.Module) or decoder is base:
            raise ConfigError(f"value.model=trunk reads the decoder's hidden states, but {type(base).__name__} "
                              "has no separable decoder; use value.model=policy")
        object.__setattr__(self, "_policy", policy)  # not registered: the policy is not the head's
        object.__setattr__(self, "_decoder", decoder)
        weight = base.get_input_embeddings().weight
        self.score = nn.Linear(weight.shape[1], 1, bias=True, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():  # V = 0 everywhere at the start
            self.score.weight.zero_()
            self.score.bias.zero_()

    @property
    def config(self):
        return self._policy.config

    @contextlib.contextmanager
    def reading(self):
        """Inside: every output of the policy's decoder is appended to the yielded list, as its
        last hidden states (B, T, H) with their graph."""
        seen: list[torch.Tensor] = []

        def keep(module, args, output):
            seen.append(output[0])

        handle = self._decoder.register_forward_hook(keep)
        try:
            yield seen
        finally:
            handle.remove()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(..., H) hidden states -> (...) values."""
        return self.score(hidden)[..., 0]

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        """``critic.safetensors`` (the head) and ``critic.json``; read back by
        :func:`kilter.models.saving.load_trainable_weights` into a head over the same policy."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / CRITIC_FILE))
        (path / CRITIC_CONFIG).write_text(json.dumps({
            "kind": TRUNK_KIND, "hidden_size": self.score.in_features,
            "note": "a value head on the policy's last hidden states (the policy beside it); not a standalone model",
        }, indent=1) + "\n")
