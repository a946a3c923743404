# Independent OMAR (IOMAR), the offline MARL baseline of the paper (section 5.1, Appendix A.2):
# OMAR (Pan et al. 2022, "Plan better amid conservatism: offline multi-agent reinforcement
# learning with actor rectification") with independent learners, following its official code.
#
# The critics are ICQL's (see icql.py): agent i learns twin critics Q_ij(o_i, h_i, a_i), j = 1, 2,
# on the team reward with TD3's target plus cql_alpha times the CQL(H) regulariser, whose
# sampled actions (`cql_samples` from each of three proposals, all scored at o_i) are uniform
# in [-1, 1], pi_i(o_i) + N(0, 0.2) and pi_i(o'_i) + N(0, 0.2), weighted by their log density.
#
# OMAR rectifies the actor: conservative critics have many local maxima, so instead of only
# following the gradient of Q_i1 the actor also regresses onto a better action found by a
# zeroth-order search on Q_i1. For every agent and transition (all batched) the search draws
# `omar_samples` actions from N(mu, sigma^2), clipped to [-1, 1], keeps the `omar_elites` best by
# Q_i1 and refits mu and sigma (mean and std of the elites), `omar_iters` times; from the second
# iteration the previous elites compete with the new samples. a_hat is the best action found,
# or the policy's own action pi_i(o_i) when Q_i1 rates it at least as high. The actor loss is
#     (1 - omar_coef) * (-Q_i1(o_i, pi_i(o_i))) + omar_coef * mean (pi_i(o_i) - a_hat)^2
#     + action_penalty * mean pi_i(o_i)^2    (OMAR's code; action_penalty = 1e-3)
# exactly as in OMAR's code: Q is not normalised, and with the paper's omar_coef = 1 the Q term
# is multiplied by zero, so the actor is a pure regression onto a_hat and the critic steers it
# only through the search (where the policy's action wins, the regression pulls it nowhere).
# As in OMAR's MaMuJoCo code, the search starts at mu = omar_mu = 0 and sigma = omar_sigma = 2
# for every transition: centred on the middle of the action box, not on the policy's action
# (with sigma 2 the first samples cover [-1, 1], most of them clipped to its bounds).
#
# Under partial observability each agent also conditions on its last `--memory` (observation,
# action) pairs through the memory module of Appendix A (see `Memory`). One memory per agent is
# shared by its actor and critics and trained by the critic loss only: the actor (and the
# search) read its summary detached. The target networks have their own copy, Polyak-averaged
# with them.
#
# Differences from the paper / the official OMAR code: TD3's target policy smoothing and
# policy delay (OMAR's code updates the actor at every step with a noise-free target action:
# --policy-delay 1 --target-noise 0); the proposal of pi + noise enters the CQL logsumexp with
# its Gaussian log density (OMAR's code subtracts the density itself); observations are
# normalised with dataset statistics (OMAR: a BatchNorm input layer); gradient norms are clipped
# at 1 (the paper's value; OMAR: 0.5); all agents learn from the same minibatch, and the gradient
# clip is applied to all agents' networks together (one batched network with [agents, in, out]
# weights); the memory module is trained by the critic loss only, at Appendix A's 1e-4.
# On MuJoCo the training steps run under bfloat16 autocast (--bf16; the layers return float32) where
# the hardware has native bfloat16 (float32 elsewhere): 2-3x faster on CPUs with AMX, at the cost of
# bfloat16 rounding inside the matmuls. There the memory module is also compiled (--compile, needs a
# C++ compiler on CPU): 1.04x faster on ant PO (its CQL and policy-search samples dominate).
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
    """dataset name (reacher: expert-mix; ant: random, medium, full-replay, expert) or a .npz/.hdf5 file or a
    Minari dataset folder (default: per task)"""
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
    """Adam learning rate of the actors and of the critics (with the memory modules)"""
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
    """Polyak coefficient of the target networks (actors, critics and memory modules)"""
    max_grad_norm: float = 1.0
    """gradient norm clip, applied to the critics (with the memory modules) and to the actors separately"""
    policy_delay: int = 2
    """TD3: critic steps per actor step (and per target update)"""
    target_noise: float = 0.2
    """TD3: std of the Gaussian noise on the target action"""
    target_noise_clip: float = 0.5
    """TD3: the target action noise is clipped to +- this"""
    cql_alpha: PerTask[float] = None
    """weight of the CQL regulariser (default: 5 on ant expert, 1 otherwise, as in the paper)"""
    cql_samples: int = 10
    """actions drawn from each of the three CQL proposals (uniform, pi(o) + noise, pi(o') + noise)"""
    cql_noise: float = 0.2
    """std of the Gaussian noise on the policy's actions in the CQL proposals"""
    cql_temperature: float = 1.0
    """temperature of the CQL logsumexp"""
    action_penalty: float = 1e-3
    """weight of the mean squared action in the actor loss (OMAR's code)"""
    omar_coef: float = 1.0
    """weight of the regression onto the searched action a_hat in the actor loss; 1 - omar_coef weighs -Q"""
    omar_iters: int = 2
    """iterations of the action search"""
    omar_mu: float = 0.0
    """initial mean of the search's Gaussian (the same for every action dimension and transition)"""
    omar_sigma: float = 2.0
    """initial standard deviation of the search's Gaussian"""
    omar_samples: int = 20
    """actions sampled per search iteration"""
    omar_elites: int = 5
    """best actions kept per iteration to refit the Gaussian"""
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


def batched_mlp(members: int, fan_in: int, hidden: int, fan_out: int) -> nn.Sequential:
    """`members` independent 2-hidden-layer MLPs as one batched network: [members, B, in] -> [members, B, out]."""
    return nn.Sequential(
        BatchedLinear(members, fan_in, hidden), nn.ReLU(),
        BatchedLinear(members, hidden, hidden), nn.ReLU(),
        BatchedLinear(members, hidden, fan_out),
    )  # fmt: skip


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
    (twin-major: member j * N + i is Q_i(j+1)). They score S candidate actions per transition at once:
    features [N, B, F] and actions [N, B, S, A] -> Q-values [2, N, B, S], or [N, B, S] from Q_i1 alone
    (twin False: only the first N members run, half the work)."""

    def __init__(self, n_agents: int, feature_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = batched_mlp(2 * n_agents, feature_dim + act_dim, hidden, 1)

    def forward(self, features: torch.Tensor, actions: torch.Tensor, twin: bool = True) -> torch.Tensor:
        n, b, s, a = actions.shape
        members = 2 * n if twin else n
        if twin:
            features, actions = features.repeat(2, 1, 1), actions.repeat(2, 1, 1, 1)
        first, *rest = self.net
        weight = first.weight[:members]
        # first layer: its observation part once per transition, its action part once per candidate
        x = torch.baddbmm(first.bias[:members], features, weight[:, :-a]).unsqueeze(2) + actions @ weight[:, None, -a:]
        x = x.flatten(1, 2)
        for layer in rest:
            is_linear = isinstance(layer, BatchedLinear)
            x = torch.baddbmm(layer.bias[:members], x, layer.weight[:members]) if is_linear else layer(x)
        return x.view(-1, n, b, s) if twin else x.view(n, b, s)


def cql_regulariser(critics: TwinCritics, features, q_data, policy_now, policy_next, args: Args) -> torch.Tensor:
    """The CQL(H) term of every critic, [2, N, B]: logsumexp over sampled actions a of
    (Q(o, a) - log p(a)), times the temperature, minus Q(o, a_data). The samples are drawn from
    three proposals (`cql_samples` each), all scored at o: uniform in [-1, 1], and the policy's
    actions at o and at o' ([N, B, A]) with Gaussian noise, clipped to [-1, 1]."""
    n, b, a = policy_now.shape
    s, sigma = args.cql_samples, args.cql_noise
    uniform = torch.rand(n, b, s, a, device=q_data.device) * 2 - 1
    noise = torch.randn(n, b, 2, s, a, device=q_data.device) * sigma
    noisy = (torch.stack([policy_now, policy_next], 2).unsqueeze(3) + noise).clamp(-1, 1).flatten(2, 3)
    # log densities of the proposals (ignoring the clip): uniform 2^-A, Gaussian N(pi, sigma^2)
    log_p_uniform = torch.full((n, b, s), -a * math.log(2), device=q_data.device)
    log_p_noisy = (-0.5 * (noise / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))).sum(-1).flatten(2)
    q_sampled = critics(features, torch.cat([uniform, noisy], 2))  # [2, N, B, 3S]
    log_p = torch.cat([log_p_uniform, log_p_noisy], -1)
    t = args.cql_temperature
    return torch.logsumexp((q_sampled - log_p) / t, -1) * t - q_data


@torch.no_grad()
def search_actions(critics: TwinCritics, features, policy_actions, q_policy, args: Args) -> torch.Tensor:
    """OMAR's zeroth-order search for actions a_hat [N, B, A] that Q_i1 rates above the policy's own
    ([N, B, A] with values q_policy [N, B]), for all agents and transitions at once."""
    n, b, a = policy_actions.shape
    mu = torch.full_like(policy_actions, args.omar_mu)
    sigma = torch.full_like(policy_actions, args.omar_sigma)
    elites = elite_q = None
    for _ in range(args.omar_iters):
        noise = torch.randn(n, b, args.omar_samples, a, device=mu.device)
        candidates = (mu.unsqueeze(2) + sigma.unsqueeze(2) * noise).clamp(-1, 1)  # [N, B, S, A]
        q = critics(features, candidates, twin=False)  # [N, B, S]
        if elites is not None:  # the last elites compete with the new samples
            candidates, q = torch.cat([candidates, elites], 2), torch.cat([q, elite_q], 2)
        elite_q, top = q.topk(args.omar_elites, dim=-1)  # sorted: the best first
        elites = candidates.gather(2, top.unsqueeze(-1).expand(-1, -1, -1, a))  # [N, B, E, A]
        mu, sigma = elites.mean(2), elites.std(2)
    policy_wins = (q_policy >= elite_q[..., 0]).unsqueeze(-1)
    return torch.where(policy_wins, policy_actions, elites[:, :, 0])


def omar_actor_loss(q_policy, policy_actions, a_hat, coef: float, action_penalty: float) -> tuple:
    """OMAR's actor loss (1 - coef) * -mean Q_i1(o_i, pi_i(o_i)) + coef * mean (pi_i(o_i) - a_hat)^2
    + action_penalty * mean pi_i(o_i)^2, summed over agents (their actors are disjoint), from q_policy
    [N, B] and policy_actions, a_hat [N, B, A]; also the mean squared distance to a_hat (for the logs)."""
    rectification = (policy_actions - a_hat).square().mean((1, 2))  # [N]
    loss = (1 - coef) * -q_policy.mean(-1) + coef * rectification + action_penalty * policy_actions.square().mean((1, 2))
    return loss.sum(), rectification.mean().detach()


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
        raise envs.UserInputError("iomar.py needs continuous actions (reacher, ant); the coordination game's are categorical")
    dataset = data.load(env, args.dataset)
    if args.memory is None:
        args.memory = 10 if envs.partially_observed(env) else 0
    if args.cql_alpha is None:  # the paper tuned it on ant expert only
        args.cql_alpha = 5.0 if (args.task, args.dataset) == ("ant", "expert") else 1.0
    run_name = f"{args.task}-{env.obs_setting}-{Path(args.dataset).stem}__iomar__{args.seed}__{int(start_time)}"
    if checkpoint is None:
        run_dir = data.new_run_dir(args.runs_dir, run_name)
    writer = SummaryWriter(str(run_dir))  # a resumed run appends to its own logs
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    # The whole dataset on the device, normalised once here rather than in every step;
    # agent-major, so that a batch is already [N, B, ...].
    obs_mean, obs_std = dataset.stats("observations")
    observations = torch.as_tensor((dataset.observations - obs_mean) / obs_std, device=device).transpose(0, 1)
    next_observations = torch.as_tensor((dataset.next_observations - obs_mean) / obs_std, device=device).transpose(0, 1)
    actions = torch.as_tensor(dataset.actions, device=device).transpose(0, 1)  # [N, T, A]
    rewards = torch.as_tensor(dataset.rewards, device=device)
    not_done = 1.0 - torch.as_tensor(dataset.terminals, dtype=torch.float32, device=device)
    episode_first = torch.as_tensor(dataset.episode_first(), device=device)

    policy = Policies(env, args.hidden, obs_mean, obs_std, args.memory, args.memory_dim).to(device)
    critics = TwinCritics(env.n_agents, policy.feature_dim, env.act_dim, args.hidden).to(device)
    policy_target = copy.deepcopy(policy).requires_grad_(False)  # the target memory comes with it
    critics_target = copy.deepcopy(critics).requires_grad_(False)
    if args.memory and args.compile:  # fuses the attention's elementwise work
        data.compile_in_place(policy.memory, policy_target.memory, device=device)
    # the critic loss trains the memory; the actor loss trains the actors' MLPs only
    critic_groups = [{"params": critics.parameters()}]
    if args.memory:  # trained by the critic loss, at the paper's memory learning rate
        critic_groups.append({"params": policy.memory.parameters(), "lr": args.memory_learning_rate})
    critic_optimizer = torch.optim.Adam(critic_groups, lr=args.learning_rate)
    critic_params = [p for group in critic_optimizer.param_groups for p in group["params"]]  # clipped together
    actor_optimizer = torch.optim.Adam(policy.net.parameters(), lr=args.learning_rate)

    def inputs(idx: torch.Tensor, next_step: bool = False) -> tuple:
        """What `Policies.features` needs at transitions idx (at their next states with next_step)."""
        obs = (next_observations if next_step else observations)[:, idx]
        if not args.memory:
            return (obs,)
        past, mask = data.history_index(episode_first[idx], idx + 1 if next_step else idx, args.memory)
        return obs, observations[:, past], actions[:, past], mask

    def evaluate() -> tuple[float, float]:
        returns = envs.evaluate(env, policy.act, args.eval_episodes, seed=args.seed, memory=args.memory)
        return float(returns.mean()), data.normalized_score(args.task, returns)

    print(f"{run_dir.name}: {len(dataset)} transitions, {args.total_steps} steps on {device}", flush=True)
    actor_loss = rectification = search_wins = torch.tensor(float("nan"))  # logged before the first actor step

    def save_checkpoint(step: int) -> None:
        """Everything needed to evaluate the agents or to go on training (--resume), written atomically."""
        state = {
            "args": asdict(args),
            "policy": policy.state_dict(),  # actors, memory and the observation normalisation statistics
            "policy_target": policy_target.state_dict(),
            "critics": critics.state_dict(),
            "critics_target": critics_target.state_dict(),
            "critic_optimizer": critic_optimizer.state_dict(),
            "actor_optimizer": actor_optimizer.state_dict(),
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
            critics_target=critics_target, critic_optimizer=critic_optimizer, actor_optimizer=actor_optimizer
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
                with torch.no_grad():
                    # TD3 target: the target actor's next action with clipped noise, the smaller target critic
                    next_features = policy_target.features(*inputs(idx, next_step=True))
                    clip = args.target_noise_clip
                    noise = (torch.randn_like(actions[:, idx]) * args.target_noise).clamp(-clip, clip)
                    next_actions = (policy_target(next_features) + noise).clamp(-1, 1)
                    next_q = critics_target(next_features, next_actions.unsqueeze(2)).min(0).values.squeeze(-1)  # [N, B]
                    backup = rewards[idx] + args.gamma * not_done[idx] * next_q

                # critics (and memory): TD loss of each critic plus the CQL regulariser
                features = policy.features(*inputs(idx))
                with torch.no_grad():
                    policy_now = policy(features)
                    policy_next = policy(policy.features(*inputs(idx, next_step=True)))
                q_data = critics(features, actions[:, idx].unsqueeze(2)).squeeze(-1)  # [2, N, B]
                td_loss = (q_data - backup).square().mean(-1).sum()  # summed over critics and agents: independent losses
                cql_loss = cql_regulariser(critics, features, q_data, policy_now, policy_next, args).mean(-1).sum()
                critic_loss = td_loss + args.cql_alpha * cql_loss
                critic_optimizer.zero_grad(set_to_none=True)
                critic_loss.backward()
                nn.utils.clip_grad_norm_(critic_params, args.max_grad_norm)
                critic_optimizer.step()

                if step % args.policy_delay == 0:
                    # actors: regress onto the searched action a_hat (and, with omar_coef < 1, maximise Q_i1);
                    # the memory summary is read, not trained
                    features = features.detach()
                    policy_actions = policy(features)
                    q_policy = critics(features, policy_actions.unsqueeze(2), twin=False).squeeze(-1)  # [N, B]
                    a_hat = search_actions(critics, features, policy_actions.detach(), q_policy.detach(), args)
                    search_wins = (a_hat != policy_actions.detach()).any(-1).float().mean()  # how often a_hat is not pi(o)
                    actor_loss, rectification = omar_actor_loss(
                        q_policy, policy_actions, a_hat, args.omar_coef, args.action_penalty
                    )  # fmt: skip
                    actor_optimizer.zero_grad(set_to_none=True)
                    actor_loss.backward()
                    nn.utils.clip_grad_norm_(policy.net.parameters(), args.max_grad_norm)
                    actor_optimizer.step()
                    with torch.no_grad():
                        for net, target in ((policy, policy_target), (critics, critics_target)):
                            for p, p_target in zip(net.parameters(), target.parameters()):
                                p_target.lerp_(p, args.tau)

            if step % 100 == 0:
                progress(step, td_loss=td_loss, cql_loss=cql_loss, q_values=q_data.mean())
                writer.add_scalar("losses/critic_loss", critic_loss.item(), step)
                writer.add_scalar("losses/td_loss", td_loss.item(), step)
                writer.add_scalar("losses/cql_loss", cql_loss.item(), step)
                writer.add_scalar("losses/actor_loss", actor_loss.item(), step)
                writer.add_scalar("losses/q_values", q_data.mean().item(), step)
                writer.add_scalar("losses/rectification", rectification.item(), step)
                writer.add_scalar("losses/search_wins", search_wins.item(), step)
                writer.add_scalar("charts/SPS", (step - start_step) / (time.time() - start_time), step)  # not rounded: below 1 on a CPU
            if args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
                ret, score = evaluate()
                writer.add_scalar("eval/return", ret, step)
                writer.add_scalar("eval/normalized_score", score, step)
                print(f"step {step}: return {ret:.2f}, normalized score {score:.3f}", flush=True)
            if stop or step % args.save_every == 0:
                save_checkpoint(step)
            if stop:
                writer.close()
                raise data.Stopped(f"stopped at step {step}; go on with: python algos/iomar.py --resume {run_dir}")

    ret, score = evaluate()
    writer.add_scalar("eval/return", ret, args.total_steps)
    writer.add_scalar("eval/normalized_score", score, args.total_steps)
    writer.close()
    save_checkpoint(args.total_steps)
    result = {
        "task": args.task, "obs": env.obs_setting, "dataset": args.dataset, "algo": "iomar", "seed": args.seed,
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
