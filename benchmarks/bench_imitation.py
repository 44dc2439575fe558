"""imitation's PreferenceComparisons on CartPole at the budget of ``bench_control.py`` (run in benchmarks/.venv-imitation).

The same PPO hyper-parameters as configs/control/cartpole.yaml (4 envs, n_steps 256, batch 256,
10 epochs, gamma 0.98, GAE 0.8, lr 1e-3), the same 40 960 agent steps in 10 rounds, 300
synthetic comparisons of 50-step fragments (25 % before any RL, a hyperbolic schedule after),
and the same evaluation: the deterministic policy on gymnasium's CartPole-v1 (true reward, own
episode ends), 10 episodes seeded 10000 + 1000·seed + i.  ``--env kilter`` (default) trains on the
same training CartPole as Kilter (200-step episodes, a fall restarts the pole and costs -10);
``--env seals`` on imitation's own fixed-horizon ``seals/CartPole-v0`` (500 steps, reward 1 while
the pole is up, the episode going on after a fall).

    bash benchmarks/setup_imitation.sh
    benchmarks/.venv-imitation/bin/python benchmarks/bench_imitation.py --seeds 3
"""

from __future__ import annotations

import argparse
import json
import time

import gymnasium as gym
import numpy as np
import seals  # noqa: F401 - registers seals/CartPole-v0
import torch
from imitation.algorithms import preference_comparisons as pc
from imitation.rewards.reward_nets import BasicRewardNet
from imitation.util.networks import RunningNorm
from imitation.util.util import make_vec_env
from stable_baselines3 import PPO


class RestartOnFall(gym.Wrapper):
    """Kilter's training CartPole for imitation (gymnasium 0.29 API): 200-step episodes, a fall restarts the pole
    and costs -10 of reward -- what configs/control/cartpole.yaml sets with env.fixed_horizon / termination_penalty."""

    def __init__(self, env: gym.Env, horizon: int = 200, penalty: float = -10.0):
        super().__init__(env)
        self.horizon, self.penalty, self.t = horizon, penalty, 0

    def reset(self, **kwargs):
        self.t = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, r, terminated, truncated, info = self.env.step(action)
        self.t += 1
        if terminated or truncated:
            r = float(r) + (self.penalty if terminated else 0.0)
            obs, _ = self.env.reset()
        return obs, r, False, self.t >= self.horizon, info


gym.register("KilterCartPole-v0", entry_point=lambda: RestartOnFall(gym.make("CartPole-v1")))
ENVS = {"kilter": "KilterCartPole-v0", "seals": "seals:seals/CartPole-v0"}


def evaluate(agent: PPO, seed: int, episodes: int = 10) -> float:
    env = gym.make("CartPole-v1")
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=10_000 + 1000 * seed + i)
        done, total = False, 0.0
        while not done:
            action, _ = agent.predict(obs, deterministic=True)
            obs, r, terminated, truncated, _ = env.step(action)
            total += float(r)
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def run(seed: int, steps: int, comparisons: int, rounds: int, env_name: str) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    venv = make_vec_env(ENVS[env_name], rng=rng, n_envs=4)
    reward_net = BasicRewardNet(venv.observation_space, venv.action_space, normalize_input_layer=RunningNorm)
    model = pc.PreferenceModel(reward_net)
    trainer = pc.BasicRewardTrainer(preference_model=model, loss=pc.CrossEntropyRewardLoss(), epochs=10, rng=rng)
    agent = PPO(
        "MlpPolicy",
        venv,
        n_steps=256,
        batch_size=256,
        n_epochs=10,
        gamma=0.98,
        gae_lambda=0.8,
        learning_rate=1e-3,
        seed=seed,
        verbose=0,
        device="cpu",
    )
    generator = pc.AgentTrainer(algorithm=agent, reward_fn=reward_net, venv=venv, exploration_frac=0.0, rng=rng)
    algo = pc.PreferenceComparisons(
        generator,
        reward_net,
        num_iterations=rounds,
        fragmenter=pc.RandomFragmenter(warning_threshold=0, rng=rng),
        preference_gatherer=pc.SyntheticGatherer(rng=rng),
        reward_trainer=trainer,
        fragment_length=50,
        transition_oversampling=1,
        initial_comparison_frac=0.25,
        allow_variable_horizon=False,
        initial_epoch_multiplier=1,
        query_schedule="hyperbolic",
    )
    t0 = time.time()
    algo.train(total_timesteps=steps, total_comparisons=comparisons)
    return {
        "library": "imitation",
        "env": env_name,
        "seed": seed,
        "final_true_return": evaluate(agent, seed),
        "comparisons": comparisons,
        "steps": agent.num_timesteps,
        "seconds": round(time.time() - t0, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40960)
    p.add_argument("--comparisons", type=int, default=300)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument(
        "--env",
        choices=sorted(ENVS),
        default="kilter",
        help="kilter: the training CartPole of configs/control/cartpole.yaml; seals: seals/CartPole-v0",
    )
    args = p.parse_args()
    results = [run(s, args.steps, args.comparisons, args.rounds, args.env) for s in range(args.seeds)]
    for r in results:
        print(json.dumps(r), flush=True)
    vals = [r["final_true_return"] for r in results]
    print(
        f"imitation PreferenceComparisons, CartPole ({args.env}): final true return {np.mean(vals):.1f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.1f} "
        f"(per seed {', '.join(f'{v:.0f}' for v in vals)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
