"""The agent-side reward wrapper, and the file exchange with people."""

import json

import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv

from kilter.control.envs import EnvConfig, make_env
from kilter.control.human import ClipConfig, HumanLabeler, LabelingTimeout, read_answers
from kilter.control.labelers import LabelerConfig
from kilter.control.segments import Segment, SegmentCollector
from kilter.control.wrapper import LearnedRewardVecEnv
from kilter.errors import DataError


def test_agent_sees_the_normalised_learned_reward_and_never_the_true_one():
    seen = []

    def reward_fn(obs, acts):
        seen.append((obs.copy(), acts.copy()))
        return (obs[:, 2] * 100.0 + 50.0).astype(np.float32)  # pole angle, badly scaled on purpose

    cfg = EnvConfig(id="cartpole", n_envs=2, fixed_horizon=50)
    base = DummyVecEnv([lambda: make_env(cfg) for _ in range(2)])
    col = SegmentCollector(2, length=10, pool_size=20)
    venv = LearnedRewardVecEnv(base, reward_fn, col, normalize=True)
    venv.seed(0)
    obs = venv.reset()
    rewards, infos_all = [], []
    for _ in range(200):
        acts = np.array([0, 1])
        new_obs, r, _, infos = venv.step(acts)
        assert np.array_equal(seen[-1][0], obs)  # r̂(s_t, a_t): the observation the action was taken in
        obs = new_obs
        rewards.append(r)
        infos_all += infos
    rewards = np.concatenate(rewards)
    assert not np.all(np.isin(rewards, [1.0, -0.0, 0.0]))  # not the CartPole reward
    assert abs(rewards[100:].mean()) < 0.5 and 0.5 < rewards[100:].std() < 1.5  # running standardisation
    assert all(i["true_reward"] == 1.0 for i in infos_all)  # the true reward is logged on the side
    assert venv.episode_true and venv.true_sum == 400.0
    assert len(col.pool) == 20


def _segment(uid: int) -> Segment:
    frames = np.full((4, 6, 8, 3), uid * 20, dtype=np.uint8)
    return Segment(
        obs=np.zeros((4, 1), np.float32), acts=np.zeros(4, np.int64), true_rewards=np.zeros(4), frames=frames, uid=uid
    )


def test_human_labeler_posts_clips_and_reads_answers(tmp_path):
    lab = HumanLabeler(tmp_path / "queries", LabelerConfig(kind="human", poll_s=0.01), ClipConfig(), fps=20)
    pairs = [(_segment(1), _segment(2)), (_segment(3), _segment(4))]
    ids = lab.post(pairs)
    assert ids == ["s1-s2", "s3-s4"]
    pending = [json.loads(line) for line in lab.pending_path.read_text().splitlines()]
    assert [p["id"] for p in pending] == ids
    assert pending[0]["left"].endswith(".webm")  # the default: a real video, played by <video loop>
    assert (tmp_path / "queries" / pending[0]["left"]).read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # EBML (WebM)
    lab.post(pairs)  # posting again (a resumed run) adds nothing
    assert len(lab.pending_path.read_text().splitlines()) == 2
    lab.answers_path.write_text('{"id": "s3-s4", "answer": "equal"}\n{"id": "s1-s2", "answer": "right"}\n')
    assert lab.label(pairs, np.random.default_rng(0)) == ["right", "equal"]


def test_human_labeler_times_out_with_a_one_line_error(tmp_path):
    lab = HumanLabeler(tmp_path, LabelerConfig(kind="human", poll_s=0.01, wait_timeout_s=0.05), ClipConfig(), fps=20)
    with pytest.raises(LabelingTimeout, match="0 of 1 queries answered"):
        lab.label([(_segment(1), _segment(2))], np.random.default_rng(0))


def test_malformed_answer_names_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": "a", "answer": "left"}\n{"id": "b", "answer": "maybe"}\n')
    with pytest.raises(DataError, match=r"answers.jsonl line 2: field 'answer'"):
        read_answers(path)
