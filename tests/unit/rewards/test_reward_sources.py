"""Reward sources and the pipeline that combines them (kilter.rewards.base)."""

import json
import math

import pytest
import torch

from kilter.data.task import gold_scores
from kilter.errors import ConfigError, KilterError
from kilter.rewards.base import (
    FunctionReward,
    ModelReward,
    RewardConfig,
    RewardPipeline,
    RewardSourceConfig,
    RunningMeanStd,
    build_reward,
    load_function,
    prompt_text,
)

PROMPTS = ["Review the lamp.", "Review the desk."]


def _write_module(tmp_path, name="my_rewards"):
    path = tmp_path / f"{name}.py"
    path.write_text(
        "def word_count(prompts, responses):\n"
        "    return [len(r.split()) for r in responses]\n"
        "def constant(prompts, responses):\n"
        "    return [1.0] * len(responses)\n"
        "def wrong_length(prompts, responses):\n"
        "    return [0.0]\n"
        "def not_finite(prompts, responses):\n"
        "    return [float('nan')] * len(responses)\n"
    )
    return path


def test_load_function_from_file_module_and_builtin(tmp_path, monkeypatch):
    path = _write_module(tmp_path)
    fn = load_function(f"{path}:word_count")
    assert fn(PROMPTS, ["a b c", ""]) == [3, 0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_function("my_rewards:constant")(PROMPTS, ["x", "y"]) == [1.0, 1.0]
    assert load_function("builtin:gold") is gold_scores
    assert load_function("kilter.data.task:gold_scores") is gold_scores


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "expected 'module:function'"),
    ("kilter_no_such_module_xyz:f", "cannot import module"),
    ("kilter.data.task:no_such_function", "no callable named 'no_such_function'"),
    ("/nonexistent/file.py:f", "not found"),
])
def test_load_function_errors_are_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_function(spec)
    assert "\n" not in str(err.value)


def test_function_reward_checks_its_output(tmp_path):
    path = _write_module(tmp_path)
    ok = FunctionReward(load_function(f"{path}:word_count"), "words")
    assert ok(PROMPTS, ["one two", "three"]).tolist() == [2.0, 1.0]
    with pytest.raises(KilterError, match="returned 1 rewards for 2 responses"):
        FunctionReward(load_function(f"{path}:wrong_length"), "bad")(PROMPTS, ["a", "b"])
    with pytest.raises(KilterError, match="non-finite"):
        FunctionReward(load_function(f"{path}:not_finite"), "nan")(PROMPTS, ["a", "b"])


def test_prompt_text_of_messages():
    assert prompt_text("Review the lamp.") == "Review the lamp."
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review the lamp."}]
    assert prompt_text(messages) == "Review the lamp."


def test_running_mean_std_equals_statistics_of_everything_seen():
    stats = RunningMeanStd()
    stats.update(torch.tensor([1.0, 2.0, 3.0]))
    assert (stats.mean, stats.var) == pytest.approx((2.0, 2.0 / 3.0))
    stats.update(torch.tensor([4.0, 5.0]))
    # all of 1..5: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2
    assert (stats.count, stats.mean, stats.var) == (5, pytest.approx(3.0), pytest.approx(2.0))
    copy = RunningMeanStd()
    copy.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert copy.state_dict() == stats.state_dict()


def test_pipeline_weights_penalty_normalisation_and_clip(tmp_path):
    path = _write_module(tmp_path)
    words = FunctionReward(load_function(f"{path}:word_count"), "words")
    const = FunctionReward(load_function(f"{path}:constant"), "const")
    responses = ["a b c", "a"]
    # 2 * words - 1 * const: [2*3 - 1, 2*1 - 1] = [5, 1]
    plain = RewardPipeline([(words, 2.0), (const, -1.0)])
    out = plain(PROMPTS, responses, finished=[True, False])
    assert out.raw.tolist() == [5.0, 1.0] and out.total.tolist() == [5.0, 1.0]
    assert out.components["words"].tolist() == [3.0, 1.0] and out.components["const"].tolist() == [1.0, 1.0]
    # the unfinished second response loses 0.5
    penalised = RewardPipeline([(words, 2.0), (const, -1.0)], missing_eos_penalty=0.5)
    assert penalised(PROMPTS, responses, finished=[True, False]).total.tolist() == [5.0, 0.5]
    # normalised with running statistics of [5, 1]: mean 3, std 2 -> [1, -1]; then clipped to 0.75
    norm = RewardPipeline([(words, 2.0), (const, -1.0)], normalize=True, clip=0.75)
    assert norm(PROMPTS, responses).total.tolist() == pytest.approx([0.75, -0.75])
    assert (norm.stats.mean, norm.stats.std) == pytest.approx((3.0, 2.0))
    # scoring without updating the statistics leaves them as they were
    norm(PROMPTS, ["a b c d e f g"], update_stats=False)
    assert norm.stats.count == 2
    norm2 = RewardPipeline([(words, 1.0)], normalize=True)
    norm2.load_state_dict(norm.state_dict())
    assert norm2.stats.mean == pytest.approx(3.0)


def test_pipeline_needs_a_source_and_distinct_names(tmp_path):
    with pytest.raises(ConfigError, match="no reward source"):
        build_reward(RewardConfig())
    path = _write_module(tmp_path)
    src = FunctionReward(load_function(f"{path}:constant"), "same")
    with pytest.raises(ConfigError, match="distinct names"):
        RewardPipeline([(src, 1.0), (src, 1.0)])


def test_build_reward_from_config_with_gold_function_and_bleu(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"prompt": PROMPTS[0], "completion": "The lamp is great."}) + "\n"
                    + json.dumps({"prompt": PROMPTS[1], "completion": "The desk is bad."}) + "\n")
    cfg = RewardConfig(function="builtin:gold",
                       sources=[RewardSourceConfig(type="bleu", path=str(refs), weight=0.5),
                                RewardSourceConfig(type="rouge", path=str(refs), weight=0.0, name="rl")])
    pipe = build_reward(cfg)
    responses = ["The lamp is great.", "nothing in common"]
    out = pipe(PROMPTS, responses)
    assert out.components["gold"].tolist() == pytest.approx(gold_scores(PROMPTS, responses))
    assert out.components["bleu"].tolist() == pytest.approx([1.0, 0.0])
    assert out.components["rl"].tolist() == pytest.approx([1.0, 0.0])
    expected = [g + 0.5 * b for g, b in zip(gold_scores(PROMPTS, responses), [1.0, 0.0])]
    assert out.total.tolist() == pytest.approx(expected)


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory):
    """Two random micro reward models (biases 0.5 and -0.5) and an ensemble of both."""
    from kilter.models import load_tokenizer
    from kilter.models.reward import load_reward_backbone, save_reward_model, set_reward_bias, write_ensemble_manifest
    from kilter.models.tiny import builtin_model_dir

    base = str(builtin_model_dir("micro"))
    root = tmp_path_factory.mktemp("rewards")
    tok = load_tokenizer(base)
    for i, bias in enumerate((0.5, -0.5)):
        torch.manual_seed(i)
        model = load_reward_backbone(base, tok)
        with torch.no_grad():
            model.score.weight.normal_(0, 1.0)
        set_reward_bias(model, bias)
        save_reward_model(model, tok, root / "ens" / f"member-{i}")
    write_ensemble_manifest(root / "ens", ["member-0", "member-1"])
    return root / "ens"


def test_model_source_and_pessimistic_ensemble(reward_dirs):
    from kilter.models.reward import load_reward

    responses = ["The lamp is great.", "It broke."]
    single = ModelReward(str(reward_dirs / "member-0"))
    expected0 = load_reward(reward_dirs / "member-0").score(PROMPTS, responses)
    assert torch.allclose(single(PROMPTS, responses), expected0)
    assert single.last_std is None and not single.is_ensemble

    members = torch.stack([load_reward(reward_dirs / f"member-{i}").score(PROMPTS, responses) for i in (0, 1)])
    mean, std = members.mean(0), (members[0] - members[1]).abs() / 2  # population std of two values
    pessimistic = ModelReward(str(reward_dirs), std_coef=2.0)
    assert torch.allclose(pessimistic(PROMPTS, responses), mean - 2.0 * std, atol=1e-5)
    pipe = RewardPipeline([(pessimistic, 1.0)])
    out = pipe(PROMPTS, responses)
    assert torch.allclose(out.components["rm_std"], std, atol=1e-5)
    assert math.isclose(float(out.total[0]), float(mean[0] - 2 * std[0]), abs_tol=1e-5)


def test_call_function_is_the_one_checked_call_for_every_command(tmp_path):
    """ppo, bon, DPO/KTO samples and eval all call user functions through call_function: prompts
    arrive as text (a conversation as its last message), the output is checked in one place."""
    from kilter.rewards.base import call_function

    seen = []

    def echo(prompts, responses):
        seen.extend(prompts)
        return torch.tensor([float(len(r)) for r in responses])  # a tensor is accepted too

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review the lamp."}]
    assert call_function(echo, ["plain", chat], ["ab", ""]) == [2.0, 0.0]
    assert seen == ["plain", "Review the lamp."]
    with pytest.raises(KilterError, match="returned 1 rewards for 2 responses"):
        call_function(lambda p, r: [1.0], ["a", "b"], ["x", "y"])
    with pytest.raises(KilterError, match="non-finite"):
        call_function(lambda p, r: [1.0, float("nan")], ["a", "b"], ["x", "y"])
    with pytest.raises(KilterError, match="list of numbers"):
        call_function(lambda p, r: ["good", "bad"], ["a", "b"], ["x", "y"])
    # a file path with a directory and a module path load the same way
    f = tmp_path / "sub" / "my_reward.py"
    f.parent.mkdir()
    f.write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    assert call_function(load_function(f"{f}:length"), ["p"], ["abc"]) == [3.0]


def test_reward_device_places_the_reward_models(reward_dirs, monkeypatch):
    from kilter.rewards.base import RewardConfig, build_reward

    placed = []
    original = ModelReward.__init__

    def spy(self, path, *args, **kwargs):
        placed.append(args[3] if len(args) > 3 else kwargs.get("device"))
        original(self, path, *args, **kwargs)

    monkeypatch.setattr(ModelReward, "__init__", spy)
    cfg = RewardConfig(model=str(reward_dirs / "member-0"), device="cpu")
    pipe = build_reward(cfg, device="cuda:3")  # the trainer's device is overridden by reward.device
    assert placed == ["cpu"]
    assert {p.device.type for p in pipe.sources[0][0].model.model.parameters()} == {"cpu"}
    build_reward(RewardConfig(model=str(reward_dirs / "member-0")), device="cpu")
    assert placed[-1] == "cpu"  # null: the trainer's device
    with pytest.raises(ConfigError, match="reward.device=cuda:7"):
        build_reward(RewardConfig(model=str(reward_dirs / "member-0"), device="cuda:7"))
