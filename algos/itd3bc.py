# Independent TD3+BC (ITD3+BC), an independent-learner baseline of the paper (section 5.1).
#
# TD3+BC (Fujimoto & Gu 2021) run by every agent on its own: agent i learns twin critics
# Q_i1, Q_i2(o_i, a_i) of the team reward and a deterministic actor pi_i(o_i) = tanh(MLP) that
# maximises Q_i1 while staying close to the agent's recorded actions:
#     critics: Q_ik(o_i, a_i) -> r + gamma (1 - terminal) min_k Q'_ik(o'_i, clip(pi'_i(o'_i) + eps, -1, 1)),
#              eps ~ clip(N(0, policy_noise^2), -noise_clip, noise_clip)  (target policy smoothing)
#     actor:   -lambda_i Q_i1(o_i, pi_i(o_i)) + (pi_i(o_i) - a_i)^2,  lambda_i = alpha / mean|Q_i1| (no gradient)
# The actors and the target networks (primed) are updated every `policy_delay` critic updates.
# Each agent treats its teammates as part of the environment: its critic sees only its own action,
# and nothing makes the agents pick the same one of the dataset's conventions.
#
# Under partial observability each agent also conditions on its last `--memory` (observation,
# action) pairs through the memory module of Appendix A (see `Memory`). Appendix A shares it
# between the policy and value networks: each agent has one memory, trained by its critic loss;
# its actor reads the summary without passing gradients to it; the target networks have a target
# copy of the memory, Polyak-averaged with them.
#
# Differences from the paper: the agents' networks are one batched network ([agents, in, out]
# weights, the twin critics [2 x agents, in, out]); gradient norms are clipped at 1 over all agents'
# actors (critics) at once rather than per agent; the memory is trained by the critic loss only
# (the paper also backprops the actor loss through it), at the paper's 1e-4.
# On MuJoCo the training steps run under bfloat16 autocast (--bf16; the layers return float32) where
# the hardware has native bfloat16 (float32 elsewhere): 2-3x faster on CPUs with AMX, at the cost of
# bfloat16 rounding inside the matmuls. There the memory module is also compiled (--compile, needs a
# C++ compiler on CPU): 1.4x faster on ant PO.
import copy
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
    task: str = "reacher"
    """environment: reacher or ant (continuous actions)"""
    obs: PerTask[str] = None
    """observation setting (default: the task's first; reacher: all-observant, independent, leader-only;
    ant: fo, po)"""
    dataset: PerTask[str] = None
    """dataset name (reacher: expert-mix; ant: random, medium, full-replay, expert) or a .npz/.hdf5 file
    or a Minari dataset folder (default: per task)"""
    seed: int = 0
    """seed of everything random in the run"""
    total_steps: PerTask[int] = None
    """gradient steps (critic updates) (default: per task, see TASK_DEFAULTS)"""
    eval_every: PerTask[int] = None
    """evaluate every this many steps, 0 for only at the end (default: per task)"""
    eval_episodes: int = 100
    """episodes per evaluation (greedy actions: the actors' outputs, without noise)"""
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
    """Adam learning rate of the actors, the critics and the memory"""
    hidden: PerTask[int] = None
    """units in each of the two hidden layers of every network (default: per task; paper 256)"""
    memory: PerTask[int] = None
    """past (observation, action) pairs each agent remembers; default: 10 (the paper's) when the
    observation setting hides part of the state, 0 (no memory module) otherwise"""
    memory_dim: int = 128
    """width e_h of the memory module's embedding and of its summary"""
    memory_learning_rate: float = 1e-4
    """Adam learning rate of the memory module (the paper's, for every algorithm)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak coefficient of the target networks (actors, critics and memory)"""
    alpha: float = 2.5
    """TD3+BC's alpha: the actor maximises lambda Q with lambda = alpha / mean|Q| next to the BC term"""
    policy_delay: int = 2
    """critic updates per actor (and target networks) update"""
    policy_noise: float = 0.2
    """standard deviation of the Gaussian noise added to the target actions (target policy smoothing)"""
    noise_clip: float = 0.5
    """the target actions' noise is clipped to [-noise_clip, noise_clip]"""
    max_grad_norm: float = 1.0
    """gradient norm clip, applied to the actors and to the critics (with the memory) separately"""
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


def batched_mlp(members: int, fan_in: int, hidden: int, fan_out: int) -> nn.Sequential:
    """`members` independent 2-hidden-layer MLPs as one batched network: [E, B, in] -> [E, B, out]."""
    return nn.Sequential(
        BatchedLinear(members, fan_in, hidden), nn.ReLU(),
        BatchedLinear(members, hidden, hidden), nn.ReLU(),
        BatchedLinear(members, hidden, fan_out),
    )  # fmt: skip


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
    """All agents' deterministic actors pi_i(o_i, h_i) = tanh(MLP), and their memories (which their
    critics train). `features` builds each agent's input from its normalised observation [N, B, O]
    (and, with memory, its past observations [N, B, K, O], actions [N, B, K, A] and mask [B, K]);
    calling the module maps features [N, B, F] to actions [N, B, A] in [-1, 1]."""

    def __init__(self, env, hidden: int, obs_mean, obs_std, memory: int, memory_dim: int):
        super().__init__()
        n = env.n_agents
        # for `act`: training batches are normalised once, up front
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32).unsqueeze(1))  # [N, 1, O]
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32).unsqueeze(1))
        self.memory = Memory(n, env.obs_dim + env.act_dim, memory, memory_dim) if memory else None
        self.feature_dim = env.obs_dim + (memory_dim if memory else 0)
        self.net = batched_mlp(n, self.feature_dim, hidden, env.act_dim)

    def features(self, obs, past_obs=None, past_actions=None, mask=None) -> torch.Tensor:
        if self.memory is None:
            return obs
        return torch.cat([obs, self.memory(torch.cat([past_obs, past_actions], -1), mask)], -1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(features))

    @torch.no_grad()
    def act(self, obs: np.ndarray, *past: np.ndarray) -> np.ndarray:
        """Greedy actions [N, E, A] of the N agents in E episodes from their raw observations [N, E, O] (and, with
        memory, their past observations [N, E, K, O], actions [N, E, K, A] and mask [E, K], as envs.evaluate passes them)."""
        device = self.obs_mean.device
        past = [torch.as_tensor(x, device=device) for x in past]
        obs = (torch.as_tensor(obs, device=device) - self.obs_mean) / self.obs_std
        if past:
            past[0] = (past[0] - self.obs_mean.unsqueeze(2)) / self.obs_std.unsqueeze(2)
        return self(self.features(obs, *past)).cpu().numpy()


class TwinCritics(nn.Module):
    """Every agent's twin critics Q_i1, Q_i2(o_i, h_i, a_i) as one batched network of 2N members
    (twin-major): features [N, B, F] and actions [N, B, A] -> Q-values [2, N, B]."""

    def __init__(self, n_agents: int, feature_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = batched_mlp(2 * n_agents, feature_dim + act_dim, hidden, 1)

    def forward(self, features: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([features, actions], -1)
        return self.net(x.repeat(2, 1, 1)).view(2, *x.shape[:2])


def td3_target(q_next: torch.Tensor, rewards: torch.Tensor, not_done: torch.Tensor, gamma: float) -> torch.Tensor:
    """TD3's clipped double-Q target r + gamma (1 - terminal) min(Q'_1, Q'_2), from the twins' values [2, ...]."""
    return rewards + gamma * not_done * q_next.min(0).values


def td3bc_actor_loss(q1: torch.Tensor, policy_actions, actions, alpha: float) -> torch.Tensor:
    """Each agent's TD3+BC actor loss -lambda_i mean Q_i1 + mean (pi_i - a_i)^2, lambda_i = alpha / mean|Q_i1|,
    summed over agents (their actors are disjoint): q1 [N, B], actions [N, B, A]."""
    lam = alpha / q1.abs().mean(1).detach()
    return (-lam * q1.mean(1) + (policy_actions - actions).square().mean((1, 2))).sum()


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
    if env.n_actions is not None:
        raise envs.UserInputError("itd3bc.py needs continuous actions (reacher, ant); the coordination game's are categorical")
    dataset = data.load(env, args.dataset)
    if args.memory is None:
        args.memory = 10 if envs.partially_observed(env) else 0
    run_name = f"{args.task}-{env.obs_setting}-{Path(args.dataset).stem}__itd3bc__{args.seed}__{int(start_time)}"
    if checkpoint is None:
        run_dir = data.new_run_dir(args.runs_dir, run_name)
    writer = SummaryWriter(str(run_dir))  # a resumed run appends to its own logs
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    # The whole dataset on the device, observations normalised once here rather than in every
    # step; agent-major, so that a batch is already [N, B, ...].
    obs_mean, obs_std = dataset.stats("observations")
    observations = torch.as_tensor((dataset.observations - obs_mean) / obs_std, device=device).transpose(0, 1)
    next_observations = torch.as_tensor((dataset.next_observations - obs_mean) / obs_std, device=device).transpose(0, 1)
    actions = torch.as_tensor(dataset.actions, device=device).transpose(0, 1)  # [N, T, A]
    rewards = torch.as_tensor(dataset.rewards, device=device)
    not_done = 1.0 - torch.as_tensor(dataset.terminals, dtype=torch.float32, device=device)
    episode_first = torch.as_tensor(dataset.episode_first(), device=device)

    policy = Policies(env, args.hidden, obs_mean, obs_std, args.memory, args.memory_dim).to(device)
    critics = TwinCritics(env.n_agents, policy.feature_dim, env.act_dim, args.hidden).to(device)
    policy_target, critics_target = copy.deepcopy(policy).requires_grad_(False), copy.deepcopy(critics).requires_grad_(False)
    if args.memory and args.compile:  # fuses the attention's elementwise work
        data.compile_in_place(policy.memory, policy_target.memory, device=device)
    # the memory is the critics' to train (Appendix A: policy and value networks share it)
    critic_groups = [{"params": critics.parameters()}]
    if args.memory:  # trained by the critic loss, at the paper's memory learning rate
        critic_groups.append({"params": policy.memory.parameters(), "lr": args.memory_learning_rate})
    critic_optimizer = torch.optim.Adam(critic_groups, lr=args.learning_rate)
    critic_params = [p for group in critic_optimizer.param_groups for p in group["params"]]  # clipped together
    actor_optimizer = torch.optim.Adam(policy.net.parameters(), lr=args.learning_rate)

    def inputs(idx: torch.Tensor) -> tuple:
        """The agents' inputs at the states s_t of transitions idx: observations, and with memory their past."""
        if not args.memory:
            return (observations[:, idx],)
        past, mask = data.history_index(episode_first[idx], idx, args.memory)
        return observations[:, idx], observations[:, past], actions[:, past], mask

    def next_inputs(idx: torch.Tensor) -> tuple:
        """The same at the next states s_{t+1}, whose history ends with step t."""
        if not args.memory:
            return (next_observations[:, idx],)
        past, mask = data.history_index(episode_first[idx], idx + 1, args.memory)
        return next_observations[:, idx], observations[:, past], actions[:, past], mask

    def evaluate() -> tuple[float, float]:
        returns = envs.evaluate(env, policy.act, args.eval_episodes, seed=args.seed, memory=args.memory)
        return float(returns.mean()), data.normalized_score(args.task, returns)

    print(f"{run_dir.name}: {len(dataset)} transitions, {args.total_steps} steps on {device}", flush=True)
    actor_loss = bc_loss = torch.tensor(float("nan"))  # until the first actor update

    def save_checkpoint(step: int) -> None:
        """Everything needed to evaluate the agents or to go on training (--resume), written atomically."""
        state = {
            "args": asdict(args),
            "policy": policy.state_dict(),  # actors and memory, with the observation normalisation statistics
            "policy_target": policy_target.state_dict(),
            "critics": critics.state_dict(),
            "critics_target": critics_target.state_dict(),
            "actor_optimizer": actor_optimizer.state_dict(),
            "critic_optimizer": critic_optimizer.state_dict(),
            "obs_mean": torch.as_tensor(obs_mean),  # tensors, so that torch.load(weights_only=True) works
            "obs_std": torch.as_tensor(obs_std),
            "step": step,
            "rng": data.rng_state(),  # torch's generators: the only ones the training draws from
            "wall_seconds": wall_seconds(),
        }
        data.save_checkpoint(run_dir, state)

    start_step, previous_seconds = 0, 0.0
    if checkpoint is not None:
        start_step, previous_seconds = data.restore(
            checkpoint, run_dir, policy=policy, policy_target=policy_target, critics=critics,
            critics_target=critics_target, actor_optimizer=actor_optimizer, critic_optimizer=critic_optimizer
        )
    wall_seconds = lambda: previous_seconds + time.time() - start_time  # noqa: E731, over all sessions of the run

    # --bf16: the training steps' matmuls in bfloat16 (the layers hand back float32, and evaluation
    # runs without autocast)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    progress = data.Progress(args.total_steps, start_step)  # a line a minute between evaluations
    with data.stop_requests() as stop:
        for step in range(start_step + 1, args.total_steps + 1):
            with bf16:
                idx = torch.randint(len(dataset), (args.batch_size,), device=device)
                a = actions[:, idx]
                with torch.no_grad():
                    next_features = policy_target.features(*next_inputs(idx))
                    noise = (torch.randn_like(a) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
                    next_actions = (policy_target(next_features) + noise).clamp(-1.0, 1.0)
                    target_q = td3_target(critics_target(next_features, next_actions), rewards[idx], not_done[idx], args.gamma)

                # critics (and memory): both twins of every agent regress on the agent's own target
                features = policy.features(*inputs(idx))
                q = critics(features, a)  # [2, N, B]
                critic_loss = (q - target_q).square().mean(-1).sum()
                critic_optimizer.zero_grad(set_to_none=True)
                critic_loss.backward()
                nn.utils.clip_grad_norm_(critic_params, args.max_grad_norm)
                critic_optimizer.step()

                if step % args.policy_delay == 0:
                    # actors: TD3+BC against the just-updated first critic; the memory summary is read detached
                    features = features.detach()
                    policy_actions = policy(features)
                    q1 = critics(features, policy_actions)[0]  # both twins in one matmul, the first is used
                    actor_loss = td3bc_actor_loss(q1, policy_actions, a, args.alpha)
                    bc_loss = (policy_actions - a).square().mean()
                    actor_optimizer.zero_grad(set_to_none=True)
                    actor_loss.backward()  # also fills the critics' gradients, cleared before their next update
                    nn.utils.clip_grad_norm_(policy.net.parameters(), args.max_grad_norm)
                    actor_optimizer.step()
                    with torch.no_grad():
                        for net, target in ((policy, policy_target), (critics, critics_target)):
                            for p, p_target in zip(net.parameters(), target.parameters()):
                                p_target.lerp_(p, args.tau)

            if step % 100 == 0:
                progress(step, critic_loss=critic_loss, bc_loss=bc_loss, q_values=q.mean())
                writer.add_scalar("losses/critic_loss", critic_loss.item(), step)
                writer.add_scalar("losses/actor_loss", actor_loss.item(), step)
                writer.add_scalar("losses/bc_loss", bc_loss.item(), step)
                writer.add_scalar("losses/q_values", q.mean().item(), step)
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
                raise data.Stopped(f"stopped at step {step}; go on with: python algos/itd3bc.py --resume {run_dir}")

    ret, score = evaluate()
    writer.add_scalar("eval/return", ret, args.total_steps)
    writer.add_scalar("eval/normalized_score", score, args.total_steps)
    writer.close()
    save_checkpoint(args.total_steps)
    result = {
        "task": args.task, "obs": env.obs_setting, "dataset": args.dataset, "algo": "itd3bc", "seed": args.seed,
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
