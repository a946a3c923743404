# Independent Behaviour Cloning (IBC), the imitation baseline of the paper (section 5.1).
#
# Each agent fits its own policy to its own recorded actions: maximum likelihood for
# categorical actions, mean squared error of a tanh-bounded deterministic action for
# continuous ones. Agents never see each other's actions, so on a dataset that mixes
# conventions each one copies its own marginal behaviour: IBC coordinates only when the
# data mostly does.
#
# Differences from the paper: no memory module yet under partial observability (each
# agent acts on its current observation). The agents' networks are one batched network
# ([agents, in, out] weights).
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # envs/ and data/, without installing
import data  # noqa: E402
import envs  # noqa: E402


@dataclass
class Args:
    task: str = "coordination"
    """environment: coordination, reacher or ant"""
    obs: str | None = None
    """observation setting (default: the task's first; coordination: fo; reacher: all-observant, independent,
    leader-only; ant: fo, po)"""
    dataset: str = "unfavorable"
    """dataset name (coordination: favorable, neutral, unfavorable; reacher: expert-mix; ant: random, medium,
    full-replay, expert) or a .npz/.hdf5 file or a Minari dataset folder"""
    seed: int = 0
    """seed of everything random in the run"""
    total_steps: int | None = None
    """gradient steps (default: per task, see TASK_DEFAULTS)"""
    eval_every: int | None = None
    """evaluate every this many steps, 0 for only at the end (default: per task)"""
    eval_episodes: int = 100
    """episodes per evaluation (greedy actions)"""
    cuda: bool = False
    """use the GPU when one is available"""
    runs_dir: str = "runs"
    """where the run folder (logs, model, result.json) is written"""
    batch_size: int = 256
    """transitions per gradient step"""
    learning_rate: float = 3e-4
    """Adam learning rate"""
    hidden: int | None = None
    """units in each of the two hidden layers (default: per task; paper 256)"""


# Defaults that depend on the task, used for every field left at None.
TASK_DEFAULTS = {
    # coordination: 64 units as in every script on this task (two actions, a 1-d observation)
    "coordination": dict(total_steps=1000, eval_every=0, hidden=64),
    # MuJoCo: the paper's 1e6 steps and 2x256 networks
    "reacher": dict(total_steps=1_000_000, eval_every=50_000, hidden=256),
    "ant": dict(total_steps=1_000_000, eval_every=50_000, hidden=256),
}


class BatchedLinear(nn.Module):
    """One linear layer per agent, applied as a single batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, members: int, fan_in: int, fan_out: int):
        super().__init__()
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default initialisation, for each member
        self.weight = nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class Policies(nn.Module):
    """All agents' policies: observations [N, B, O] -> action logits [N, B, n_actions] (categorical
    actions) or pre-tanh actions [N, B, act_dim] (continuous actions, n_actions None)."""

    def __init__(self, n_agents: int, obs_dim: int, n_actions: int | None, act_dim: int, hidden: int, obs_mean, obs_std):
        super().__init__()
        self.categorical = n_actions is not None
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32).unsqueeze(1))  # [N, 1, O]
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32).unsqueeze(1))
        self.net = nn.Sequential(
            BatchedLinear(n_agents, obs_dim, hidden), nn.ReLU(),
            BatchedLinear(n_agents, hidden, hidden), nn.ReLU(),
            BatchedLinear(n_agents, hidden, n_actions if self.categorical else act_dim),
        )  # fmt: skip

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net((obs - self.obs_mean) / self.obs_std)

    def loss(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Behaviour-cloning loss of the recorded actions ([N, B] integers or [N, B, act_dim])."""
        out = self(obs)
        if self.categorical:
            return F.cross_entropy(out.flatten(0, 1), actions.flatten())
        return ((torch.tanh(out) - actions) ** 2).mean()

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions of the N agents from their observations [N, O]."""
        out = self(torch.as_tensor(obs, device=self.obs_mean.device).unsqueeze(1)).squeeze(1)
        return (out.argmax(-1) if self.categorical else torch.tanh(out)).cpu().numpy()


def main(args: Args) -> dict:
    for key, value in TASK_DEFAULTS.get(args.task, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    start_time = time.time()
    env = envs.make(args.task, args.obs)
    dataset = data.load(env, args.dataset)
    run_name = f"{args.task}-{env.obs_setting}-{Path(args.dataset).stem}__ibc__{args.seed}__{int(start_time)}"
    run_dir = Path(args.runs_dir) / run_name
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    # agent-major on the device, so that a batch is already [N, B, ...]
    observations = torch.as_tensor(dataset.observations, device=device).transpose(0, 1)
    actions = torch.as_tensor(dataset.actions, device=device).transpose(0, 1)
    obs_mean, obs_std = dataset.stats("observations")
    policy = Policies(env.n_agents, env.obs_dim, env.n_actions, env.act_dim, args.hidden, obs_mean, obs_std).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)

    def evaluate() -> tuple[float, float]:
        returns = envs.evaluate(env, policy.act, args.eval_episodes, seed=args.seed)
        return float(returns.mean()), data.normalized_score(args.task, returns)

    print(f"{run_name}: {len(dataset)} transitions, {args.total_steps} steps on {device}", flush=True)
    for step in range(1, args.total_steps + 1):
        idx = torch.randint(len(dataset), (args.batch_size,), device=device)
        loss = policy.loss(observations[:, idx], actions[:, idx])
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()

        if step % 100 == 0:
            writer.add_scalar("losses/bc_loss", loss.item(), step)
            writer.add_scalar("charts/SPS", int(step / (time.time() - start_time)), step)
        if args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
            ret, score = evaluate()
            writer.add_scalar("eval/return", ret, step)
            writer.add_scalar("eval/normalized_score", score, step)
            print(f"step {step}: return {ret:.2f}, normalized score {score:.3f}", flush=True)

    ret, score = evaluate()
    writer.add_scalar("eval/return", ret, args.total_steps)
    writer.add_scalar("eval/normalized_score", score, args.total_steps)
    writer.close()
    torch.save(
        {
            "args": asdict(args),
            "policy": policy.state_dict(),  # includes the observation normalisation statistics
            "optimizer": optimizer.state_dict(),
            "step": args.total_steps,
            "rng": torch.get_rng_state(),
        },
        run_dir / "model.pt",
    )
    result = {
        "task": args.task, "obs": env.obs_setting, "dataset": args.dataset, "algo": "ibc", "seed": args.seed,
        "normalized_score": score, "return": ret, "eval_episodes": args.eval_episodes,
        "total_steps": args.total_steps, "wall_seconds": time.time() - start_time, "device": str(device),
    }  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(f"return {ret:.3f}, results in {run_dir}")
    print(f"normalized_score: {score:.4f}")
    return result


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.UserInputError as error:
        sys.exit(f"error: {error}")
