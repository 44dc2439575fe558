"""`kilter vllm-serve` end to end: a real server process, the client engine, weight pushes, bad requests."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from kilter.errors import KilterError
from kilter.rollout.engine import engine_logp_maxdiff, make_engine
from kilter.rollout.generate import SamplingParams, generate_ids
from kilter.rollout.scoring import assemble, batched_logprobs
from kilter.rollout.vllm_client import VLLMServerEngine

GREEDY = SamplingParams(max_new_tokens=20, do_sample=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(sft_dir, tmp_path_factory):
    """`kilter vllm-serve` in its own process with vLLM's engine core in a third one (multiprocessing on),
    so pushed weights take the safetensors-file route of reload_weights."""
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "kilter", "vllm-serve", f"model={sft_dir}", f"port={port}",
                                 "enforce_eager=true", "max_model_len=256"], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:  # and whatever vLLM's engine core left behind in the server's process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def client(server, sft_dir):
    from kilter.models import load_tokenizer

    url, proc, log = server
    tok = load_tokenizer(str(sft_dir))
    try:
        return VLLMServerEngine(url, tok, wait_s=300)
    except KilterError:
        pytest.fail(f"vllm-serve did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")


def test_generate_push_weights_generate_again(client, sft_dir, eval_prompt_ids):
    from kilter.models import load_causal_lm

    tok = client.tokenizer
    model = load_causal_lm(str(sft_dir), tok).eval()
    assert client.info["weights_version"] == 0
    got = client.generate(eval_prompt_ids, GREEDY)
    assert got.response_ids == generate_ids(model, tok, eval_prompt_ids, GREEDY, fast=False).response_ids

    changed = copy.deepcopy(model)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in changed.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    expected = generate_ids(changed, tok, eval_prompt_ids, GREEDY, fast=False).response_ids
    assert expected != got.response_ids, "the perturbation changed nothing: the push would be untested"
    client.sync_weights(changed)
    assert client.info["weights_version"] == 1
    assert client.generate(eval_prompt_ids, GREEDY).response_ids == expected

    # sampled log-probs from the server agree with the trainer's teacher-forced ones
    torch.manual_seed(1)
    gen = client.generate(eval_prompt_ids, SamplingParams(max_new_tokens=20))
    batch = assemble(eval_prompt_ids, gen.response_ids, tok.pad_token_id)
    logp, _ = batched_logprobs(changed, batch, 1.0, 64, "fp32")
    assert engine_logp_maxdiff(gen, logp, batch.response_mask) < 1e-4
    torch.manual_seed(1)
    assert client.generate(eval_prompt_ids, SamplingParams(max_new_tokens=20)).response_ids == gen.response_ids

    # the engine factory pushes the trainer's weights first: a server may hold another run's
    fresh = make_engine("vllm-server", model, tok, url=client.url)
    assert fresh.info["weights_version"] == 2
    assert fresh.generate(eval_prompt_ids, GREEDY).response_ids == got.response_ids


def test_bad_requests_get_one_line_answers(client, server):
    url = server[0]
    with pytest.raises(KilterError, match="outside the vocabulary"):
        client.generate([[10**6]], GREEDY)

    def post(path, body: bytes, content_type="application/json"):
        req = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": content_type})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        return info.value.code, json.loads(info.value.read())["detail"]

    code, detail = post("/weights", b"not safetensors", "application/octet-stream")
    assert code == 400 and "not a safetensors file" in detail
    from safetensors.torch import save

    code, detail = post("/weights", save({"no.such.weight": torch.zeros(2)}), "application/octet-stream")
    assert code == 400 and "'no.such.weight'" in detail
    code, detail = post("/generate", json.dumps({"prompt_ids": [[5]], "params": {"temperature": 0}}).encode())
    assert code == 400 and "temperature" in detail
    code, detail = post("/generate", json.dumps({"prompt_ids": [[5]], "params": {"beams": 4}}).encode())
    assert code == 400 and "unknown sampling settings" in detail


def test_an_unreachable_server_is_one_line_error(sft_dir):
    from kilter.models import load_tokenizer

    tok = load_tokenizer(str(sft_dir))
    with pytest.raises(KilterError, match="cannot reach kilter vllm-serve"):
        VLLMServerEngine(f"http://127.0.0.1:{_free_port()}", tok)
    with pytest.raises(KilterError, match="not an http"):
        VLLMServerEngine("127.0.0.1:8100", tok)
