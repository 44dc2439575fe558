"""Reward-model loading, scoring, saving with the bias, ensembles and the critic copy.

Uses the built-in ``micro`` model (random weights, a fresh head): the numbers are arbitrary,
but every check compares two ways of computing the same reward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kilter.data.collate import pad_batch
from kilter.data.tokenize import encode_prompt_completion
from kilter.errors import KilterError
from kilter.models import load_tokenizer
from kilter.models.reward import (
    BIAS_KEY,
    RewardEnsemble,
    RewardModel,
    build_value_model,
    get_reward_bias,
    load_reward,
    load_reward_backbone,
    load_reward_model,
    raw_scores,
    save_reward_model,
    score_ids,
    set_reward_bias,
    token_values,
    write_ensemble_manifest,
)

PROMPTS = ["Write a review of the blender.", "Review the lamp.", "Tell me what you think of the tent."]
RESPONSES = ["The blender is great.", "It is bad. I bought it last week. Do not buy it.", "My tent is fine."]


def _new_rm(seed: int = 0):
    torch.manual_seed(seed)
    tok = load_tokenizer("builtin:micro")
    model = load_reward_backbone("builtin:micro", tok)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def rm():
    return _new_rm(0)


def _encode(tok, prompts=PROMPTS, responses=RESPONSES):
    return [encode_prompt_completion(tok, p, r, 128) for p, r in zip(prompts, responses)]


def test_backbone_is_a_one_output_sequence_classifier(rm):
    model, tok = rm
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1 and model.score.out_features == 1
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(rm):
    model, tok = rm
    examples = _encode(tok)
    with torch.no_grad():
        alone = torch.stack([score_ids(model, torch.tensor([e["input_ids"]]), torch.ones(1, len(e["input_ids"])))[0]
                             for e in examples])
        right = pad_batch(examples, tok.pad_token_id, keys=("input_ids",), side="right")
        left = pad_batch(examples, tok.pad_token_id, keys=("input_ids",), side="left")
        r_right = score_ids(model, right["input_ids"], right["attention_mask"])
        r_left = score_ids(model, left["input_ids"], left["attention_mask"])
    assert r_right.shape == (3,)
    torch.testing.assert_close(r_right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(r_left, alone, atol=1e-5, rtol=0)
    # Reading at the last token means the EOS matters: drop it and the reward changes.
    e = examples[0]["input_ids"]
    with torch.no_grad():
        no_eos = score_ids(model, torch.tensor([e[:-1]]), torch.ones(1, len(e) - 1))
    assert e[-1] == tok.eos_token_id and abs(float(no_eos[0] - alone[0])) > 1e-6


def test_score_adds_the_bias_stored_in_the_config(rm):
    model, tok = rm
    batch = pad_batch(_encode(tok), tok.pad_token_id, keys=("input_ids",))
    with torch.no_grad():
        raw = raw_scores(model, batch["input_ids"], batch["attention_mask"])
        set_reward_bias(model, -1.25)
        try:
            shifted = score_ids(model, batch["input_ids"], batch["attention_mask"])
        finally:
            set_reward_bias(model, 0.0)
    torch.testing.assert_close(shifted, raw - 1.25)


def test_reward_model_score_matches_manual_batches_in_input_order(rm):
    model, tok = rm
    scorer = RewardModel(model, tok)
    batch = pad_batch(_encode(tok), tok.pad_token_id, keys=("input_ids",))
    with torch.no_grad():
        expected = score_ids(model, batch["input_ids"], batch["attention_mask"])
    for batch_size in (1, 2, 32):  # length sorting inside must not reorder the output
        torch.testing.assert_close(scorer.score(PROMPTS, RESPONSES, batch_size=batch_size), expected,
                                   atol=1e-5, rtol=0)
    with pytest.raises(KilterError, match="3 prompts but 2 responses"):
        scorer.score(PROMPTS, RESPONSES[:2])


def test_hf_drops_a_score_bias_which_is_why_the_bias_lives_in_the_config(rm, tmp_path):
    """The premise of the design (models/reward.py docstring): from_pretrained ignores score.bias."""
    from transformers import AutoModelForSequenceClassification

    model, tok = _new_rm(1)
    head = torch.nn.Linear(model.score.in_features, 1, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.score.weight)
        head.bias.fill_(3.0)
    model.score = head
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.score.bias is None


def test_saved_model_reloads_with_plain_transformers_and_gives_the_same_scores(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tok = _new_rm(2)
    set_reward_bias(model, 0.75)
    before = RewardModel(model, tok).score(PROMPTS, RESPONSES)
    save_reward_model(model, tok, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[BIAS_KEY] == 0.75

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    plain_tok = AutoTokenizer.from_pretrained(tmp_path)
    batch = pad_batch(_encode(plain_tok), plain_tok.pad_token_id, keys=("input_ids",))
    with torch.no_grad():
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    # Plain transformers: the head's output plus config.reward_bias is the normalized reward.
    assert plain.config.reward_bias == 0.75
    torch.testing.assert_close(logits + plain.config.reward_bias, before, atol=1e-5, rtol=0)
    # Kilter's loader applies the bias itself.
    torch.testing.assert_close(load_reward_model(tmp_path).score(PROMPTS, RESPONSES), before, atol=1e-5, rtol=0)
    # A plain model is a valid input to score_ids: the bias rides along in its config.
    with torch.no_grad():
        torch.testing.assert_close(score_ids(plain, batch["input_ids"], batch["attention_mask"]), before,
                                   atol=1e-5, rtol=0)


def test_any_causal_lm_folder_becomes_a_reward_model(tmp_path):
    """A folder saved by AutoModelForCausalLM (no score head) loads with a new head."""
    from kilter.models import load_causal_lm

    tok = load_tokenizer("builtin:micro")
    lm = load_causal_lm("builtin:micro", tok)
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_reward_backbone(str(tmp_path), tok)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    torch.testing.assert_close(model.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def _save_member(path: Path, seed: int) -> RewardModel:
    model, tok = _new_rm(seed)
    save_reward_model(model, tok, path)
    return RewardModel(model, tok)


def test_ensemble_std_is_zero_for_identical_members_and_positive_otherwise(tmp_path):
    same = tmp_path / "same"
    one = _save_member(same / "member-0", 3)
    _save_member(same / "member-1", 3)
    write_ensemble_manifest(same, ["member-0", "member-1"])
    ensemble = load_reward(same)
    assert isinstance(ensemble, RewardEnsemble) and len(ensemble.members) == 2
    mean, std = ensemble.score_with_std(PROMPTS, RESPONSES)
    assert torch.equal(std, torch.zeros(3))
    torch.testing.assert_close(mean, one.score(PROMPTS, RESPONSES), atol=1e-5, rtol=0)

    mixed = tmp_path / "mixed"
    a = _save_member(mixed / "member-0", 4).score(PROMPTS, RESPONSES)
    b = _save_member(mixed / "member-1", 5).score(PROMPTS, RESPONSES)
    write_ensemble_manifest(mixed, ["member-0", "member-1"])
    ensemble = load_reward(mixed)
    mean, std = ensemble.score_with_std(PROMPTS, RESPONSES)
    # Two members: mean (a + b) / 2 and population std |a - b| / 2.
    torch.testing.assert_close(mean, (a + b) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(std, (a - b).abs() / 2, atol=1e-5, rtol=0)
    assert bool((std > 0).all())
    torch.testing.assert_close(ensemble.score(PROMPTS, RESPONSES), mean)


def test_load_reward_finds_final_in_a_run_directory_and_reports_bad_folders(tmp_path):
    _save_member(tmp_path / "run" / "final", 6)
    assert isinstance(load_reward(tmp_path / "run"), RewardModel)
    with pytest.raises(KilterError, match="not found"):
        load_reward(tmp_path / "missing")
    (tmp_path / "half" / "member-0").mkdir(parents=True)
    with pytest.raises(KilterError, match="ensemble.json"):
        load_reward(tmp_path / "half")
    with pytest.raises(KilterError, match="load_reward"):
        ens = tmp_path / "ens"
        _save_member(ens / "member-0", 6)
        write_ensemble_manifest(ens, ["member-0"])
        load_reward_model(ens)


def test_value_model_starts_from_the_reward_model_with_the_bias_in_its_head(tmp_path):
    model, tok = _new_rm(7)
    set_reward_bias(model, -0.5)
    save_reward_model(model, tok, tmp_path / "rm")
    examples = _encode(tok)
    batch = pad_batch(examples, tok.pad_token_id, keys=("input_ids",))
    with torch.no_grad():
        rewards = score_ids(model, batch["input_ids"], batch["attention_mask"])
    for source in (tmp_path / "rm", model):
        critic = build_value_model(source)
        assert critic is not model and critic.score.bias is not None
        assert float(critic.score.bias.detach()) == pytest.approx(-0.5) and get_reward_bias(critic) == 0.0
        with torch.no_grad():
            values = token_values(critic, batch["input_ids"], batch["attention_mask"])
        assert values.shape == batch["input_ids"].shape
        last = batch["attention_mask"].sum(1) - 1
        # The critic's value at the last token is the reward model's (normalized) reward.
        torch.testing.assert_close(values[torch.arange(3), last], rewards, atol=1e-5, rtol=0)
    # Training the critic leaves the reward model alone.
    with torch.no_grad():
        critic.score.weight.add_(1.0)
    assert get_reward_bias(model) == -0.5
    with torch.no_grad():
        torch.testing.assert_close(score_ids(model, batch["input_ids"], batch["attention_mask"]), rewards)


@pytest.mark.slow
def test_smollm2_preset_loads_as_a_reward_model(tmp_path, smollm2_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    tok = load_tokenizer(str(smollm2_dir))
    model = load_reward_backbone(str(smollm2_dir), tok).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id != tok.eos_token_id
    chat = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Name a color."}]]
    scorer = RewardModel(model, tok, max_length=64)
    before = scorer.score(chat, ["Hi!", "Blue."])
    assert before.shape == (2,) and torch.isfinite(before).all()
    save_reward_model(model, tok, tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(RewardModel(plain, tok, max_length=64).score(chat, ["Hi!", "Blue."]), before,
                               atol=1e-4, rtol=0)


def test_an_unfinished_response_is_scored_without_an_appended_eos(rm):
    """A response cut at max_new_tokens is scored as the text it is, not as if it had ended."""
    model, tok = rm
    scorer = RewardModel(model, tok)
    done, cut = scorer.encode(PROMPTS[:1] * 2, RESPONSES[:1] * 2, finished=[True, False])
    assert done["input_ids"][-1] == tok.eos_token_id and done["input_ids"][:-1] == cut["input_ids"]
    assert tok.eos_token_id not in cut["input_ids"][cut["prompt_len"]:]
    scores = scorer.score(PROMPTS[:1] * 2, RESPONSES[:1] * 2, finished=[True, False])
    # read at a different token (EOS vs the last text token), so the two differ
    assert scores[0] != scores[1]
    assert float(scores[0]) == pytest.approx(float(scorer.score(PROMPTS[:1], RESPONSES[:1])[0]), abs=1e-5)


def test_the_missing_eos_penalty_is_on_by_default():
    from kilter.rewards.base import RewardConfig

    assert RewardConfig().missing_eos_penalty == 1.0
