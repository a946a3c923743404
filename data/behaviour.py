"""Train the behaviour policies the MuJoCo datasets are collected with (issue #3).

D4RL cannot be downloaded here, so the project trains its own data-collecting policies:
single-agent PPO on the whole robot (the datasets are single-agent data split into
agents afterwards, like D4RL's ant), vectorised over `--num-envs` simulators.

    python data/behaviour.py --task ant --total-steps 10_000_000      # resumes if interrupted

Training resumes from `data/policies/{name}/checkpoint.pt` (weights, optimiser, running
statistics, step, RNG state: about 2 MB, small enough to commit, so a run can span
sessions and machines). Every `--snapshot-every` steps the policy alone (weights and
observation statistics) is saved to `data/policies/{name}/step_{N}.pt`; the datasets
(random, medium, full-replay, expert) are rebuilt from these. Ctrl-C or SIGTERM saves a
checkpoint before exiting. On a machine with many cores, `--async-envs` steps the
simulators in parallel processes.

Reacher: `--elbow 1` adds a shaping penalty whenever the elbow angle is negative, so the
team's arm bends one way by construction; the opposite team is its mirror image.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # envs/, when run as a script
from envs.ant import FourAgentAnt  # noqa: E402
from envs.reacher import TwoAgentReacher  # noqa: E402

# the single-agent simulator behind each multi-agent task, as envs/ defines it
GYM_IDS = {team.task: (team.gym_id, team.gym_kwargs) for team in (FourAgentAnt, TwoAgentReacher)}


def vector_env(task: str, num_envs: int, parallel: bool = False) -> gym.vector.VectorEnv:
    """`num_envs` simulators of a task's robot. An environment whose episode ends is reset in the
    same step: the returned observation starts the next episode, the last one is in info["final_obs"]."""
    gym_id, kwargs = GYM_IDS[task]
    vector = gym.vector.AsyncVectorEnv if parallel else gym.vector.SyncVectorEnv
    return vector([lambda: gym.make(gym_id, **kwargs) for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


@dataclass
class Args:
    task: str = "ant"
    """ant or reacher"""
    name: str | None = None
    """run name (default: the task, plus the elbow sign for reacher)"""
    elbow: int = 0
    """reacher only: +1 or -1 penalises the elbow bending the other way; 0 no shaping"""
    elbow_penalty: float = 1.0
    """weight of the elbow shaping penalty (per radian on the wrong side)"""
    seed: int = 0
    """seed of everything random in the run"""
    total_steps: int = 10_000_000
    """environment steps in all"""
    num_envs: int = 16
    """simulators stepped together"""
    num_steps: int = 128
    """steps per simulator between updates"""
    learning_rate: float = 3e-4
    """Adam learning rate, annealed linearly to 0 over total_steps"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    epochs: int = 10
    """passes over each batch"""
    minibatches: int = 32
    """minibatches per pass"""
    clip: float = 0.2
    """PPO ratio clipping"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    max_grad_norm: float = 0.5
    """gradient norm clipping"""
    hidden: int = 64
    """units in each of the two hidden layers"""
    init_log_std: float = -1.0
    """initial log standard deviation of the actions. Ant pays 0.5 |a|^2 per step for control and
    earns 1 for staying up: with std 1 the first policies do better by falling over early"""
    snapshot_every: int = 250_000
    """environment steps between policy snapshots in data/policies/"""
    threads: int = 1
    """torch threads (1 leaves the other core to the simulators or another job)"""
    async_envs: bool = False
    """step the simulators in parallel processes (worth it with many cores)"""
    policies_dir: str = "data/policies"
    """where the checkpoint and the policy snapshots go, to be committed (relative: from the repository root)"""


class RunningStats:
    """Running mean and variance over batches (Chan et al.'s parallel update)."""

    def __init__(self, shape=()):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4

    def update(self, x: np.ndarray) -> None:
        mean, var, n = x.mean(0), x.var(0), len(x)
        delta, total = mean - self.mean, self.count + n
        self.mean = self.mean + delta * n / total
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class BehaviourPolicy(nn.Module):
    """Gaussian policy with a state-independent standard deviation, on normalised observations."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, init_log_std: float = 0.0):
        super().__init__()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.mean = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, act_dim)
        )
        self.log_std = nn.Parameter(torch.full((act_dim,), init_log_std))

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs - self.obs_mean) / self.obs_std).clamp(-10, 10)

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.mean(self.normalize(obs)), self.log_std.exp())

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        dist = self.distribution(torch.as_tensor(obs, dtype=torch.float32))
        action = dist.mean if deterministic else dist.sample()
        return action.clamp(-1, 1).numpy()


def load_policy(path: Path) -> BehaviourPolicy:
    snapshot = torch.load(path, weights_only=True)
    policy = BehaviourPolicy(snapshot["obs_dim"], snapshot["act_dim"], snapshot["hidden"])
    policy.load_state_dict(snapshot["policy"])
    return policy


def elbow_angle(obs: np.ndarray) -> np.ndarray:
    """Reacher's elbow angle q1 from its observation (cos q1 at 1, sin q1 at 3)."""
    return np.arctan2(obs[..., 3], obs[..., 1])


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    if args.task not in GYM_IDS:
        sys.exit(f"error: unknown task '{args.task}'; choose one of: {', '.join(GYM_IDS)}")
    name = args.name or (args.task if args.task == "ant" or args.elbow == 0 else f"reacher-elbow{args.elbow:+d}")
    snapshot_dir = ROOT / args.policies_dir / name
    snapshot_dir.mkdir(parents=True, exist_ok=True)

    envs = vector_env(args.task, args.num_envs, parallel=args.async_envs)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    policy = BehaviourPolicy(obs_dim, act_dim, args.hidden, args.init_log_std)
    value = nn.Sequential(nn.Linear(obs_dim, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 1))
    optimizer = torch.optim.Adam([*policy.parameters(), *value.parameters()], lr=args.learning_rate, eps=1e-5)
    obs_stats, return_stats = RunningStats(obs_dim), RunningStats()

    batch = args.num_envs * args.num_steps
    global_step, episode_returns, discounted = 0, [], np.zeros(args.num_envs)
    checkpoint_path = snapshot_dir / "checkpoint.pt"
    if checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, weights_only=False)
        policy.load_state_dict(ckpt["policy"])
        value.load_state_dict(ckpt["value"])
        optimizer.load_state_dict(ckpt["optimizer"])
        obs_stats.load_state_dict(ckpt["obs_stats"])
        return_stats.load_state_dict(ckpt["return_stats"])
        global_step, episode_returns = ckpt["global_step"], ckpt["episode_returns"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        print(f"resuming {name} at step {global_step}", flush=True)
        next_obs, _ = envs.reset(seed=args.seed + global_step)  # episodes in flight are not saved
    else:
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        next_obs, _ = envs.reset(seed=args.seed)
        save_snapshot(policy, obs_stats, snapshot_dir, 0, [], obs_dim, act_dim, args)  # the random policy
    episode_return = np.zeros(args.num_envs)

    def save_checkpoint() -> None:
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save(
            {
                "args": asdict(args), "policy": policy.state_dict(), "value": value.state_dict(),
                "optimizer": optimizer.state_dict(), "obs_stats": obs_stats.state_dict(),
                "return_stats": return_stats.state_dict(), "global_step": global_step,
                "episode_returns": episode_returns[-1000:],
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            },
            tmp,
        )  # fmt: skip
        tmp.replace(checkpoint_path)  # a crash while saving leaves the previous checkpoint whole

    stop = []  # set by SIGTERM / Ctrl-C: finish the current update, save, exit
    previous = {sig: signal.signal(sig, lambda *_: stop.append(True)) for sig in (signal.SIGTERM, signal.SIGINT)}
    start, start_step = time.time(), global_step
    while global_step < args.total_steps and not stop:
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * max(1.0 - global_step / args.total_steps, 0.0)
        obs_buf = np.zeros((args.num_steps, args.num_envs, obs_dim), dtype=np.float32)
        act_buf = np.zeros((args.num_steps, args.num_envs, act_dim), dtype=np.float32)
        logp_buf, rew_buf, done_buf = (np.zeros((args.num_steps, args.num_envs), dtype=np.float32) for _ in range(3))
        value_buf = np.zeros((args.num_steps + 1, args.num_envs), dtype=np.float32)
        for t in range(args.num_steps):
            obs_stats.update(next_obs)
            policy.obs_mean[:] = torch.as_tensor(obs_stats.mean, dtype=torch.float32)
            policy.obs_std[:] = torch.as_tensor(np.sqrt(obs_stats.var + 1e-8), dtype=torch.float32)
            obs_t = torch.as_tensor(next_obs, dtype=torch.float32)
            with torch.no_grad():
                dist = policy.distribution(obs_t)
                action = dist.sample()
                logp_buf[t] = dist.log_prob(action).sum(-1).numpy()
                value_buf[t] = value(policy.normalize(obs_t)).squeeze(-1).numpy()
            obs_buf[t], act_buf[t] = next_obs, action.numpy()
            next_obs, reward, terminated, truncated, info = envs.step(np.clip(action.numpy(), -1, 1))
            done = terminated | truncated
            episode_return += reward
            episode_returns += episode_return[done].tolist()  # the task's return, without shaping
            episode_return[done] = 0.0
            if args.elbow:  # shaping: penalise the elbow on the wrong side
                reward = reward - args.elbow_penalty * np.maximum(-args.elbow * elbow_angle(obs_buf[t]), 0.0)
            # scale rewards by the running std of the discounted return (as CleanRL's PPO)
            discounted = discounted * args.gamma * (1 - done) + reward
            return_stats.update(discounted)
            rew_buf[t] = reward / np.sqrt(return_stats.var + 1e-8)
            done_buf[t] = done
            if truncated.any():  # a time limit is not a terminal: bootstrap from the final state
                final = torch.as_tensor(np.stack(info["final_obs"][truncated]), dtype=torch.float32)
                with torch.no_grad():
                    rew_buf[t, truncated] += args.gamma * value(policy.normalize(final)).squeeze(-1).numpy()
            global_step += args.num_envs
        with torch.no_grad():
            value_buf[-1] = value(policy.normalize(torch.as_tensor(next_obs, dtype=torch.float32))).squeeze(-1).numpy()

        advantages = np.zeros_like(rew_buf)
        running = np.zeros(args.num_envs, dtype=np.float32)
        for t in reversed(range(args.num_steps)):
            nonterminal = 1.0 - done_buf[t]  # next_obs after a done is a new episode's first
            delta = rew_buf[t] + args.gamma * value_buf[t + 1] * nonterminal - value_buf[t]
            running = delta + args.gamma * args.gae_lambda * nonterminal * running
            advantages[t] = running
        returns = advantages + value_buf[:-1]

        b_obs = torch.as_tensor(obs_buf.reshape(batch, obs_dim))
        b_act = torch.as_tensor(act_buf.reshape(batch, act_dim))
        b_logp, b_adv, b_ret = (torch.as_tensor(x.reshape(batch)) for x in (logp_buf, advantages, returns))
        for _ in range(args.epochs):
            for idx in torch.randperm(batch).chunk(args.minibatches):
                dist = policy.distribution(b_obs[idx])
                ratio = (dist.log_prob(b_act[idx]).sum(-1) - b_logp[idx]).exp()
                adv = (b_adv[idx] - b_adv[idx].mean()) / (b_adv[idx].std() + 1e-8)
                policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - args.clip, 1 + args.clip) * adv).mean()
                value_loss = ((value(policy.normalize(b_obs[idx])).squeeze(-1) - b_ret[idx]) ** 2).mean()
                loss = policy_loss + args.vf_coef * value_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_([*policy.parameters(), *value.parameters()], args.max_grad_norm)
                optimizer.step()

        recent = np.mean(episode_returns[-50:]) if episode_returns else float("nan")
        sps = (global_step - start_step) / (time.time() - start)
        if global_step // batch % 10 == 0:
            print(f"{name} step {global_step}: return {recent:.1f} (last 50 episodes), {sps:.0f} steps/s", flush=True)
        if global_step // args.snapshot_every != (global_step - batch) // args.snapshot_every:
            save_snapshot(policy, obs_stats, snapshot_dir, global_step, episode_returns[-50:], obs_dim, act_dim, args)
            save_checkpoint()
    save_checkpoint()
    if stop:
        print(f"{name}: stopped at step {global_step}, checkpoint saved; run the same command to resume", flush=True)
    else:  # the final policy
        save_snapshot(policy, obs_stats, snapshot_dir, global_step, episode_returns[-50:], obs_dim, act_dim, args)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    envs.close()


def save_snapshot(policy, obs_stats, folder: Path, step: int, recent_returns, obs_dim, act_dim, args) -> None:
    """The policy alone, small enough to commit: data/policies/{name}/step_{N}.pt."""
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    state["obs_mean"] = torch.as_tensor(obs_stats.mean, dtype=torch.float32)
    state["obs_std"] = torch.as_tensor(np.sqrt(obs_stats.var + 1e-8), dtype=torch.float32)
    torch.save(
        {
            "policy": state, "obs_dim": obs_dim, "act_dim": act_dim, "hidden": args.hidden, "step": step,
            "training_return": float(np.mean(recent_returns)) if len(recent_returns) else None,
            "task": args.task, "elbow": args.elbow,
        },
        folder / f"step_{step:09d}.pt",
    )  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
