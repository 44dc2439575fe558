"""vLLM as the rollout engine, colocated with the trainer (``rollout.engine=vllm``).

vLLM keeps its own copy of the policy's weights.  After every update :meth:`VLLMEngine.sync_weights`
copies the trainer's weights into it -- a LoRA policy merged first (W + scale * B A, computed
without touching the trained adapters) -- through vLLM's in-place ``reload_weights`` worker call:

* in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor, what this engine
  sets up by default) the tensors are handed over as an iterator, no copy on disk;
* with vLLM's engine in other processes (``tensor_parallel_size > 1``, or multiprocessing
  switched back on) they are written once to a safetensors file that the workers read.

Older recipes call the worker model's ``load_weights`` directly; in vLLM 0.32 that fails after the
first load (the layers are post-processed in place), ``reload_weights`` undoes and redoes it.

Sampling matches the other engines: temperature / top-p / top-k as given, no repetition
penalties, PAD never sampled (a -100 logit bias, the bound vLLM allows), responses cut after the
first EOS.  Each request's seed is drawn from torch's RNG (:func:`request_seeds`), so
``torch.manual_seed`` fixes a vLLM rollout as it does the others.  vLLM's own log-probs
(``logprobs_mode=processed_logprobs``: after the PAD bias and the temperature, as the trainer
scores) come back in ``Generation.extras["logprobs"]`` for :func:`engine_logp_maxdiff`.

This module imports vLLM, so only the engine factory imports it, and only when asked.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from kilter.errors import ConfigError, KilterError
from kilter.rollout.engine import VLLM_NOT_INSTALLED, request_seeds
from kilter.rollout.generate import Generation, SamplingParams, cut_after_eos

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Kilter's precision names -> vLLM's dtype names."""


def import_vllm():
    """The ``vllm`` module, or a one-line error saying how to get it."""
    try:
        import vllm
    except ImportError:
        raise KilterError(VLLM_NOT_INSTALLED) from None
    return vllm


def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the plain model the policy stands for, in Hugging Face checkpoint names.

    A peft LoRA model yields its merged weights (base + scale * B @ A per adapted layer), computed on
    the fly: the trained model and its adapters are left as they are.  Tensors are detached views or
    new tensors; nothing is copied that does not have to be.
    """
    if not hasattr(model, "peft_config"):
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for module_name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            with torch.no_grad():
                weight = module.get_base_layer().weight.detach()
                for adapter in adapters:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{module_name}.weight"] = weight
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        yield plain, merged.get(plain, tensor.detach())


def separate_cpu_tensors(weights) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` on the CPU, contiguous, none sharing memory with another (as safetensors requires).

    Tied weights (an LM head that *is* the embedding matrix) are kept under both names, copied apart:
    vLLM's in-place reload expects every module's weights, and leaves a tied head it was not given
    half-reloaded (wrong logits).
    """
    out: dict[str, torch.Tensor] = {}
    storages_seen: set[int] = set()
    for name, tensor in weights:
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in storages_seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        storages_seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def vllm_sampling_params(params: SamplingParams, eos_id: int, pad_id: int | None, seed: int | None = None,
                         logprobs: bool = True):
    """vLLM's SamplingParams for Kilter's, with every knob pinned (no penalties, PAD suppressed)."""
    from vllm import SamplingParams as VSamplingParams

    params.check()
    sample = params.do_sample
    return VSamplingParams(
        n=1, max_tokens=params.max_new_tokens,
        temperature=float(params.temperature) if sample else 0.0,
        top_p=float(params.top_p) if sample else 1.0,
        top_k=int(params.top_k) if (sample and params.top_k > 0) else 0,
        min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
        seed=seed if sample else None,
        stop=params.stop_strings or None, stop_token_ids=[eos_id], ignore_eos=False,
        include_stop_str_in_output=True, skip_special_tokens=False,
        # PAD is never sampled (as in the other engines); vLLM bounds a bias to [-100, 100]
        logit_bias={pad_id: -100.0} if pad_id is not None else None,
        logprobs=0 if logprobs else None,
    )


def outputs_to_generation(prompt_ids: list[list[int]], outputs, tokenizer, params: SamplingParams) -> Generation:
    """Kilter's Generation from vLLM's RequestOutputs (responses cut after EOS, log-probs aligned)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses, finished, logprobs = [], [], []
    for out in outputs:
        done_out = out.outputs[0]
        ids, done = cut_after_eos(list(done_out.token_ids), eos, pad)
        responses.append(ids)
        finished.append(done or done_out.finish_reason == "stop")
        if done_out.logprobs is not None:
            logprobs.append([float(step[tok].logprob) for step, tok in zip(done_out.logprobs, ids)])
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    if params.stop_strings:
        texts = [_cut_stop(t, params.stop_strings) for t in texts]
    extras = {"logprobs": logprobs} if len(logprobs) == len(responses) else {}
    return Generation(prompt_ids=list(prompt_ids), response_ids=responses, texts=texts, finished=finished,
                      extras=extras)


def _cut_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def check_model_folder(model_path: str) -> None:
    path = Path(model_path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"{model_path} holds a LoRA adapter only; vLLM needs a full model folder "
                          "(save the run with lora.merge_on_save=true, or use engine hf)")


class VLLMEngine:
    """vLLM sampling on its own copy of the weights, in the trainer's process."""

    def __init__(self, model_path: str, tokenizer, *, seed: int = 0, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = False, dtype: str = "fp32",
                 tensor_parallel_size: int = 1) -> None:
        check_model_folder(model_path)
        self.in_process = tensor_parallel_size == 1
        if self.in_process:
            # before vLLM reads it: the engine core runs in this process, weights pass as tensors
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            self.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        vllm = import_vllm()
        self.tokenizer = tokenizer
        self.model_path = model_path
        # the trainer's precision: vLLM's "auto" would run a float32 checkpoint in half precision,
        # 5e-2 away from the log-probs the trainer computes
        dtype = VLLM_DTYPES.get(dtype, dtype)
        kwargs = dict(model=model_path, seed=seed, dtype=dtype, enforce_eager=enforce_eager,
                      logprobs_mode="processed_logprobs", tensor_parallel_size=tensor_parallel_size,
                      enable_prefix_caching=True)
        if self.in_process:
            kwargs["distributed_executor_backend"] = "uni"
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = vllm.LLM(**kwargs)
        self._weights_dir: tempfile.TemporaryDirectory | None = None
        self._pushes = 0

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        seeds = request_seeds(len(prompt_ids))
        sampling = [vllm_sampling_params(params, eos, pad, seed=s) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], sampling, use_tqdm=False)
        return outputs_to_generation(prompt_ids, outputs, self.tokenizer, params)

    def sync_weights(self, model) -> None:
        """Copy ``model``'s current weights (LoRA merged) into vLLM."""
        self.load_weights(policy_weights(model))

    def load_weights(self, weights) -> None:
        """Reload vLLM's weights in place from ``(name, tensor)`` pairs in Hugging Face names."""
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._write_weights(weights)})
        # cached prefixes were computed with the old weights
        self.llm.reset_prefix_cache()

    def _write_weights(self, weights) -> str:
        """A new folder per push: reading the same path again gave the first push's weights back."""
        import shutil

        from safetensors.torch import save_file

        if self._weights_dir is None:
            self._weights_dir = tempfile.TemporaryDirectory(prefix="kilter-vllm-weights-")
        self._pushes += 1
        folder = os.path.join(self._weights_dir.name, f"push-{self._pushes}")
        os.makedirs(folder)
        save_file(separate_cpu_tensors(weights), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        previous = os.path.join(self._weights_dir.name, f"push-{self._pushes - 1}")
        shutil.rmtree(previous, ignore_errors=True)
        return folder

    def checkpoint_names(self) -> set[str] | None:
        """Tensor names of the starting checkpoint (None when it is not safetensors): what a push may name."""
        from safetensors import safe_open

        files = sorted(Path(self.model_path).glob("*.safetensors"))
        if not files:
            return None
        names = {"lm_head.weight"}  # tied to the embeddings, so absent from the file
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                names.update(fh.keys())
        return names

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            self.llm = None
            del llm
            gc.collect()
        if self._weights_dir is not None:
            self._weights_dir.cleanup()
            self._weights_dir = None
