"""The models of `kilter ppo`: reference without a second copy, frozen layers, the critic's start."""

import copy

import pytest
import torch

from kilter.models.lora import LoraSection, apply_lora
from kilter.models.reference import Reference
from kilter.rollout.scoring import assemble, batched_logprobs, batched_values
from kilter.trainers.ppo_setup import freeze_lower_layers, reference_logprobs


@pytest.fixture(scope="module")
def micro():
    from kilter.models import load_causal_lm, load_tokenizer
    from kilter.models.tiny import builtin_model_dir

    path = str(builtin_model_dir("micro"))
    tok = load_tokenizer(path)
    return path, tok, load_causal_lm(path, tok).eval()


def _batch(tok):
    return assemble([[11, 12, 13], [14]], [[20, 21, tok.eos_token_id], [22, 23]], tok.pad_token_id)


def test_lora_reference_with_adapter_disabled_equals_a_frozen_copy(micro):
    _, tok, base = micro
    frozen = copy.deepcopy(base)
    policy = apply_lora(copy.deepcopy(base), LoraSection(enabled=True, r=4))
    with torch.no_grad():  # a trained adapter: B is no longer zero, so the policy has moved
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    reference = Reference(policy)
    assert reference.shares_policy  # no second copy of the weights
    batch = _batch(tok)
    ref = reference_logprobs(reference, batch, temperature=0.8, batch_size=1)
    expected, _ = batched_logprobs(frozen, batch, 0.8, batch_size=2)
    moved, _ = batched_logprobs(policy, batch, 0.8, batch_size=2)
    assert torch.allclose(ref, expected, atol=1e-5)
    assert not torch.allclose(moved, expected, atol=1e-3)


def test_plain_reference_is_a_frozen_copy_taken_before_training(micro):
    _, tok, base = micro
    policy = copy.deepcopy(base)
    reference = Reference(policy)
    assert not reference.shares_policy
    before = reference_logprobs(reference, _batch(tok), 1.0, 4)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.1)
    after = reference_logprobs(reference, _batch(tok), 1.0, 4)
    assert torch.equal(before, after)
    assert all(not p.requires_grad for p in reference.model.parameters())


def test_freeze_lower_layers(micro):
    _, _, base = micro
    model = copy.deepcopy(base)
    blocks = model.model.layers
    assert freeze_lower_layers(model, 1) == sum(1 for _ in blocks[0].parameters())
    assert all(not p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters())
    # the micro model ties input and output embeddings: the shared matrix must keep learning
    assert model.get_input_embeddings().weight.requires_grad
    with pytest.raises(Exception, match="only 2 blocks"):
        freeze_lower_layers(copy.deepcopy(base), 3)


def test_value_model_from_a_reward_model_predicts_the_reward_at_the_end(micro, tmp_path):
    from types import SimpleNamespace

    from kilter.models.reward import load_reward, load_reward_backbone, save_reward_model, set_reward_bias
    from kilter.rewards.base import ModelReward, RewardPipeline
    from kilter.trainers.ppo_setup import build_value

    path, tok, _ = micro
    torch.manual_seed(0)
    rm = load_reward_backbone(path, tok)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    set_reward_bias(rm, 0.25)
    save_reward_model(rm, tok, tmp_path / "rm")
    pipeline = RewardPipeline([(ModelReward(str(tmp_path / "rm")), 1.0)])
    cfg = SimpleNamespace(value=SimpleNamespace(model=None), model=path, lora=LoraSection(), freeze_layers=0)
    value, label = build_value(cfg, pipeline, tok, "cpu")
    assert label == f"reward model {tmp_path / 'rm'}"
    # V at the column that reads the full response (after its EOS) equals the RM's reward of it;
    # append one token so that column is inside the response grid
    prompt, response = [11, 12], [20, 21, tok.eos_token_id]
    batch = assemble([prompt], [response + [5]], tok.pad_token_id)
    values = batched_values(value, batch, 4)
    expected = load_reward(tmp_path / "rm").score_ids(torch.tensor([prompt + response]), torch.ones(1, 5))
    assert values[0, 3].item() == pytest.approx(expected.item(), abs=1e-4)

    cfg.value.model = "policy"
    fresh, label = build_value(cfg, pipeline, tok, "cpu")
    assert label.startswith("policy backbone")
    assert batched_values(fresh, batch, 4).abs().max().item() == 0.0  # a new head starts at V = 0


def test_prompt_stream_covers_each_epoch_once_in_a_seeded_order(micro, tmp_path):
    from types import SimpleNamespace

    from kilter.trainers.ppo_setup import PromptStream

    _, tok, _ = micro
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "Review the item {i}."}}\n' for i in range(10)))
    cfg = SimpleNamespace(data=SimpleNamespace(prompts=str(path), skip_invalid=False, task_seed=0,
                                               max_prompt_length=4),
                          rollout=SimpleNamespace(batch_size=4), seed=3)
    stream = PromptStream(cfg, tok)
    seen = [r["prompt"] for i in range(5) for r in stream.batch(i)]  # 20 draws = two epochs of 10
    assert sorted(seen[:10]) == sorted(seen[10:]) == sorted(f"Review the item {i}." for i in range(10))
    assert seen[:10] != seen[10:]  # each epoch has its own shuffle
    assert all(len(r["ids"]) <= 4 for r in stream.batch(0))  # prompts cut to max_prompt_length
    again = PromptStream(cfg, tok)
    assert [r["prompt"] for r in again.batch(3)] == seen[12:16]  # iteration i's batch is a pure function of i


def test_prompt_plus_response_longer_than_learned_positions_is_one_line(tmp_path, capsys):
    from kilter.cli import main

    out = tmp_path / "run"
    assert main(["ppo", "model=builtin:gpt2-micro", "reward.function=builtin:gold", "rollout.max_new_tokens=5000",
                 f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "data.max_prompt_length + rollout.max_new_tokens=5128" in err and "512 positions" in err
    assert "Traceback" not in err and not out.exists()
