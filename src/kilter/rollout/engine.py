"""Rollout engines: who turns prompt ids into sampled responses.

The trainers and commands only talk to the :class:`RolloutEngine` protocol, so generation can
move to a faster backend without touching their loops:

* :class:`HFEngine` (``hf``, default) samples with the policy module itself: Kilter's own
  KV-cached sampler where it supports the model, else ``transformers``' ``generate``; nothing
  to synchronise, it *is* the policy.
* :class:`kilter.rollout.vllm_engine.VLLMEngine` (``vllm``) samples with vLLM in the same
  process, on its own copy of the weights, which :meth:`sync_weights` refreshes after every
  policy update (LoRA merged first).  vLLM is imported only when this engine is chosen; it is
  not a dependency of Kilter (``make vllm-venv`` builds a venv with its CPU build).
* :class:`kilter.rollout.vllm_client.VLLMServerEngine` (``vllm-server``) sends the prompts to a
  ``kilter vllm-serve`` process (other devices, another node) over HTTP and pushes the weights
  to it after every update.

Engines return token ids.  Log-probabilities for training are always recomputed by the
trainer in one batched forward pass (:mod:`kilter.rollout.scoring`), so every engine's samples
are scored by exactly the same code at exactly the sampling temperature; the vLLM engines also
return their own per-token log-probs (``Generation.extras["logprobs"]``), which
:func:`engine_logp_maxdiff` compares with the trainer's as a check of the weight sync.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from pydantic import Field, model_validator

from kilter.config import BaseConfig
from kilter.errors import ConfigError, KilterError
from kilter.rollout.generate import Generation, SamplingParams, generate_ids

VLLM_NOT_INSTALLED = ("rollout.engine=vllm needs vLLM installed (pip install vllm on a CUDA machine; "
                      "`make vllm-venv` builds a CPU venv for trying it); use rollout.engine=hf otherwise")

EngineKind = Literal["hf", "vllm", "vllm-server"]
ENGINE_KINDS: tuple[str, ...] = ("hf", "vllm", "vllm-server")


class EngineOptions(BaseConfig):
    """The engine fields every sampling config shares (``rollout.engine`` in ppo, ``engine`` in bon/eval/sample)."""

    engine: EngineKind = "hf"
    """Generation backend: hf (the model itself: Kilter's sampler or transformers generate), vllm (vLLM in this process; weights synced after every update) or vllm-server (a `kilter vllm-serve` process at vllm_url). See docs/rollout.md."""
    vllm_url: str | None = None
    """engine=vllm-server: the server's address, e.g. http://127.0.0.1:8100."""
    vllm_eager: bool = False
    """engine=vllm: skip vLLM's torch.compile / CUDA graphs (start-up in seconds instead of about a minute, slower decoding)."""
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """engine=vllm on a GPU: share of its memory vLLM may take (weights + KV cache), the rest is the trainer's."""

    @model_validator(mode="after")
    def _server_needs_url(self):
        if self.engine == "vllm-server" and not self.vllm_url:
            raise ValueError("engine vllm-server needs vllm_url, the address where `kilter vllm-serve` listens "
                             "(e.g. http://127.0.0.1:8100)")
        return self

    def check_available(self) -> None:
        """Fail before anything is written when the chosen engine cannot run here."""
        import importlib.util

        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise KilterError(VLLM_NOT_INSTALLED)

    def engine_fields(self) -> dict:
        """These fields as keywords, to hand the same choice on to another command's config."""
        return {name: getattr(self, name) for name in EngineOptions.model_fields}

    def engine_kwargs(self) -> dict:
        return dict(url=self.vllm_url, enforce_eager=self.vllm_eager,
                    gpu_memory_utilization=self.vllm_gpu_memory_utilization)


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses for prompt ids; ``sync_weights`` makes it follow the trained policy."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation: ...

    def sync_weights(self, model) -> None: ...


class HFEngine:
    """Generation with the policy module itself (Kilter's sampler, or ``model.generate``)."""

    def __init__(self, model, tokenizer, batch_size: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        return generate_ids(self.model, self.tokenizer, prompt_ids, params, batch_size=self.batch_size)

    def sync_weights(self, model) -> None:
        self.model = model

    def close(self) -> None:
        pass


def request_seeds(n: int) -> list[int]:
    """Per-request sampling seeds drawn from torch's global RNG.

    vLLM has its own random state; drawing its seeds from torch's makes a vLLM rollout follow the
    same seeding as the other engines (``torch.manual_seed`` before a call fixes its samples, and
    a resumed run draws the same ones again).
    """
    base = int(torch.randint(0, 2**31 - 1 - n, (1,)))
    return [base + i for i in range(n)]


def engine_logp_maxdiff(gen: Generation, logp: torch.Tensor, mask: torch.Tensor) -> float | None:
    """max |engine log-prob - trainer log-prob| over the response tokens; None when the engine gives none.

    ``logp`` and ``mask`` are the trainer's (N, R) grid (:func:`kilter.rollout.scoring.assemble`
    layout).  Only a check: training always uses the trainer's log-probs.  A large value means the
    engine samples from other weights than the trainer's (a failed weight sync), another
    distribution (top-p/top-k truncation, which the engine's log-probs include), or another
    precision.
    """
    engine_logp = gen.extras.get("logprobs")
    if engine_logp is None:
        return None
    grid = torch.zeros(mask.shape, dtype=torch.float64)
    for i, row in enumerate(engine_logp):
        width = min(len(row), grid.shape[1])
        grid[i, :width] = torch.tensor(row[:width], dtype=torch.float64)
    keep = mask.detach().cpu() > 0
    if not bool(keep.any()):
        return 0.0
    return float((grid - logp.detach().cpu().double()).abs()[keep].max())


def make_engine(kind: EngineKind, model, tokenizer, *, model_path: str | None = None, batch_size: int = 64,
                seed: int = 0, url: str | None = None, max_model_len: int | None = None,
                gpu_memory_utilization: float = 0.3, enforce_eager: bool = False,
                dtype: str = "fp32") -> RolloutEngine:
    """The engine named by a config's ``engine`` / ``rollout.engine``.

    ``model`` is the policy module (the hf engine samples with it; vllm takes its first weights
    from ``model_path``; a server, which may hold another run's weights, gets ``model``'s at once;
    both follow ``model`` through :meth:`sync_weights`).
    """
    if kind == "hf":
        if model is None:
            raise KilterError("the hf engine needs the model loaded")
        return HFEngine(model, tokenizer, batch_size=batch_size)
    if kind == "vllm":
        if model_path is None:
            raise KilterError("rollout.engine=vllm needs the policy as a Hugging Face folder")
        from kilter.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, tokenizer, seed=seed, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                          dtype=dtype)
    if kind == "vllm-server":
        if not url:
            raise ConfigError("engine vllm-server needs the server's address: set vllm_url "
                              "(e.g. rollout.vllm_url=http://127.0.0.1:8100), where `kilter vllm-serve` listens")
        from kilter.rollout.vllm_client import VLLMServerEngine

        server = VLLMServerEngine(url, tokenizer, model_path=model_path)
        if model is not None:
            server.sync_weights(model)
        return server
    raise KilterError(f"unknown rollout engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")


def load_engine(options: EngineOptions, model_spec: str, tokenizer, *, device: str = "cpu", dtype: str = "fp32",
                batch_size: int = 64, seed: int = 0, max_model_len: int | None = None):
    """``(engine, model)`` for a command that samples from a model spec (bon, sample, eval).

    The hf engine loads the model (returned too); the vLLM engines load nothing in this process
    (``model`` is None) and take the weights from the spec's folder.
    """
    from kilter.models.loading import load_causal_lm, resolve_model_path

    if options.engine == "hf":
        model = load_causal_lm(model_spec, tokenizer, dtype=dtype, device=device)
        model.eval()
        return HFEngine(model, tokenizer, batch_size=batch_size), model
    path = resolve_model_path(model_spec)
    engine = make_engine(options.engine, None, tokenizer, model_path=path, batch_size=batch_size, seed=seed,
                         max_model_len=max_model_len, dtype=dtype, **options.engine_kwargs())
    if options.engine == "vllm-server":
        # the server holds whatever it was last given: send it this model's weights
        model = load_causal_lm(model_spec, tokenizer, dtype="fp32", device="cpu")
        engine.sync_weights(model)
        del model
    return engine, None


def close_engine(engine) -> None:
    """Release what an engine holds (vLLM's KV cache and weights) before the next model loads."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()
