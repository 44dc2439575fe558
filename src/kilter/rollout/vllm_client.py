"""``rollout.engine=vllm-server``: the trainer's side of ``kilter vllm-serve`` (HTTP, standard library only).

Nothing here imports vLLM: the trainer's machine needs only Kilter.  Sampling seeds are drawn from
the trainer's torch RNG (as the colocated engine does), so a seeded run draws the same samples
from the same weights; the weights are pushed as one safetensors body after every update.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict

from kilter.errors import KilterError
from kilter.rollout.engine import request_seeds
from kilter.rollout.generate import Generation, SamplingParams, cut_after_eos


class VLLMServerEngine:
    """Rollouts from a ``kilter vllm-serve`` process at ``url``."""

    def __init__(self, url: str, tokenizer, *, model_path: str | None = None, timeout_s: float = 600.0,
                 wait_s: float = 0.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise KilterError(f"vllm_url {url!r} is not an http(s) address (e.g. http://127.0.0.1:8100)")
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.info = self._wait(wait_s)
        self.model_path = model_path

    def _request(self, path: str, body: bytes | None = None, content_type: str = "application/json",
                 timeout: float | None = None) -> dict:
        req = urllib.request.Request(self.url + path, data=body, method="GET" if body is None else "POST",
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("detail")
            except (json.JSONDecodeError, AttributeError):
                detail = None
            raise KilterError(f"kilter vllm-serve at {self.url} refused {path}: HTTP {exc.code}"
                              + (f": {detail}" if detail else "")) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KilterError(f"cannot reach kilter vllm-serve at {self.url} ({reason}); start it with "
                              "`kilter vllm-serve model=... port=...` or fix rollout.vllm_url") from None

    def _wait(self, wait_s: float) -> dict:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._request("/health", timeout=10)
            except KilterError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        params.check()
        body = {"prompt_ids": [list(map(int, p)) for p in prompt_ids], "params": asdict(params),
                "seeds": request_seeds(len(prompt_ids))}
        reply = self._request("/generate", json.dumps(body).encode())
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        responses, finished, logprobs = [], [], []
        for out in reply["outputs"]:
            ids, done = cut_after_eos(out["token_ids"], eos, pad)
            responses.append(ids)
            finished.append(done or out["finish_reason"] == "stop")
            logprobs.append(out["logprobs"][: len(ids)])
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        if params.stop_strings:
            from kilter.rollout.vllm_engine import _cut_stop

            texts = [_cut_stop(t, params.stop_strings) for t in texts]
        return Generation(prompt_ids=list(prompt_ids), response_ids=responses, texts=texts, finished=finished,
                          extras={"logprobs": logprobs})

    def sync_weights(self, model) -> None:
        """Push ``model``'s weights (LoRA merged) to the server, which reloads them in place."""
        from safetensors.torch import save

        from kilter.rollout.vllm_engine import policy_weights, separate_cpu_tensors

        body = save(separate_cpu_tensors(policy_weights(model)))
        self.info = self._request("/weights", body, content_type="application/octet-stream")

    def close(self) -> None:
        pass
