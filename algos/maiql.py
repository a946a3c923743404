# Multi-Agent Implicit Q-Learning (MAIQL), the CTDE model-free baseline of the paper
# (section 5.1 and Appendix A, equations 1-7).
#
# IQL (Kostrikov et al. 2022) made multi-agent with QMIX value decomposition: every agent has
# its own Q_i(h_i, a_i) and V_i(h_i), and state-conditioned non-negative mixing weights combine
# them into the team's values (eq. 4, 5):
#     Q_tot(s, a) = sum_i w_Q^i(s) Q_i(h_i, a_i) + b_Q(s),    V_tot(s) = sum_i w_V^i(s) V_i(h_i) + b_V(s).
# V_tot learns the `expectile` of the target Q_tot over the dataset's joint actions (eq. 1),
# Q_tot regresses on r + gamma V_tot(s') (eq. 2), and each agent's policy pi_i(a_i | h_i) is
# extracted by advantage-weighted regression with the team's advantage (eq. 3, 6, 7).
# Training is centralised (mixers see the state); execution is decentralised (each agent acts
# greedily on its own observation, and its memory).
#
# Categorical actions (coordination): Q_i outputs one value per action and pi_i is categorical.
# Continuous actions (reacher, ant): the action is an input of Q_i (one output), and pi_i is a
# Gaussian with mean tanh(MLP(h_i)) and a learned log std per agent and action dimension.
#
# Under partial observability h_i is the agent's observation followed by its memory's summary
# of its last `--memory` (observation, action) pairs (Appendix A, see `Memory`); otherwise h_i
# is the observation. Each agent has one memory shared by its Q_i, V_i and policy; the Q and V
# losses train it, the policy reads its summary detached (as in an actor-critic, the critics
# shape it), and the target Q_i read a target copy Polyak-averaged with the target Q networks.
#
# On the coordination game the monotonic mixture cannot represent the reward 1[a_1 = a_2]: its
# best additive fit gives agent i an advantage for `right` of about 2 P_data(a_j = right) - 1,
# so each agent turns towards the other one's majority action. Both go right on `favorable`,
# they swap conventions and miss each other on `unfavorable`, and on `neutral` the outcome of
# each round hangs on the dataset's sampling noise (paper Table 3: 1.0, 0.0, 0.9 +- 0.1).
#
# Differences from the paper: the weights and the bias of a mixer come from one 2x256 MLP of
# the state with N+1 outputs (QMIX uses separate hypernetworks); the paper describes
# tanh-squashed Gaussians with a state-dependent variance, we follow the official IQL code
# (tanh on the mean only, a state-independent log std clamped to [-5, 2]) without its cosine
# decay of the policy's learning rate or its rescaling of D4RL locomotion rewards; one Q_i per
# agent as in eq. 4 (the official IQL takes the min of twin Q networks); the memory is trained
# by the Q and V losses (the policies read it detached), at the paper's 1e-4; as in CORL's IQL, the
# advantage and the Q target use V_tot before this step's V update, so that the three losses
# come from one batch and are minimised with one backward pass (their parameters are disjoint,
# the memory's gradient being the sum of those of the Q and V losses).
# The agents' networks are one batched network ([agents, in, out] weights).
# On MuJoCo the training steps run under bfloat16 autocast (--bf16; the layers return float32) where
# the hardware has native bfloat16 (float32 elsewhere): 2-3x faster on CPUs with AMX, at the cost of
# bfloat16 rounding inside the matmuls. There the memory module is also compiled (--compile, needs a
# C++ compiler on CPU): 1.5x faster on ant PO.
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
    """episodes per evaluation (greedy actions: the most likely one, or the Gaussian's mean)"""
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
    """Adam learning rate of every network (Q, V, their mixers, the policies with their log std, the memory)"""
    hidden: PerTask[int] = None
    """units in each of the two hidden layers of every network (agents' networks and mixers) (default: per task; paper 256)"""
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
    """Polyak coefficient of the target Q networks (agents' Q, their mixer and their memory)"""
    expectile: float = 0.7
    """expectile of the target Q_tot that V_tot regresses to (0.5: the mean, i.e. SARSA)"""
    beta: float = 3.0
    """AWR inverse temperature: the policies imitate the data with weights exp(beta * team advantage)"""
    max_weight: float = 100.0
    """upper clip of the AWR weights exp(beta * team advantage)"""
    max_grad_norm: float = 1.0
    """gradient norm clip, applied to each of Q (with its mixer), V (with its mixer), the policies and the memory"""
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
    # coordination: the unfavorable runs pass through a transient (agents switching convention at
    # different times, steps 300-700) before they settle; on neutral the per-round effects are
    # tiny (dataset sampling noise) and take about 2500 steps to resolve. 64 units as in every
    # script on this task (two actions, a 1-d observation); ~6 ms a step on one CPU thread.
    "coordination": dict(dataset="unfavorable", total_steps=3000, eval_every=0, hidden=64, bf16=False, compile=False),
    # MuJoCo: the paper's 1e6 steps and 2x256 networks
    "reacher": dict(dataset="expert-mix", total_steps=1_000_000, eval_every=50_000, hidden=256, bf16=True, compile=True),
    "ant": dict(dataset="medium", total_steps=1_000_000, eval_every=50_000, hidden=256, bf16=True, compile=True),
}
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # continuous actions: the Gaussians' log std range, as in the official IQL


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
    embedding plus a sinusoidal positional encoding, one self-attention layer with a skip
    connection and layer norm, then soft-attention pooling into one vector. Steps before the
    episode's start are masked out; with no past at all the summary is zero.
    All agents at once: tokens [N, B, K, O + A], mask [B, K] -> summaries [N, B, E]."""

    def __init__(self, n_agents: int, token_dim: int, length: int, dim: int):
        super().__init__()
        self.embed = BatchedLinear(n_agents, token_dim, dim)
        self.qkv = BatchedLinear(n_agents, dim, 3 * dim)
        self.norm_gain = nn.Parameter(torch.ones(n_agents, 1, 1, dim))
        self.norm_bias = nn.Parameter(torch.zeros(n_agents, 1, 1, dim))
        self.score = BatchedLinear(n_agents, dim, 1)  # pooling: one attention logit per step
        position = torch.arange(length).unsqueeze(1) / 10_000 ** (torch.arange(0, dim, 2) / dim)
        self.register_buffer("position", torch.stack([position.sin(), position.cos()], -1).flatten(1))  # [K, E]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, b, k, _ = tokens.shape
        x = self.embed(tokens.flatten(1, 2)).view(n, b, k, -1) + self.position
        q, key, v = self.qkv(x.flatten(1, 2)).view(n, b, k, 3, -1).unbind(3)
        hidden = -1e9 * ~mask  # [B, K] additive mask: masked steps get no attention
        attention = torch.softmax(q @ key.transpose(-1, -2) / math.sqrt(x.shape[-1]) + hidden[:, None], -1)
        x = F.layer_norm(x + attention @ v, x.shape[-1:]) * self.norm_gain + self.norm_bias
        weights = torch.softmax(self.score(x.flatten(1, 2)).view(n, b, k) + hidden, -1)
        return (weights.unsqueeze(-1) * x).sum(2) * mask.any(-1, keepdim=True)


def agent_mlp(n_agents: int, fan_in: int, hidden: int, fan_out: int) -> nn.Sequential:
    """All agents' 2-hidden-layer MLPs as one batched network: [N, B, in] -> [N, B, out]."""
    return nn.Sequential(
        BatchedLinear(n_agents, fan_in, hidden), nn.ReLU(),
        BatchedLinear(n_agents, hidden, hidden), nn.ReLU(),
        BatchedLinear(n_agents, hidden, fan_out),
    )  # fmt: skip


class Mixer(nn.Module):
    """QMIX-style monotonic mixing: sum_i w^i(s) x_i + b(s), with w^i(s) = |MLP(s)_i| >= 0 and b(s) = MLP(s)_N."""

    def __init__(self, state_dim: int, n_agents: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_agents + 1)
        )  # fmt: skip

    def forward(self, states: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Team value [B] of the agents' values [N, B] in the normalised states [B, S]."""
        out = self.net(states).float()  # [B, N + 1], float32 under --bf16
        return (out[:, :-1].abs().T * values).sum(0) + out[:, -1]


class MixedQ(nn.Module):
    """Q_tot(s, a) = sum_i w_Q^i(s) Q_i(h_i, a_i) + b_Q(s). Categorical actions (`n_actions` of them):
    Q_i outputs one value per action; continuous ones (`n_actions` None): Q_i(h_i, a_i) takes the
    action as an input and outputs one value."""

    def __init__(self, n_agents: int, in_dim: int, state_dim: int, n_actions: int | None, act_dim: int, hidden: int):
        super().__init__()
        self.categorical = n_actions is not None
        fan_in, fan_out = (in_dim, n_actions) if self.categorical else (in_dim + act_dim, 1)
        self.agents = agent_mlp(n_agents, fan_in, hidden, fan_out)
        self.mixer = Mixer(state_dim, n_agents, hidden)

    def forward(self, h: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Agents' inputs h [N, B, in], states [B, S] (normalised), actions [N, B] or [N, B, A] -> Q_tot [B]."""
        if self.categorical:
            q = self.agents(h).gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # [N, B]
        else:
            q = self.agents(torch.cat([h, actions], -1)).squeeze(-1)
        return self.mixer(states, q)


class MixedV(nn.Module):
    """V_tot(s) = sum_i w_V^i(s) V_i(h_i) + b_V(s)."""

    def __init__(self, n_agents: int, in_dim: int, state_dim: int, hidden: int):
        super().__init__()
        self.agents = agent_mlp(n_agents, in_dim, hidden, 1)
        self.mixer = Mixer(state_dim, n_agents, hidden)

    def forward(self, h: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Agents' inputs h [N, B, in], states [B, S] (normalised) -> V_tot [B]."""
        return self.mixer(states, self.agents(h).squeeze(-1))


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Mean of the asymmetric square |e - 1[diff < 0]| diff^2 of eq. 1: minimised over V, V is the e-expectile of Q."""
    return (torch.abs(expectile - (diff < 0).float()) * diff.square()).mean()


class CategoricalHead:
    """Categorical actions over `n` choices, parametrised by n logits. The policies' swappable part:
    GaussianHead provides the same three members for continuous actions."""

    def __init__(self, n: int):
        self.n_params = n

    def log_prob(self, logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


class GaussianHead(nn.Module):
    """Continuous actions in [-1, 1]^n: each agent's Gaussian with mean tanh(params) over n params and
    a learned log std per agent and action dimension that does not depend on the observation (a
    module, as it owns that parameter)."""

    def __init__(self, n_agents: int, n: int):
        super().__init__()
        self.n_params = n
        self.log_std = nn.Parameter(torch.zeros(n_agents, 1, n))  # [N, 1, A], the same for the whole batch

    def log_prob(self, params: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Log-likelihoods [N, B] of the actions [N, B, A] under the Gaussians of params [N, B, A]."""
        log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        z = (actions - torch.tanh(params)) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std).sum(-1) - 0.5 * self.n_params * math.log(2 * math.pi)

    def greedy(self, params: torch.Tensor) -> torch.Tensor:
        return torch.tanh(params)


class Policies(nn.Module):
    """All agents' decentralised policies pi_i(a_i | h_i) as one batched network."""

    def __init__(self, n_agents: int, in_dim: int, head: CategoricalHead | GaussianHead, hidden: int):
        super().__init__()
        self.head = head
        self.net = agent_mlp(n_agents, in_dim, hidden, head.n_params)

    def log_prob(self, h: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Log-likelihoods [N, B] of the agents' actions ([N, B] or [N, B, A]) given their inputs h [N, B, in]."""
        return self.head.log_prob(self.net(h), actions)

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """The agents' most likely actions given their inputs h [N, B, in]."""
        return self.head.greedy(self.net(h))


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
    categorical = env.n_actions is not None
    if args.memory is None:
        args.memory = 10 if envs.partially_observed(env) else 0
    if args.memory and categorical:
        raise envs.UserInputError("--memory needs continuous actions (the coordination game is fully observed): use --memory 0")
    run_name = f"{args.task}-{env.obs_setting}-{Path(args.dataset).stem}__maiql__{args.seed}__{int(start_time)}"
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
    state_mean, state_std = dataset.stats("states")
    observations = torch.as_tensor((dataset.observations - obs_mean) / obs_std, device=device).transpose(0, 1)
    next_observations = torch.as_tensor((dataset.next_observations - obs_mean) / obs_std, device=device).transpose(0, 1)
    states = torch.as_tensor((dataset.states - state_mean) / state_std, device=device)
    next_states = torch.as_tensor((dataset.next_states - state_mean) / state_std, device=device)
    actions = torch.as_tensor(dataset.actions, device=device).transpose(0, 1)  # [N, T] or [N, T, A]
    rewards = torch.as_tensor(dataset.rewards, device=device)
    not_done = 1.0 - torch.as_tensor(dataset.terminals, dtype=torch.float32, device=device)
    episode_first = torch.as_tensor(dataset.episode_first(), device=device)

    n, s_dim = env.n_agents, env.state_dim
    in_dim = env.obs_dim + (args.memory_dim if args.memory else 0)  # h_i: observation (and memory summary)
    qf = MixedQ(n, in_dim, s_dim, env.n_actions, env.act_dim, args.hidden).to(device)
    qf_target = MixedQ(n, in_dim, s_dim, env.n_actions, env.act_dim, args.hidden).to(device)
    qf_target.load_state_dict(qf.state_dict())
    qf_target.requires_grad_(False)
    vf = MixedV(n, in_dim, s_dim, args.hidden).to(device)
    head = CategoricalHead(env.n_actions) if categorical else GaussianHead(n, env.act_dim)
    policy = Policies(n, in_dim, head, args.hidden).to(device)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=args.learning_rate, fused=True)
    v_optimizer = torch.optim.Adam(vf.parameters(), lr=args.learning_rate, fused=True)
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=True)
    optimizers = {"q": (q_optimizer, qf), "v": (v_optimizer, vf), "policy": (policy_optimizer, policy)}
    targets = [(qf, qf_target)]  # (network, its Polyak-averaged copy)
    memory = memory_target = None
    if args.memory:  # one memory per agent (batched), shared by its Q_i, V_i and policy
        memory = Memory(n, env.obs_dim + env.act_dim, args.memory, args.memory_dim).to(device)
        memory_target = copy.deepcopy(memory).requires_grad_(False)
        optimizers["memory"] = (torch.optim.Adam(memory.parameters(), lr=args.memory_learning_rate, fused=True), memory)
        targets.append((memory, memory_target))
    if args.memory and args.compile:  # fuses the attention's elementwise work
        data.compile_in_place(memory, memory_target, device=device)

    def sample(idx: torch.Tensor) -> dict:
        """The transitions idx of the dataset as a training batch, agent-major ([N, B, ...]); with memory,
        each agent's past before s_t and before s_t+1, as (tokens [N, B, K, O + A], mask [B, K])."""
        batch = {
            "obs": observations[:, idx], "states": states[idx], "actions": actions[:, idx], "rewards": rewards[idx],
            "not_done": not_done[idx], "next_obs": next_observations[:, idx], "next_states": next_states[idx],
        }  # fmt: skip
        if args.memory:
            for key, t in [("past", idx), ("next_past", idx + 1)]:
                steps, mask = data.history_index(episode_first[idx], t, args.memory)
                batch[key] = (torch.cat([observations[:, steps], actions[:, steps]], -1), mask)
        return batch

    def agent_inputs(reader: Memory | None, obs: torch.Tensor, past: tuple | None) -> torch.Tensor:
        """h_i for every agent [N, B, in]: the normalised observations [N, B, O], with memory followed by
        the summaries of the agents' pasts as `reader` (the online memory or its target copy) sees them."""
        return obs if reader is None else torch.cat([obs, reader(*past)], -1)

    def update(batch: dict) -> dict:
        """One gradient step of Q, V, the policies (and the memory) on a batch, then the Polyak averaging.
        It needs nothing but the batch, so a fine-tuning script can feed it batches of a replay buffer."""
        o, s, a = batch["obs"], batch["states"], batch["actions"]
        h = agent_inputs(memory, o, batch.get("past"))  # the Q and V losses train the memory through h
        with torch.no_grad():
            target_q = qf_target(agent_inputs(memory_target, o, batch.get("past")), s, a)  # [B], Q_hat_tot of eq. 5
            next_h = agent_inputs(memory, batch["next_obs"], batch.get("next_past"))
            q_backup = batch["rewards"] + args.gamma * batch["not_done"] * vf(next_h, batch["next_states"])

        # V: expectile regression of V_tot on the target Q_tot of the dataset's joint actions (eq. 1)
        v = vf(h, s)
        diff = target_q - v
        v_loss = expectile_loss(diff, args.expectile)
        # Q: Q_tot regresses on r + gamma V_tot(s') (eq. 2)
        q = qf(h, s, a)
        q_loss = (q - q_backup).square().mean()
        # Policies: AWR with the team advantage (eq. 3 with the factored policy of eq. 6). The weight
        # exp(beta (Q_hat_tot - V_tot)) = B(s) prod_i exp(beta (w_hat_Q^i Q_hat_i - w_V^i V_i)) with
        # B(s) = exp(beta (b_hat_Q(s) - b_V(s))): this is eq. 7 (whose B(s) omits the beta).
        # The policies read the memory's summaries detached: only the value losses train it.
        weights = torch.exp(args.beta * diff.detach()).clamp(max=args.max_weight)
        policy_loss = -(weights * policy.log_prob(h.detach(), a).sum(0)).mean()

        for optimizer, _ in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        (v_loss + q_loss + policy_loss).backward()  # disjoint parameters: the same as three backward passes
        for optimizer, net in optimizers.values():
            nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm, foreach=True)
            optimizer.step()
        with torch.no_grad():
            for net, target in targets:
                for p, p_target in zip(net.parameters(), target.parameters()):
                    p_target.lerp_(p, args.tau)
        return {"q_loss": q_loss, "v_loss": v_loss, "policy_loss": policy_loss, "q_values": q.mean(),
                "v_values": v.mean(), "advantage": diff.mean()}  # fmt: skip

    obs_mean_t, obs_std_t = (torch.as_tensor(x, device=device).unsqueeze(1) for x in (obs_mean, obs_std))  # [N, 1, O]

    @torch.no_grad()
    def act(obs: np.ndarray, *past: np.ndarray) -> np.ndarray:
        """Greedy actions of the N agents in E episodes from their raw observations [N, E, O] (and, with memory,
        their past observations [N, E, K, O], actions [N, E, K, A] and mask [E, K], as envs.evaluate passes them)."""
        x = (torch.as_tensor(obs, device=device) - obs_mean_t) / obs_std_t
        if memory is not None:
            past_obs, past_actions, mask = (torch.as_tensor(p, device=device) for p in past)
            tokens = torch.cat([(past_obs - obs_mean_t.unsqueeze(2)) / obs_std_t.unsqueeze(2), past_actions], -1)  # [N, E, K, O + A]
            x = torch.cat([x, memory(tokens, mask)], -1)
        return policy.greedy(x).cpu().numpy()

    def evaluate() -> tuple[float, float]:
        returns = envs.evaluate(env, act, args.eval_episodes, seed=args.seed, memory=args.memory)
        return float(returns.mean()), data.normalized_score(args.task, returns)

    print(f"{run_dir.name}: {len(dataset)} transitions, {args.total_steps} steps on {device}", flush=True)

    def save_checkpoint(step: int) -> None:
        """Everything needed to evaluate the agents or to go on training (--resume), written atomically."""
        state = {
            "args": asdict(args),
            "qf": qf.state_dict(),
            "qf_target": qf_target.state_dict(),
            "vf": vf.state_dict(),
            "policy": policy.state_dict(),
            "memory": memory.state_dict() if memory is not None else None,  # shared by Q, V and the policies
            "memory_target": memory_target.state_dict() if memory is not None else None,
            **{f"{name}_optimizer": optimizer.state_dict() for name, (optimizer, _) in optimizers.items()},
            "obs_mean": torch.as_tensor(obs_mean),  # tensors, so that torch.load(weights_only=True) works
            "obs_std": torch.as_tensor(obs_std),
            "state_mean": torch.as_tensor(state_mean),
            "state_std": torch.as_tensor(state_std),
            "step": step,
            "rng": data.rng_state(),  # torch's generators: the only ones the training draws from
            "wall_seconds": wall_seconds(),
        }
        data.save_checkpoint(run_dir, state)

    start_step, previous_seconds = 0, 0.0
    if checkpoint is not None:
        start_step, previous_seconds = data.restore(
            checkpoint, run_dir, qf=qf, qf_target=qf_target, vf=vf, policy=policy,
            **({"memory": memory, "memory_target": memory_target} if memory is not None else {}),
            **{f"{name}_optimizer": optimizer for name, (optimizer, _) in optimizers.items()},
        )  # fmt: skip
    wall_seconds = lambda: previous_seconds + time.time() - start_time  # noqa: E731, over all sessions of the run

    # --bf16: the training steps' matmuls in bfloat16 (the layers hand back float32, and evaluation
    # runs without autocast)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    progress = data.Progress(args.total_steps, start_step)  # a line a minute between evaluations
    with data.stop_requests() as stop:
        for step in range(start_step + 1, args.total_steps + 1):
            idx = torch.randint(len(dataset), (args.batch_size,), device=device)
            with bf16:
                logs = update(sample(idx))

            if step % 100 == 0:
                progress(step, q_loss=logs["q_loss"], v_loss=logs["v_loss"], q_values=logs["q_values"])
                for name, value in logs.items():
                    writer.add_scalar(f"losses/{name}", value.item(), step)
                if not categorical:
                    writer.add_scalar("losses/policy_log_std", policy.head.log_std.mean().item(), step)
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
                raise data.Stopped(f"stopped at step {step}; go on with: python algos/maiql.py --resume {run_dir}")

    ret, score = evaluate()
    writer.add_scalar("eval/return", ret, args.total_steps)
    writer.add_scalar("eval/normalized_score", score, args.total_steps)
    writer.close()
    save_checkpoint(args.total_steps)
    result = {
        "task": args.task, "obs": env.obs_setting, "dataset": args.dataset, "algo": "maiql", "seed": args.seed,
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
