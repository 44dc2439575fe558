"""The parts of the vLLM engines that need no vLLM: merged weights, tensors for a push, the log-prob check,
config errors.  The engines themselves run in tests/vllm/ (`make test-vllm`)."""

import importlib.util
import json
import socket

import pytest
import torch
from safetensors.torch import load, save

from kilter.cli import main
from kilter.errors import ConfigError, KilterError
from kilter.rollout.engine import EngineOptions, engine_logp_maxdiff, request_seeds
from kilter.rollout.generate import Generation
from kilter.rollout.vllm_client import VLLMServerEngine
from kilter.rollout.vllm_engine import policy_weights, separate_cpu_tensors


def test_lora_policy_weights_are_the_merged_model_and_leave_the_adapters_alone(micro_policy):
    tok, lora = micro_policy(lora=True)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    got = dict(policy_weights(lora))
    import copy

    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert set(got) == set(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)
    assert any(not torch.equal(got[n], before["base_model.model." + n.replace(".weight", ".base_layer.weight")])
               for n in got if "q_proj" in n)  # the adapters changed the weights that are sent
    assert all(torch.equal(before[k], v) for k, v in lora.state_dict().items())


def test_tensors_for_a_push_keep_tied_names_and_share_no_memory(micro_policy):
    tok, model = micro_policy()
    weights = dict(policy_weights(model))
    assert weights["lm_head.weight"].data_ptr() == weights["model.embed_tokens.weight"].data_ptr()  # tied
    out = separate_cpu_tensors(weights.items())
    assert set(out) == set(weights)
    assert len({t.untyped_storage().data_ptr() for t in out.values()}) == len(out)
    back = load(save(out))  # safetensors refuses tensors that share memory
    assert all(torch.equal(back[k], weights[k]) for k in weights)


def test_engine_logp_maxdiff_is_the_largest_gap_over_response_tokens():
    gen = Generation([[1], [2]], [[5, 6], [7]], ["", ""], [True, True], extras={"logprobs": [[-1.0, -2.0], [-0.5]]})
    trainer = torch.tensor([[-1.1, -2.0], [-0.25, -9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the -9 is padding: not counted
    assert engine_logp_maxdiff(gen, trainer, mask) == pytest.approx(0.25)
    assert engine_logp_maxdiff(Generation([[1]], [[5]], [""], [True]), trainer[:1, :1], mask[:1, :1]) is None


def test_request_seeds_follow_torchs_rng():
    torch.manual_seed(5)
    first = request_seeds(3)
    torch.manual_seed(5)
    assert request_seeds(3) == first and first[1] == first[0] + 1


def test_server_engine_needs_a_url_and_says_so():
    with pytest.raises(ValueError, match="needs vllm_url"):
        EngineOptions(engine="vllm-server")
    assert EngineOptions(engine="vllm-server", vllm_url="http://127.0.0.1:1").vllm_url


def test_an_unreachable_or_malformed_server_address_is_a_one_line_error(micro_policy):
    tok, _ = micro_policy()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(KilterError, match="cannot reach kilter vllm-serve"):
        VLLMServerEngine(f"http://127.0.0.1:{port}", tok)
    with pytest.raises(KilterError, match="not an http"):
        VLLMServerEngine("localhost:8100", tok)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
@pytest.mark.parametrize("argv", [
    ["ppo", "model=builtin:micro", "rollout.engine=vllm", "reward.function=builtin:gold"],
    ["bon", "model=builtin:micro", "engine=vllm", "reward_fn=builtin:gold"],
    ["eval", "models=builtin:micro", "engine=vllm"],
])
def test_engine_vllm_without_vllm_fails_before_writing_anything(argv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*argv, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs vLLM installed" in err[0], err
    assert not out.exists()


def test_vllm_serve_config_errors_are_config_errors():
    from kilter.config import load_config
    from kilter.rollout.vllm_server import VLLMServeConfig, _sampling

    with pytest.raises(ConfigError, match="port"):
        load_config(VLLMServeConfig, None, ["port=0"])
    with pytest.raises(ConfigError, match="unknown sampling settings"):
        _sampling({"beams": 2})
    with pytest.raises(ConfigError, match="temperature"):
        _sampling({"temperature": 0.0})
    assert _sampling(json.loads('{"max_new_tokens": 4, "do_sample": false}')).max_new_tokens == 4
