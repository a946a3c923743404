# Independent Behaviour Cloning (IBC), the imitation baseline of the paper (section 5.1).
#
# Each agent fits its own policy to its own recorded actions: maximum likelihood for
# categorical actions, mean squared error of a tanh-bounded deterministic action for
# continuous ones. Agents never see each other's actions, so on a dataset that mixes
# conventions each one copies its own marginal behaviour: IBC coordinates only when the
# data mostly does.
#
# Under partial observability each agent also conditions on its last `--memory` (observation,
# action) pairs through the memory module of Appendix A (see `Memory`).
#
# Differences from the paper: the agents' networks are one batched network ([agents, in, out]
# weights).
# On MuJoCo the training steps run under bfloat16 autocast (--bf16; the layers return float32) where
# the hardware has native bfloat16 (float32 elsewhere): 2-3x faster on CPUs with AMX, at the cost of
# bfloat16 rounding inside the matmuls. There the memory module is also compiled (--compile, needs a
# C++ compiler on CPU): 1.3x faster on ant PO.
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # envs/ and data/, without installing
import data  # noqa: E402
import envs  # noqa: E402


T = TypeVar("T")
# A setting whose default depends on the task: its docstring says what it is (tyro would print "default: None").
PerTask = Annotated[T | None, tyro.conf.arg(help_behavior_hint="")]


@dataclass
class Args:
    task: str = "coordination"
    """environment: coordination, reacher or ant"""
    obs: PerTask[str] = None
    """observation setting (default: the task's first; coordination: fo; reacher: all-observant, independent,
    leader-only; ant: fo, po)"""
    dataset: PerTask[str] = None
    """dataset name (coordination: favorable, neutral, unfavorable; reacher: expert-mix; ant: random, medium,
    full-replay, expert) or a .npz/.hdf5 file or a Minari dataset folder (default: per task)"""
    seed: int = 0
    """seed of everything random in the run"""
    total_steps: PerTask[int] = None
    """gradient steps (default: per task, see TASK_DEFAULTS)"""
    eval_every: PerTask[int] = None
    """evaluate every this many steps, 0 for only at the end (default: per task)"""
    eval_episodes: int = 100
    """episodes per evaluation (greedy actions)"""
    cuda: bool = False
    """use the GPU when one is available"""
    runs_dir: str = "runs"
    """where the run folder (logs, model, result.json) is written"""
    resume: str | None = None
    """a run folder (or its model.pt) to continue: its settings, weights, optimisers, RNG state and step are
    restored and the run goes on in that folder (--total-steps, if given, replaces the saved budget)"""
    save_every: int = 2_000
    """gradient steps between checkpoints (model.pt, everything needed to resume); Ctrl-C and SIGTERM also save one"""
    batch_size: int = 256
    """transitions per gradient step"""
    learning_rate: float = 3e-4
    """Adam learning rate"""
    hidden: PerTask[int] = None
    """units in each of the two hidden layers (default: per task; paper 256)"""
    memory: PerTask[int] = None
    """past (observation, action) pairs each agent remembers; default: 10 (the paper's) when the
    observation setting hides part of the state, 0 (no memory module) otherwise"""
    memory_dim: int = 128
    """width e_h of the memory module's embedding and of its summary"""
    memory_learning_rate: float = 1e-4
    """Adam learning rate of the memory module (the paper's, for every algorithm)"""
    bf16: PerTask[bool] = None
    """run the training steps' matmuls under bfloat16 autocast: about 2.7x faster on CPUs with AMX (and on
    recent GPUs); the layers return float32, so losses, targets and evaluation stay float32 (default: per
    task: on for MuJoCo, off for the coordination game; off, with a note, where the hardware has no native
    bfloat16 matmuls, as there it is slower than float32)"""
    compile: PerTask[bool] = None
    """compile the memory module with torch.compile, fusing its attention's elementwise work (about a minute
    of compilation, needs a C++ compiler on CPU; default: on for MuJoCo tasks when one is found)"""


# Defaults that depend on the task, used for every field left at None.
TASK_DEFAULTS = {
    # coordination: 64 units as in every script on this task (two actions, a 1-d observation)
    "coordination": dict(dataset="unfavorable", total_steps=1000, eval_every=0, hidden=64, bf16=False, compile=False),
    # MuJoCo: the paper's 1e6 steps and 2x256 networks
    "reacher": dict(dataset="expert-mix", total_steps=1_000_000, eval_every=50_000, hidden=256, bf16=True, compile=True),
    "ant": dict(dataset="medium", total_steps=1_000_000, eval_every=50_000, hidden=256, bf16=True, compile=True),
}


class BatchedLinear(nn.Module):
    """One linear layer per agent, applied as a single batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, members: int, fan_in: int, fan_out: int):
        super().__init__()
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default initialisation, for each member
        self.weight = nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight).float()  # float32 outside the matmul under --bf16


class Memory(nn.Module):
    """Each agent's summary of its last K (observation, action) pairs (paper Appendix A): a linear
    embedding plus sinusoidal positional encodings, one scaled dot-product self-attention layer
    with a skip connection and layer norm, then soft-attention pooling (a bias-less key layer
    and a trainable query) into one vector. Steps before the episode's start are masked out;
    with no past at all the summary is zero.
    All agents at once: tokens [N, B, K, O + A], mask [B, K] -> summaries [N, B, E]."""

    def __init__(self, n_agents: int, token_dim: int, length: int, dim: int):
        super().__init__()
        self.embed = BatchedLinear(n_agents, token_dim, dim)
        self.qkv = BatchedLinear(n_agents, dim, 3 * dim)
        self.norm_gain = nn.Parameter(torch.ones(n_agents, 1, 1, dim))
        self.norm_bias = nn.Parameter(torch.zeros(n_agents, 1, 1, dim))
        bound = 1 / math.sqrt(dim)
        self.soft_key = nn.Parameter(torch.empty(n_agents, dim, dim).uniform_(-bound, bound))
        self.soft_query = nn.Parameter(torch.randn(n_agents, dim, 1))
        position = torch.arange(length).unsqueeze(1) / 10_000 ** (torch.arange(0, dim, 2) / dim)
        self.register_buffer("position", torch.stack([position.sin(), position.cos()], -1).flatten(1))  # [K, E]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, b, k, _ = tokens.shape
        x = self.embed(tokens.flatten(1, 2)).view(n, b, k, -1) + self.position
        q, key, v = self.qkv(x.flatten(1, 2)).view(n, b, k, 3, -1).unbind(3)
        hidden = -1e9 * ~mask  # [B, K] additive mask: masked steps get no attention
        attention = torch.softmax(q @ key.transpose(-1, -2) / math.sqrt(x.shape[-1]) + hidden[:, None], -1)
        x = F.layer_norm(x + attention @ v, x.shape[-1:]) * self.norm_gain + self.norm_bias
        # keys @ query = x @ (W_key @ query): one [E, 1] vector per agent instead of [B * K, E] keys
        scores = torch.bmm(x.flatten(1, 2), self.soft_key @ self.soft_query).view(n, b, k)
        weights = torch.softmax(scores / math.sqrt(x.shape[-1]) + hidden, -1)
        return (weights.unsqueeze(-1) * x).sum(2) * mask.any(-1, keepdim=True)


class Policies(nn.Module):
    """All agents' policies: observations [N, B, O] (and, with memory, each agent's past observations
    [N, B, K, O], actions [N, B, K, A] and mask [B, K]) -> action logits [N, B, n_actions]
    (categorical actions) or pre-tanh actions [N, B, act_dim] (continuous actions)."""

    def __init__(self, env, hidden: int, obs_mean, obs_std, memory: int, memory_dim: int):
        super().__init__()
        n, self.categorical = env.n_agents, env.n_actions is not None
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32).unsqueeze(1))  # [N, 1, O]
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32).unsqueeze(1))
        self.memory = Memory(n, env.obs_dim + env.act_dim, memory, memory_dim) if memory else None
        self.net = nn.Sequential(
            BatchedLinear(n, env.obs_dim + (memory_dim if memory else 0), hidden), nn.ReLU(),
            BatchedLinear(n, hidden, hidden), nn.ReLU(),
            BatchedLinear(n, hidden, env.n_actions if self.categorical else env.act_dim),
        )  # fmt: skip

    def forward(self, obs, past_obs=None, past_actions=None, mask=None) -> torch.Tensor:
        x = (obs - self.obs_mean) / self.obs_std
        if self.memory is not None:
            past = (past_obs - self.obs_mean.unsqueeze(2)) / self.obs_std.unsqueeze(2)
            x = torch.cat([x, self.memory(torch.cat([past, past_actions], -1), mask)], -1)
        return self.net(x)

    def loss(self, actions: torch.Tensor, *inputs) -> torch.Tensor:
        """Behaviour-cloning loss of the recorded actions ([N, B] integers or [N, B, act_dim])."""
        out = self(*inputs)
        if self.categorical:
            return F.cross_entropy(out.flatten(0, 1), actions.flatten())
        return ((torch.tanh(out) - actions) ** 2).mean()

    @torch.no_grad()
    def act(self, obs: np.ndarray, *past: np.ndarray) -> np.ndarray:
        """Greedy actions of the N agents in E episodes from their observations [N, E, O] (and, with memory,
        their past observations [N, E, K, O], actions [N, E, K, A] and mask [E, K], as envs.evaluate passes them)."""
        device = self.obs_mean.device
        out = self(*(torch.as_tensor(x, device=device) for x in (obs, *past)))
        return (out.argmax(-1) if self.categorical else torch.tanh(out)).cpu().numpy()


def main(args: Args) -> dict:
    checkpoint = None
    if args.resume:  # the saved settings, except a new budget
        args, run_dir, checkpoint = data.resume(args)
    for key, value in TASK_DEFAULTS.get(args.task, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.bf16 = data.bf16_if_native(args.bf16, args.cuda)  # emulated bfloat16 is slower than float32
    start_time = time.time()
    env = envs.make(args.task, args.obs)
    dataset = data.load(env, args.dataset)
    if args.memory is None:
        args.memory = 10 if envs.partially_observed(env) else 0
    if args.memory and env.n_actions is not None:
        raise envs.UserInputError("--memory needs continuous actions (the coordination game is fully observed): use --memory 0")
    run_name = f"{args.task}-{env.obs_setting}-{Path(args.dataset).stem}__ibc__{args.seed}__{int(start_time)}"
    if checkpoint is None:
        run_dir = data.new_run_dir(args.runs_dir, run_name)
    writer = SummaryWriter(str(run_dir))  # a resumed run appends to its own logs
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    # agent-major on the device, so that a batch is already [N, B, ...]
    observations = torch.as_tensor(dataset.observations, device=device).transpose(0, 1)
    actions = torch.as_tensor(dataset.actions, device=device).transpose(0, 1)
    episode_first = torch.as_tensor(dataset.episode_first(), device=device)
    obs_mean, obs_std = dataset.stats("observations")
    policy = Policies(env, args.hidden, obs_mean, obs_std, args.memory, args.memory_dim).to(device)
    if args.memory and args.compile:  # fuses the attention's elementwise work
        data.compile_in_place(policy.memory, device=device)
    groups = [{"params": policy.net.parameters()}]
    if args.memory:
        groups.append({"params": policy.memory.parameters(), "lr": args.memory_learning_rate})
    optimizer = torch.optim.Adam(groups, lr=args.learning_rate)

    def inputs(idx: torch.Tensor) -> tuple:
        """The policies' inputs at transitions idx: observations, and with memory the agents' past."""
        if not args.memory:
            return (observations[:, idx],)
        past, mask = data.history_index(episode_first[idx], idx, args.memory)
        return observations[:, idx], observations[:, past], actions[:, past], mask

    def evaluate() -> tuple[float, float]:
        returns = envs.evaluate(env, policy.act, args.eval_episodes, seed=args.seed, memory=args.memory)
        return float(returns.mean()), data.normalized_score(args.task, returns)

    print(f"{run_dir.name}: {len(dataset)} transitions, {args.total_steps} steps on {device}", flush=True)

    def save_checkpoint(step: int) -> None:
        """Everything needed to evaluate the agents or to go on training (--resume), written atomically."""
        state = {
            "args": asdict(args),
            "policy": policy.state_dict(),  # includes the observation normalisation statistics
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": data.rng_state(),  # torch's generators: the only ones the training draws from
            "wall_seconds": wall_seconds(),
        }
        data.save_checkpoint(run_dir, state)

    start_step, previous_seconds = 0, 0.0
    if checkpoint is not None:
        start_step, previous_seconds = data.restore(checkpoint, run_dir, policy=policy, optimizer=optimizer)
    wall_seconds = lambda: previous_seconds + time.time() - start_time  # noqa: E731, over all sessions of the run

    # --bf16: the training steps' matmuls in bfloat16 (the layers hand back float32, and evaluation
    # runs without autocast)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    progress = data.Progress(args.total_steps, start_step)  # a line a minute between evaluations
    with data.stop_requests() as stop:
        for step in range(start_step + 1, args.total_steps + 1):
            with bf16:
                idx = torch.randint(len(dataset), (args.batch_size,), device=device)
                loss = policy.loss(actions[:, idx], *inputs(idx))
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                optimizer.step()

            if step % 100 == 0:
                progress(step, bc_loss=loss)
                writer.add_scalar("losses/bc_loss", loss.item(), step)
                writer.add_scalar("charts/SPS", int((step - start_step) / (time.time() - start_time)), step)
            if args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
                ret, score = evaluate()
                writer.add_scalar("eval/return", ret, step)
                writer.add_scalar("eval/normalized_score", score, step)
                print(f"step {step}: return {ret:.2f}, normalized score {score:.3f}", flush=True)
            if stop or step % args.save_every == 0:
                save_checkpoint(step)
            if stop:
                writer.close()
                raise data.Stopped(f"stopped at step {step}; go on with: python algos/ibc.py --resume {run_dir}")

    ret, score = evaluate()
    writer.add_scalar("eval/return", ret, args.total_steps)
    writer.add_scalar("eval/normalized_score", score, args.total_steps)
    writer.close()
    save_checkpoint(args.total_steps)
    result = {
        "task": args.task, "obs": env.obs_setting, "dataset": args.dataset, "algo": "ibc", "seed": args.seed,
        "normalized_score": score, "return": ret, "eval_episodes": args.eval_episodes,
        "total_steps": args.total_steps, "wall_seconds": wall_seconds(), "device": str(device),
        "run_dir": str(run_dir),
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
