"""imitation's PreferenceComparisons on CartPole and Pendulum at the budgets of ``bench_control.py`` (in benchmarks/.venv-imitation).

``--task cartpole`` (default): the same PPO hyper-parameters as configs/control/cartpole.yaml (4 envs, n_steps 256, batch 256,
10 epochs, gamma 0.98, GAE 0.8, lr 1e-3), the same 40 960 agent steps in 10 rounds, 300
synthetic comparisons of 50-step fragments (25 % before any RL, a hyperbolic schedule after),
and the same evaluation: the deterministic policy on gymnasium's CartPole-v1 (true reward, own
episode ends), 10 episodes seeded 10000 + 1000·seed + i.  ``--env kilter`` (default) trains on the
same training CartPole as Kilter (200-step episodes, a fall restarts the pole and costs -10);
``--env seals`` on imitation's own fixed-horizon ``seals/CartPole-v0`` (500 steps, reward 1 while
the pole is up, the episode going on after a fall).

``--task pendulum``: the SAC agent of configs/control/pendulum.yaml (lr 1e-3, batch 256,
learning_starts 1000, [64, 64] networks, 1 env), the 10 000 agent steps in 5 rounds and 400
comparisons of 25-step fragments of ``bench_control.py --tasks pendulum``, evaluated like Kilter:
the deterministic policy on Pendulum-v1, 5 episodes seeded 10000 + 1000·seed + i.

    bash benchmarks/setup_imitation.sh
    benchmarks/.venv-imitation/bin/python benchmarks/bench_imitation.py --seeds 3
    benchmarks/.venv-imitation/bin/python benchmarks/bench_imitation.py --task pendulum --seeds 2
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
from stable_baselines3 import PPO, SAC


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
# per task: the real task evaluated, and the defaults matching bench_control.py's budget for it
TASKS = {
    "cartpole": {
        "eval_id": "CartPole-v1",
        "episodes": 10,
        "steps": 40960,
        "comparisons": 300,
        "rounds": 10,
        "fragment": 50,
        "n_envs": 4,
    },
    "pendulum": {
        "eval_id": "Pendulum-v1",
        "episodes": 5,
        "steps": 10000,
        "comparisons": 400,
        "rounds": 5,
        "fragment": 25,
        "n_envs": 1,
    },
}


def evaluate(agent, seed: int, episodes: int = 10, env_id: str = "CartPole-v1") -> float:
    env = gym.make(env_id)
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


def _agent(task: str, venv, seed: int):
    if task == "pendulum":  # configs/control/pendulum.yaml: SAC, Kilter's default [64, 64] networks
        return SAC(
            "MlpPolicy",
            venv,
            learning_rate=1e-3,
            batch_size=256,
            learning_starts=1000,
            policy_kwargs={"net_arch": [64, 64]},
            seed=seed,
            verbose=0,
            device="cpu",
        )
    return PPO(
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


def run(seed: int, steps: int, comparisons: int, rounds: int, env_name: str, task: str = "cartpole") -> dict:
    spec = TASKS[task]
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    env_id = ENVS[env_name] if task == "cartpole" else spec["eval_id"]
    venv = make_vec_env(env_id, rng=rng, n_envs=spec["n_envs"])
    reward_net = BasicRewardNet(venv.observation_space, venv.action_space, normalize_input_layer=RunningNorm)
    model = pc.PreferenceModel(reward_net)
    trainer = pc.BasicRewardTrainer(preference_model=model, loss=pc.CrossEntropyRewardLoss(), epochs=10, rng=rng)
    agent = _agent(task, venv, seed)
    generator = pc.AgentTrainer(algorithm=agent, reward_fn=reward_net, venv=venv, exploration_frac=0.0, rng=rng)
    algo = pc.PreferenceComparisons(
        generator,
        reward_net,
        num_iterations=rounds,
        fragmenter=pc.RandomFragmenter(warning_threshold=0, rng=rng),
        preference_gatherer=pc.SyntheticGatherer(rng=rng),
        reward_trainer=trainer,
        fragment_length=spec["fragment"],
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
        "task": task,
        "env": env_name if task == "cartpole" else spec["eval_id"],
        "seed": seed,
        "final_true_return": evaluate(agent, seed, spec["episodes"], spec["eval_id"]),
        "comparisons": comparisons,
        "steps": agent.num_timesteps,
        "seconds": round(time.time() - t0, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="cartpole")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="agent steps (default: bench_control.py's for the task)")
    p.add_argument("--comparisons", type=int, default=None, help="labels (default: bench_control.py's)")
    p.add_argument("--rounds", type=int, default=None, help="iterations (default: bench_control.py's rounds)")
    p.add_argument(
        "--env",
        choices=sorted(ENVS),
        default="kilter",
        help="cartpole only. kilter: the training CartPole of configs/control/cartpole.yaml; seals: seals/CartPole-v0",
    )
    args = p.parse_args()
    spec = TASKS[args.task]
    steps, comparisons, rounds = (
        args.steps or spec["steps"],
        args.comparisons or spec["comparisons"],
        args.rounds or spec["rounds"],
    )
    results = []
    for s in range(args.seeds):
        results.append(run(s, steps, comparisons, rounds, args.env, args.task))
        print(json.dumps(results[-1]), flush=True)
    vals = [r["final_true_return"] for r in results]
    where = f"CartPole ({args.env})" if args.task == "cartpole" else "Pendulum-v1"
    print(
        f"imitation PreferenceComparisons, {where}: final true return {np.mean(vals):.1f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.1f} "
        f"(per seed {', '.join(f'{v:.0f}' for v in vals)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
