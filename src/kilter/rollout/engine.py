"""Rollout engines: who turns prompt ids into sampled responses.

The trainers only talk to the :class:`RolloutEngine` protocol, so generation can move to a
faster backend without touching the training loop:

* :class:`HFEngine` (default) calls ``transformers``' ``generate`` on the policy being trained
  (KV cache, left padding); nothing to synchronise, it *is* the policy.
* :class:`VLLMEngine` (optional, GPU) samples with vLLM and copies the policy's weights into
  it after every update.  vLLM is imported only when this engine is chosen; it is not a
  dependency of Kilter and is not exercised by the CPU test suite.

Engines return token ids only.  Log-probabilities for training are always recomputed by the
trainer in one batched forward pass (:mod:`kilter.rollout.scoring`), so every engine's
samples are scored by exactly the same code at exactly the sampling temperature.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from kilter.errors import KilterError
from kilter.rollout.generate import Generation, SamplingParams, cut_after_eos, generate_ids

EngineKind = Literal["hf", "vllm"]


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses for prompt ids; ``sync_weights`` makes it follow the trained policy."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation: ...

    def sync_weights(self, model) -> None: ...


class HFEngine:
    """Generation with the policy module itself through ``model.generate``."""

    def __init__(self, model, tokenizer, batch_size: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        return generate_ids(self.model, self.tokenizer, prompt_ids, params, batch_size=self.batch_size)

    def sync_weights(self, model) -> None:
        self.model = model


class VLLMEngine:  # pragma: no cover - needs vLLM and a GPU
    """vLLM sampling on a separate copy of the weights (``pip install vllm``; CUDA only).

    ``model_path`` must be a plain Hugging Face folder (merge LoRA adapters before using this
    engine); after each update :meth:`sync_weights` streams the policy's current weights into
    the vLLM workers.  vLLM's own per-token log-probs are ignored: the trainer rescoring the
    tokens keeps the old-policy log-probs bit-identical to what training computes at ratio 1.
    """

    def __init__(self, model_path: str, tokenizer, gpu_memory_utilization: float = 0.3, seed: int = 0) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise KilterError("rollout.engine=vllm needs vLLM installed (pip install vllm) and a CUDA GPU; "
                              "use rollout.engine=hf otherwise") from None
        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                       enable_prefix_caching=True)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        from vllm import SamplingParams as VSamplingParams

        params.check()
        sampling = VSamplingParams(
            n=1, max_tokens=params.max_new_tokens,
            temperature=params.temperature if params.do_sample else 0.0,
            top_p=params.top_p if params.do_sample else 1.0,
            top_k=params.top_k if (params.do_sample and params.top_k > 0) else -1,
            stop=params.stop_strings or None, stop_token_ids=[self.tokenizer.eos_token_id],
            include_stop_str_in_output=True, skip_special_tokens=False,
            # PAD is never sampled (as in the other engines); vLLM bounds a bias to [-100, 100]
            logit_bias={self.tokenizer.pad_token_id: -100.0},
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling, use_tqdm=False)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        responses, finished = [], []
        for out in outputs:
            ids, done = cut_after_eos(list(out.outputs[0].token_ids), eos, pad)
            responses.append(ids)
            finished.append(done or out.outputs[0].finish_reason == "stop")
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        return Generation(prompt_ids=list(prompt_ids), response_ids=responses, texts=texts, finished=finished)

    def sync_weights(self, model) -> None:
        if hasattr(model, "peft_config"):
            raise KilterError("rollout.engine=vllm does not support LoRA policies yet; use rollout.engine=hf")
        worker_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        worker_model.load_weights(model.state_dict().items())


def make_engine(kind: EngineKind, model, tokenizer, *, model_path: str | None = None, batch_size: int = 64,
                seed: int = 0) -> RolloutEngine:
    """The engine named by a config's ``rollout.engine``."""
    if kind == "hf":
        return HFEngine(model, tokenizer, batch_size=batch_size)
    if kind == "vllm":
        if model_path is None:
            raise KilterError("rollout.engine=vllm needs the policy as a Hugging Face folder")
        return VLLMEngine(model_path, tokenizer, seed=seed)
    raise KilterError(f"unknown rollout engine {kind!r}; choose hf or vllm")
