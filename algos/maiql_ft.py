# MAIQL-ft: MAIQL trained offline, then fine-tuned with rollouts through the real simulator
# (paper section 5.1 and Appendix A, "Finetuning MAIQL").
#
# Phase 1 is MAIQL (algos/maiql.py): IQL made multi-agent with QMIX-style mixing of per-agent
# Q_i(h_i, a_i) and V_i(h_i) (eq. 4, 5), the team's V_tot regressed on the `expectile` of the
# target Q_tot (eq. 1), Q_tot on r + gamma V_tot(s') (eq. 2), and each agent's policy extracted by
# advantage-weighted regression with the team's advantage (eq. 3, 6, 7).
#
# Phase 2 follows IQL's fine-tuning with the same losses, but the new data comes from MOMA's
# Dyna-like generation, not from 1000-step episodes from the initial state distribution:
# `--rollout-batch` parallel rollouts of at most `--rollout-length` steps start from dataset
# states (with their dataset histories under partial observability), the agents sample their
# actions, and the simulator (envs.Simulators) gives the next state, reward and termination.
# Rollouts are collected at a steady rate so that at the end of fine-tuning the replay buffer holds
# as many online transitions as offline ones (`--online-transitions`, default: the dataset's
# size), and every batch is drawn uniformly from the dataset and the online data together.
#
# Histories (memory under partial observability): the dataset and the online transitions share
# one index space, and every stored transition keeps the indices of its last K (observation,
# action) pairs; a rollout's first history is its start state's history in the dataset, and each
# step appends itself, so a history can mix dataset and generated steps as in MOMA-PPO.
#
# Differences from the paper, as in algos/maiql.py (mixers from one MLP of the state, IQL's
# state-independent log std with tanh on the mean, one Q_i per agent, the memory trained by the Q
# and V losses, the three losses from one batch with one backward pass), and: the normalisation
# statistics stay the dataset's during fine-tuning; exploration is the policies' own sampling
# (IQL's fine-tuning too), actions clipped to [-1, 1].
# On MuJoCo the training steps run under bfloat16 autocast (--bf16; the layers return float32) where
# the hardware has native bfloat16 (float32 elsewhere): 2-3x faster on CPUs with AMX, at the cost of
# bfloat16 rounding inside the matmuls. There the memory module is also compiled (--compile, needs a
# C++ compiler on CPU): 1.35x faster on ant PO.
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
    """a run folder (or its model.pt) to continue: its settings, weights, optimisers, online data, rollouts, RNG
    state and step are restored and the run goes on in that folder (with its saved budget, which fixes the split)"""
    save_every: int = 10_000
    """gradient steps between checkpoints (model.pt, everything needed to resume); Ctrl-C and SIGTERM also save one.
    Less often than the other scripts (2,000): a checkpoint holds the online data, up to the dataset's size"""
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

    # fine-tuning (appendix A: MAIQL-ft)
    finetune_fraction: float = 0.5
    """fraction of --total-steps spent fine-tuning with simulator rollouts (the paper: half)"""
    online_transitions: PerTask[int] = None
    """transitions collected in the simulator over the fine-tuning (default: the dataset's size, so that the
    buffer ends half offline, half online as in IQL's fine-tuning)"""
    rollout_batch: int = 50
    """rollouts run in parallel, each in its own copy of the simulator"""
    rollout_length: int = 10
    """maximum rollout length k (as MOMA-PPO's); a rollout also ends when the simulator says terminal"""
    bf16: PerTask[bool] = None
    """run the training steps' matmuls under bfloat16 autocast: about 2.7x faster on CPUs with AMX (and on
    recent GPUs); the layers return float32, so losses, targets and evaluation stay float32 (default: per
    task: on for MuJoCo, off for the coordination game; off, with a note, where the hardware has no native
    bfloat16 matmuls, as there it is slower than float32)"""
    compile: PerTask[bool] = None
    """compile the memory module with torch.compile, fusing its attention's elementwise work (about a minute
    of compilation, needs a C++ compiler on CPU; default: on for MuJoCo tasks when one is found)"""


# Defaults that depend on the task, used for every field left at None: MAIQL's (algos/maiql.py)
# offline, then as many fine-tuning steps (the paper: 2e6 steps in all, half of each).
TASK_DEFAULTS = {
    "coordination": dict(dataset="unfavorable", total_steps=6000, eval_every=0, hidden=64, bf16=False, compile=False),
    "reacher": dict(dataset="expert-mix", total_steps=2_000_000, eval_every=50_000, hidden=256, bf16=True, compile=True),
    "ant": dict(dataset="medium", total_steps=2_000_000, eval_every=50_000, hidden=256, bf16=True, compile=True),
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

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Categorical(logits=logits).sample()


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

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()
        return (torch.tanh(params) + std * torch.randn_like(params)).clamp(-1, 1)


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

    def sample(self, h: torch.Tensor) -> torch.Tensor:
        """Exploring actions, sampled from the agents' policies given their inputs h [N, B, in]."""
        return self.head.sample(self.net(h))


class ReplayBuffer:
    """The dataset in rows [0, T) and the online transitions appended after it, in one index space:
    normalised with the dataset's statistics and agent-major ([N, rows, ...]) so that a batch is
    already [N, B, ...]. With memory, every row keeps the rows of its last K (observation, action)
    pairs (`history` [rows, K] and its mask), so that online histories can reach into the dataset."""

    def __init__(self, env, dataset: data.Dataset, extra: int, memory: int, device: torch.device):
        self.env, self.memory, self.size = env, memory, len(dataset)
        self.T, capacity = len(dataset), len(dataset) + extra
        self.obs_mean, self.obs_std = dataset.stats("observations")
        self.state_mean, self.state_std = dataset.stats("states")
        self._obs_stats = [torch.as_tensor(x, device=device).unsqueeze(1) for x in (self.obs_mean, self.obs_std)]
        self._state_stats = [torch.as_tensor(x, device=device) for x in (self.state_mean, self.state_std)]

        def column(rows: np.ndarray, dtype=torch.float32, agent_major: bool = False) -> torch.Tensor:
            x = torch.as_tensor(rows, dtype=dtype, device=device)
            x, axis = (x.transpose(0, 1), 1) if agent_major else (x, 0)
            out = torch.zeros(*x.shape[:axis], capacity, *x.shape[axis + 1 :], dtype=dtype, device=device)
            out.narrow(axis, 0, self.T).copy_(x)
            return out

        categorical = env.n_actions is not None
        self.observations = column((dataset.observations - self.obs_mean) / self.obs_std, agent_major=True)  # [N, C, O]
        self.next_observations = column((dataset.next_observations - self.obs_mean) / self.obs_std, agent_major=True)
        self.actions = column(dataset.actions, torch.int64 if categorical else torch.float32, agent_major=True)
        self.states = column((dataset.states - self.state_mean) / self.state_std)  # [C, S]
        self.next_states = column((dataset.next_states - self.state_mean) / self.state_std)
        self.rewards = column(dataset.rewards)
        self.not_done = column(1.0 - dataset.terminals.astype(np.float32))
        self.raw_states = torch.as_tensor(dataset.states, device=device)  # rollouts start from these
        if memory:
            history, mask = data.history_index(dataset.episode_first(), np.arange(self.T), memory)
            self.history, self.history_mask = column(history, torch.int64), column(mask, torch.bool)  # [C, K]

    def columns(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Every stored column with its row axis (1 for the agent-major ones)."""
        cols = {name: (getattr(self, name), 1) for name in ("observations", "next_observations", "actions")}
        names = ("states", "next_states", "rewards", "not_done") + (("history", "history_mask") if self.memory else ())
        return cols | {name: (getattr(self, name), 0) for name in names}

    def online_rows(self) -> dict[str, torch.Tensor]:
        """The online rows [T, size) of every column: what a checkpoint needs (the dataset's rows come from its file)."""
        return {name: col.narrow(axis, self.T, self.size - self.T).clone() for name, (col, axis) in self.columns().items()}

    def load_online_rows(self, rows: dict[str, torch.Tensor]) -> None:
        for name, (col, axis) in self.columns().items():
            col.narrow(axis, self.T, rows[name].shape[axis]).copy_(rows[name])
        self.size = self.T + rows["rewards"].shape[0]

    def normalise_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw observations [N, B, O] or histories [N, B, K, O] -> normalised."""
        mean, std = (x.view(x.shape[0], *[1] * (obs.dim() - 2), x.shape[-1]) for x in self._obs_stats)  # [N, 1, (1,) O]
        return (obs - mean) / std

    def observe(self, raw_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw global states [B, S] -> the agents' normalised observations [N, B, O] and the normalised states."""
        mean, std = self._state_stats
        return self.normalise_obs(self.env.observe(raw_states).transpose(0, 1)), (raw_states - mean) / std

    def add(self, raw_states, actions, raw_next_states, rewards, terminals, history=None, history_mask=None):
        """Append B transitions (raw states [B, S], actions [N, B, ...], ...); returns their rows [B]."""
        rows = torch.arange(self.size, self.size + len(raw_states), device=raw_states.device)
        self.observations[:, rows], self.states[rows] = self.observe(raw_states)
        self.next_observations[:, rows], self.next_states[rows] = self.observe(raw_next_states)
        self.actions[:, rows], self.rewards[rows], self.not_done[rows] = actions, rewards, 1.0 - terminals.float()
        if self.memory:
            self.history[rows], self.history_mask[rows] = history, history_mask
        self.size += len(rows)
        return rows

    def tokens(self, steps: torch.Tensor) -> torch.Tensor:
        """Memory tokens [N, B, K, O + A] of the (observation, action) pairs at rows steps [B, K]."""
        return torch.cat([self.observations[:, steps], self.actions[:, steps]], -1)

    def past(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pasts before s_t of rows [B]: (tokens [N, B, K, O + A], mask [B, K])."""
        return self.tokens(self.history[rows]), self.history_mask[rows]

    def next_past(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pasts before s_t+1: the same window one step later, ending with the row itself."""
        steps, mask = shift_window(self.history[rows], self.history_mask[rows], rows)
        return self.tokens(steps), mask

    def sample(self, idx: torch.Tensor) -> dict:
        """Rows idx as a training batch, agent-major ([N, B, ...]); with memory, each agent's past before
        s_t and before s_t+1, as (tokens [N, B, K, O + A], mask [B, K])."""
        batch = {
            "obs": self.observations[:, idx], "states": self.states[idx], "actions": self.actions[:, idx],
            "rewards": self.rewards[idx], "not_done": self.not_done[idx], "next_obs": self.next_observations[:, idx],
            "next_states": self.next_states[idx],
        }  # fmt: skip
        if self.memory:
            batch["past"], batch["next_past"] = self.past(idx), self.next_past(idx)
        return batch


def shift_window(history: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """History windows [B, K] (and masks) one step later: drop the oldest, append `rows` [B]."""
    return torch.cat([history[:, 1:], rows[:, None]], 1), torch.cat([mask[:, 1:], torch.ones_like(mask[:, :1])], 1)


class SimulatorRollouts:
    """`b` rollouts of at most `k` steps in the real simulator, started from dataset states (with their
    dataset histories), that append their transitions to a ReplayBuffer one step of all of them at a time."""

    def __init__(self, task: str, buffer: ReplayBuffer, b: int, k: int, seed: int):
        self.buffer, self.b, self.k = buffer, b, k
        self.simulators = envs.Simulators(task, b, seed=seed)
        device = buffer.raw_states.device
        self.steps = torch.zeros(b, dtype=torch.int64, device=device)
        self._restart(torch.ones(b, dtype=torch.bool, device=device), None, None, None)

    def _restart(self, ended, next_states, history, mask) -> None:
        """Rollouts that ended start again from fresh dataset rows; the others go on."""
        fresh = torch.randint(self.buffer.T, (self.b,), device=ended.device)

        def pick(fresh_value: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
            """Per rollout [b, ...]: the fresh value where it ended (or at the first start), else its own."""
            return fresh_value if value is None else torch.where(ended.view(-1, *[1] * (value.dim() - 1)), fresh_value, value)

        self.states = pick(self.buffer.raw_states[fresh], next_states)  # raw global states [b, S]
        self.history = pick(self.buffer.history[fresh], history) if self.buffer.memory else None  # [b, K]
        self.mask = pick(self.buffer.history_mask[fresh], mask) if self.buffer.memory else None
        self.steps = torch.where(ended, 0, self.steps)

    def state_dict(self) -> dict:
        """Where every rollout stands (the simulators themselves are set from the states at each step)."""
        return {"states": self.states, "history": self.history, "mask": self.mask, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.states, self.history, self.mask, self.steps = state["states"], state["history"], state["mask"], state["steps"]

    @torch.no_grad()
    def step(self, sample_actions) -> None:
        """One step of every rollout. sample_actions(obs [N, b, O], past or None) -> actions [N, b, ...]."""
        obs, _ = self.buffer.observe(self.states)
        past = (self.buffer.tokens(self.history), self.mask) if self.buffer.memory else None
        actions = sample_actions(obs, past)
        next_states, rewards, terminals = (
            torch.as_tensor(x, device=self.states.device)
            for x in self.simulators.step(self.states.cpu().numpy(), actions.transpose(0, 1).cpu().numpy())
        )
        rows = self.buffer.add(self.states, actions, next_states, rewards, terminals, self.history, self.mask)
        self.steps += 1
        moved = shift_window(self.history, self.mask, rows) if self.buffer.memory else (None, None)
        self._restart(terminals | (self.steps >= self.k), next_states, *moved)


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
    if not 0 <= args.finetune_fraction <= 1:
        raise envs.UserInputError(f"--finetune-fraction {args.finetune_fraction} is not in [0, 1]")
    if args.online_transitions is None:  # no fine-tuning, no online rows to make room for
        args.online_transitions = len(dataset) if args.finetune_fraction > 0 else 0
    run_name = f"{args.task}-{env.obs_setting}-{Path(args.dataset).stem}__maiql_ft__{args.seed}__{int(start_time)}"
    if checkpoint is None:
        run_dir = data.new_run_dir(args.runs_dir, run_name)
    writer = SummaryWriter(str(run_dir))  # a resumed run appends to its own logs
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    n, s_dim, T = env.n_agents, env.state_dim, len(dataset)
    # the dataset and the online data; a collection round may overshoot the budget by one step of all rollouts
    replay = ReplayBuffer(env, dataset, args.online_transitions + args.rollout_batch, args.memory, device)

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

    def agent_inputs(reader: Memory | None, obs: torch.Tensor, past: tuple | None) -> torch.Tensor:
        """h_i for every agent [N, B, in]: the normalised observations [N, B, O], with memory followed by
        the summaries of the agents' pasts as `reader` (the online memory or its target copy) sees them."""
        return obs if reader is None else torch.cat([obs, reader(*past)], -1)

    def update(batch: dict) -> dict:
        """One gradient step of Q, V, the policies (and the memory) on a batch, then the Polyak averaging."""
        o, s, a = batch["obs"], batch["states"], batch["actions"]
        h = agent_inputs(memory, o, batch.get("past"))  # the Q and V losses train the memory through h
        with torch.no_grad():
            target_q = qf_target(agent_inputs(memory_target, o, batch.get("past")), s, a)  # [B], Q_hat_tot of eq. 5
            next_h = agent_inputs(memory, batch["next_obs"], batch.get("next_past"))
            q_backup = batch["rewards"] + args.gamma * batch["not_done"] * vf(next_h, batch["next_states"])

        # V: expectile regression of V_tot on the target Q_tot of the buffer's joint actions (eq. 1)
        v = vf(h, s)
        diff = target_q - v
        v_loss = expectile_loss(diff, args.expectile)
        # Q: Q_tot regresses on r + gamma V_tot(s') (eq. 2)
        q = qf(h, s, a)
        q_loss = (q - q_backup).square().mean()
        # Policies: AWR with the team advantage (eq. 3, 6, 7); the policies read the memory detached
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

    rollouts = SimulatorRollouts(args.task, replay, args.rollout_batch, args.rollout_length, args.seed)

    def explore(obs: torch.Tensor, past: tuple | None) -> torch.Tensor:
        """The agents' sampled actions from their normalised observations [N, b, O] (and pasts)."""
        return policy.sample(agent_inputs(memory, obs, past))

    @torch.no_grad()
    def act(obs: np.ndarray, *past: np.ndarray) -> np.ndarray:
        """Greedy actions of the N agents in E episodes from their raw observations [N, E, O] (and, with memory,
        their past observations [N, E, K, O], actions [N, E, K, A] and mask [E, K], as envs.evaluate passes them)."""
        x = replay.normalise_obs(torch.as_tensor(obs, device=device))
        if memory is not None:
            past_obs, past_actions, mask = (torch.as_tensor(p, device=device) for p in past)
            tokens = torch.cat([replay.normalise_obs(past_obs), past_actions], -1)  # [N, E, K, O + A]
            x = torch.cat([x, memory(tokens, mask)], -1)
        return policy.greedy(x).cpu().numpy()

    def evaluate(step: int) -> tuple[float, float]:
        returns = envs.evaluate(env, act, args.eval_episodes, seed=args.seed, memory=args.memory)
        ret, score = float(returns.mean()), data.normalized_score(args.task, returns)
        writer.add_scalar("eval/return", ret, step)
        writer.add_scalar("eval/normalized_score", score, step)
        return ret, score

    offline_steps = args.total_steps - round(args.finetune_fraction * args.total_steps)
    finetune_steps = args.total_steps - offline_steps
    print(f"{run_dir.name}: {T} transitions, {offline_steps} offline then {finetune_steps} fine-tuning steps "
          f"({args.online_transitions} simulator transitions) on {device}", flush=True)  # fmt: skip
    offline_score = None

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
            "obs_mean": torch.as_tensor(replay.obs_mean),  # tensors, so that torch.load(weights_only=True) works
            "obs_std": torch.as_tensor(replay.obs_std),
            "state_mean": torch.as_tensor(replay.state_mean),
            "state_std": torch.as_tensor(replay.state_std),
            "step": step,
            "online_transitions": replay.size - T,
            "online_rows": replay.online_rows(),  # the fine-tuning data so far, and where the rollouts stand
            "rollouts": rollouts.state_dict(),
            "offline_score": offline_score,
            "rng": data.rng_state(),  # torch's generators: the only ones the training draws from
            "wall_seconds": wall_seconds(),
        }
        data.save_checkpoint(run_dir, state)

    start_step, previous_seconds = 0, 0.0
    if checkpoint is not None:
        if args.total_steps != checkpoint["args"]["total_steps"]:
            raise envs.UserInputError(
                f"MAIQL-ft's budget fixes its offline/fine-tuning split and online schedule: resume without "
                f"--total-steps (saved: {checkpoint['args']['total_steps']})"
            )
        replay.load_online_rows(checkpoint["online_rows"])
        offline_score = checkpoint["offline_score"]
        start_step, previous_seconds = data.restore(
            checkpoint, run_dir, qf=qf, qf_target=qf_target, vf=vf, policy=policy, rollouts=rollouts,
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
            if step > offline_steps:  # fine-tuning: keep the online data on schedule, then sample from everything
                while replay.size - T < args.online_transitions * (step - offline_steps) / finetune_steps:
                    rollouts.step(explore)
            idx = torch.randint(replay.size, (args.batch_size,), device=device)
            with bf16:
                logs = update(replay.sample(idx))

            if step % 100 == 0:
                progress(step, q_loss=logs["q_loss"], v_loss=logs["v_loss"], q_values=logs["q_values"], online=replay.size - T)
                for name, value in logs.items():
                    writer.add_scalar(f"losses/{name}", value.item(), step)
                if not categorical:
                    writer.add_scalar("losses/policy_log_std", policy.head.log_std.mean().item(), step)
                writer.add_scalar("charts/SPS", int((step - start_step) / (time.time() - start_time)), step)
                writer.add_scalar("charts/online_transitions", replay.size - T, step)
            if step == offline_steps and finetune_steps:  # MAIQL's score, before fine-tuning
                ret, offline_score = evaluate(step)
                print(f"step {step}, end of offline training: return {ret:.2f}, normalized score {offline_score:.3f}", flush=True)
            elif args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
                ret, score = evaluate(step)
                print(f"step {step}: return {ret:.2f}, normalized score {score:.3f}", flush=True)
            if stop or step % args.save_every == 0:
                save_checkpoint(step)
            if stop:
                writer.close()
                raise data.Stopped(f"stopped at step {step}; go on with: python algos/maiql_ft.py --resume {run_dir}")

    ret, score = evaluate(args.total_steps)
    writer.close()
    save_checkpoint(args.total_steps)
    result = {
        "task": args.task, "obs": env.obs_setting, "dataset": args.dataset, "algo": "maiql_ft", "seed": args.seed,
        "normalized_score": score, "return": ret, "offline_normalized_score": offline_score,
        "eval_episodes": args.eval_episodes, "total_steps": args.total_steps, "wall_seconds": wall_seconds(),
        "device": str(device),
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
