"""``kilter vllm-serve``: vLLM in its own process (other devices, another node), driven over HTTP.

The trainer's ``rollout.engine=vllm-server`` (:class:`kilter.rollout.vllm_client.VLLMServerEngine`)
sends prompt ids and sampling settings to ``POST /generate`` and, after every policy update, the
policy's weights (LoRA merged) as one safetensors body to ``POST /weights``; ``GET /health`` tells
the model and how many weight pushes it has taken.  The server holds a
:class:`kilter.rollout.vllm_engine.VLLMEngine`, so sampling and weight reloading are the colocated
engine's, and requests are served one at a time (vLLM batches the prompts of one request).

Token ids travel, not text: the trainer's tokenizer stays the only one that encodes and decodes.
There is no authentication: listen on loopback or a private network only.
"""

from __future__ import annotations

import threading

from fastapi import Request
from pydantic import BaseModel, Field

from kilter.config import BaseConfig
from kilter.errors import ConfigError, KilterError
from kilter.rollout.generate import SamplingParams


class VLLMServeConfig(BaseConfig):
    """Serve a model with vLLM for `rollout.engine=vllm-server` (generation and weight pushes over HTTP)."""

    model: str = "builtin:tiny"
    """The policy's starting weights: a Hugging Face folder (LoRA merged), a preset or builtin:tiny; later weights are pushed by the trainer."""
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 accepts other machines (no authentication: private networks only)."""
    port: int = Field(8100, ge=1, le=65535)
    """TCP port to listen on."""
    seed: int = 0
    """vLLM's seed (each request's samples are seeded by the client)."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + response in tokens (null: the model's)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of the GPU's memory vLLM may take (weights + KV cache); on CPU set VLLM_CPU_KVCACHE_SPACE (GiB) instead."""
    enforce_eager: bool = False
    """Skip vLLM's torch.compile / CUDA graphs: start-up in seconds instead of about a minute, slower decoding."""
    dtype: str = "fp32"
    """Weights' dtype in vLLM: the trainer's precision (fp32, bf16; or vLLM's names, auto: half precision for a float32 checkpoint)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs the model is split over (more than 1 runs vLLM's workers in their own processes)."""


class GenerateRequest(BaseModel):
    prompt_ids: list[list[int]]
    params: dict = Field(default_factory=dict)
    seeds: list[int] | None = None


def _sampling(params: dict) -> SamplingParams:
    allowed = set(SamplingParams.__dataclass_fields__)
    unknown = set(params) - allowed
    if unknown:
        raise ConfigError(f"unknown sampling settings {sorted(unknown)}; allowed: {sorted(allowed)}")
    try:
        out = SamplingParams(**params)
        out.check()
    except TypeError as exc:
        raise ConfigError(f"bad sampling settings: {exc}") from None
    return out


def create_app(engine, model_label: str):
    """The FastAPI app around a loaded engine (a VLLMEngine, or anything with its methods)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    from kilter.rollout.vllm_engine import vllm_sampling_params

    app = FastAPI(title="kilter vllm-serve")
    lock = threading.Lock()
    state = {"weights_version": 0}
    vocab = len(engine.tokenizer)

    @app.exception_handler(KilterError)
    async def _kilter_error(_request, exc: KilterError):
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.get("/health")
    def health():
        return {"model": model_label, "weights_version": state["weights_version"]}

    @app.post("/generate")
    def generate(req: GenerateRequest):
        params = _sampling(req.params)
        if not req.prompt_ids or any(not p for p in req.prompt_ids):
            raise HTTPException(400, "prompt_ids must be a non-empty list of non-empty token id lists")
        bad = [t for p in req.prompt_ids for t in p if not 0 <= t < vocab]
        if bad:
            raise HTTPException(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if req.seeds is not None and len(req.seeds) != len(req.prompt_ids):
            raise HTTPException(400, f"{len(req.seeds)} seeds for {len(req.prompt_ids)} prompts")
        tok = engine.tokenizer
        seeds = req.seeds or [None] * len(req.prompt_ids)
        sampling = [vllm_sampling_params(params, tok.eos_token_id, tok.pad_token_id, seed=s) for s in seeds]
        with lock:
            outputs = engine.llm.generate([{"prompt_token_ids": p} for p in req.prompt_ids], sampling,
                                          use_tqdm=False)
        rows = []
        for out in outputs:
            o = out.outputs[0]
            ids = list(o.token_ids)
            logprobs = [float(step[t].logprob) for step, t in zip(o.logprobs or [], ids)]
            rows.append({"token_ids": ids, "finish_reason": o.finish_reason, "logprobs": logprobs})
        return {"outputs": rows, "weights_version": state["weights_version"]}

    @app.post("/weights")
    async def weights(request: Request):
        from safetensors import SafetensorError
        from safetensors.torch import load

        body = await request.body()
        if not body:
            raise HTTPException(400, "POST /weights needs the weights as a safetensors body")
        try:
            tensors = load(body)
        except (SafetensorError, ValueError) as exc:
            raise HTTPException(400, f"the body is not a safetensors file: {exc}") from None
        known = engine.checkpoint_names()
        unknown = sorted(set(tensors) - known) if known is not None else []
        if unknown:
            raise HTTPException(400, f"{len(unknown)} tensors the model does not have, e.g. {unknown[0]!r}; "
                                     "push the weights of the model this server was started with")

        def load_now() -> None:
            with lock:
                engine.load_weights(tensors.items())
                state["weights_version"] += 1

        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(load_now)
        return {"weights_version": state["weights_version"], "tensors": len(tensors)}

    return app


def run(cfg: VLLMServeConfig) -> int:
    import uvicorn

    from kilter.models.loading import load_tokenizer, resolve_model_path
    from kilter.rollout.vllm_engine import VLLMEngine

    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    engine = VLLMEngine(path, tokenizer, seed=cfg.seed, max_model_len=cfg.max_model_len,
                        gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
                        dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size)
    app = create_app(engine, cfg.model)
    print(f"kilter vllm-serve: {cfg.model} on http://{cfg.host}:{cfg.port} "
          f"({'in-process' if engine.in_process else 'multiprocess'} weight reloads)", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        engine.close()
    return 0
