"""Unit tests run the micro/tiny models on one torch thread: OpenMP barriers cost more than they save."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every unit test on one thread (tests/conftest.py's one_thread)."""


@pytest.fixture
def micro_policy():
    """``make(lora) -> (tokenizer, model)``: the built-in micro LM, in train mode; with LoRA its B
    matrices are random, so the adapters change the logits and A gets gradients too."""
    from kilter.models import load_causal_lm, load_tokenizer
    from kilter.models.lora import LoraSection, apply_lora

    def make(lora: bool = False):
        tok = load_tokenizer("builtin:micro")
        model = load_causal_lm("builtin:micro", tok)
        if lora:
            model = apply_lora(model, LoraSection(enabled=True))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.05)
        model.train()
        return tok, model

    return make


@pytest.fixture
def random_rollout():
    """``make(pad_id, n=8, seed=0)``: a RolloutBatch of n random prompts (2-4 tokens) and responses (1-5)."""
    from kilter.rollout.scoring import assemble

    def make(pad_id: int, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(10, 200, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
        responses = [torch.randint(10, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
                     for _ in range(n)]
        return assemble(prompts, responses, pad_id)

    return make


@pytest.fixture(scope="module")
def micro_ppo_models():
    """(tokenizer, policy, critic) for PPO updates: the micro LM and a critic on its backbone, eval mode."""
    from kilter.models import load_causal_lm, load_tokenizer
    from kilter.models.reward import build_value_model, load_reward_backbone
    from kilter.models.tiny import builtin_model_dir

    path = str(builtin_model_dir("micro"))
    tok = load_tokenizer(path)
    policy = load_causal_lm(path, tok).eval()
    torch.manual_seed(0)
    value = build_value_model(load_reward_backbone(path, tok)).eval()
    return tok, policy, value
