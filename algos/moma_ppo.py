# MOMA-PPO: Model-based Offline Multi-Agent PPO (paper section 3, Algorithm 1, appendix A).
#
# 1. Learn a centralised world model from the offline dataset: an ensemble of N_m = 7
#    networks, each predicting a Gaussian over the next global state, a Gaussian over the
#    reward and a Bernoulli termination from (global state, joint action). The 5 members
#    with the lowest holdout error are kept (section 3.1).
# 2. Train decentralised MAPPO agents on synthetic rollouts: k-step rollouts start from
#    dataset states, the reward is penalised by the ensemble's epistemic uncertainty
#    (r~ = r_mean - lambda_r eps_r - lambda_g eps_g) and a rollout is cut with a time-out
#    when eps_g >= l_eps or after k steps (section 3.2). Agents interact through the
#    model, which is what lets them agree on one convention and adapt to each other.
#
# Differences from the paper, and choices it leaves open:
# - The world model's Gaussian NLL is weighted by the detached variance**0.5 (beta-NLL):
#   with plain NLL, outputs fit with a small variance dominate the gradient and the
#   others stall (on the coordination game the reward was never learned).
# - The time-out test uses eps_g before it is clamped to l_eps (the penalty uses the
#   clamped values, as section 3.1 says), so adaptive termination actually fires.
# - Where the dataset holds no terminal transition (reacher's), no synthetic step is terminal. The
#   Bernoulli heads, trained on none, still voted terminal off the data, and with reacher's negative
#   rewards an invented end pays: teams learned to steer there (in a longer-trained model the vote ended
#   18-25% of trained teams' greedy 10-step rollouts; without it they scored 0.84, not 0.64; NOTES.md).
# - Rollout slots that end (terminal or time-out) restart at once from a fresh dataset
#   state, so every PPO batch holds exactly rollout_batch x rollout_length transitions.
# - Reacher's rollouts are 25 steps long (b = 80, so a batch still holds 2,000 transitions; the paper's
#   Figure 9 found k from 5 to 50 alike) and a quarter of them start at a dataset episode's first state
#   (--episode-start-fraction 0.25; the paper draws every start uniformly). An evaluation episode starts at
#   rest with an empty memory, which uniform starts show 1 time in 50: with the paper's k = 10 and uniform
#   starts the leader-only teams ended 2 cm from the target from the data's states but 5-6 cm from the
#   rest pose, and the PO teams scored 0.92 (independent) and 0.90 (leader-only) after 3,000 steps; with
#   these settings 1.00 and 0.94 after 1,500 (all-observant 1.05; 3 seeds each, on another world model,
#   benchmark/NOTES.md). Ant and the coordination game keep the paper's k = 10, b = 200 and uniform starts
#   (on ant-medium PO reacher's settings scored no higher: 0.29 and 0.32 after 1,000 steps, seeds 0-1; nor,
#   on ant-medium FO, k = 5 with b = 400: 0.93 and 1.02 after 2,000 steps against the table's 0.97 and 1.01).
# - Advantages are normalised per batch (as MAPPO does); the paper does not say.
# - The policy and value MLPs use tanh hidden units, as PPO implementations usually do (appendix A.2 says
#   ReLU for networks unless specified otherwise; the world model and the value's mixer use SiLU and ReLU).
# - PPO minibatches of 500 transitions (4 per batch of 2,000), not appendix A.2's 256: twice the
#   gradient steps per batch and no better in the one run we made (reacher independent,
#   --memory 0, seed 0: 0.81 against 0.92).
# - The values that GAE reads are clipped to the range the dataset's rewards allow,
#   [(r_min - max penalty) / (1 - gamma), r_max / (1 - gamma)]: with almost every rollout cut
#   after k steps, the value function learns from its own bootstraps on generated states
#   and could diverge (ant-medium FO, seed 1: value loss 1e13, the score fell from 0.90 to 0.36).
# - Coordination game: a smaller world model and a larger learning rate than the paper's
#   MuJoCo settings, see TASK_DEFAULTS.
# - lambda_g (the paper gives no values): 1, but 5 on ant. With 1 and each eps capped at
#   l_eps = 1, a step off the data costs at most 2, less than the reward the model still
#   predicts there; ant PO policies drifted off the data (time-out rate 0.2 -> 0.7 in 500
#   steps, score 0.01). With 5 the time-out rate falls to 0.01-0.03 and FO scores the same.
# - Under partial observability each agent's policy and value read a memory summary of its
#   last 10 (observation, action) pairs (appendix A); rollout histories start with the
#   dataset's history of the start state and grow with the generated steps. On reacher the
#   summary is 16 wide instead of e_h = 128. With 128 next to 5 observation inputs per agent, the
#   PO teams scored 0.76 (independent) and 0.71-0.76 (leader-only, two world models), below the
#   0.83-0.87 of agents without memory; with 16, 0.81-0.88 over 1,500-4,500 steps with the terminal
#   vote and 0.90-0.92 after 3,000 without it (3 seeds each, benchmark/NOTES.md). Ant keeps 128:
#   at 16, one ant-medium PO seed scored 0.24 against 0.30.
# - Continuous actions: Gaussian policies, action-bound penalty, per-dimension entropy
#   temperatures. MAPPO learns at 3e-4 for 1,500 learning steps on reacher and at 1e-4 for 3,000
#   on ant (the paper: 5e-5 for 1e5), which takes minutes instead of hours or days on a CPU.
#   The log standard deviation is kept within [-5, 1] (the paper gives no bounds), so a dimension's
#   entropy cannot fall below 0.5 ln(2 pi e) - 5 = -3.58 nats, above the paper's targets (-4 reacher,
#   -6 ant): on MuJoCo the temperature stays 0 and the bound is the floor instead.
# - The agents' networks run under bfloat16 autocast on MuJoCo tasks (--bf16) where the hardware
#   has native bfloat16 (float32 elsewhere), their outputs cast back to float32 before
#   distributions, values and losses, and the memory module is compiled with torch.compile
#   (--compile): the ant PO loop ran 1.45x faster on one CPU core.
#
# Ablations: --ground-truth-model (MOMA-PPO-gt, Table 5: rollouts step the real simulator from
# the same dataset states), --penalty aleatoric (section 6.3), --lambda-r, --lambda-g, --l-eps
# (inf: no adaptive time-out), --rollout-length; not in the paper: --episode-start-fraction (a share
# of rollouts from episode starts, where a memory begins empty as in evaluation), --start-turn (ant: start states
# and their histories turned about the vertical axis, which ant's dynamics ignore, so that a PO torso agent
# practises steering its team back from headings its dataset state was not at), --state-noise 0
# (the chosen member's mean next state instead of a draw from its Gaussian; section 3.1 does not say
# which), --terminal rule (the simulator's termination test instead of the learned one), --value-memory
# (the value's gradient stopped at the policy's memory, or a memory of its own), --input-init split (the
# first layer's observation and memory-summary weights each initialised for their own fan-in), --clip-grad
# separate (the policies', the value's and the memory's gradient norms each clipped on their own). Long runs
# save model.pt every --save-every learning steps and on Ctrl-C / SIGTERM; --resume RUN_DIR
# continues one exactly where it stopped.
import hashlib
import json
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar

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
    """observation setting (default: the task's first one; coordination has only `fo`)"""
    dataset: PerTask[str] = None
    """dataset name (coordination: favorable, neutral, unfavorable; reacher: expert-mix; ant: random, medium,
    full-replay, expert) or a .npz/.hdf5 file or a Minari dataset folder (default: per task)"""
    seed: int = 0
    """seed of everything random in the run"""
    total_steps: PerTask[int] = None
    """PPO learning steps: one step = one batch of synthetic rollouts and its update (default: per task)"""
    eval_every: PerTask[int] = None
    """evaluate every this many learning steps, 0 for only at the end (default: per task)"""
    eval_episodes: int = 100
    """episodes per evaluation (greedy actions)"""
    cuda: bool = False
    """use the GPU when one is available"""
    runs_dir: str = "runs"
    """where the run folder (logs, model, result.json) is written"""

    # world model (section 3.1)
    wm_members: int = 7
    """ensemble members trained (N_m)"""
    wm_elites: int = 5
    """members kept, those with the lowest holdout error (N)"""
    wm_hidden: PerTask[int] = None
    """units per hidden layer of each member (default: per task)"""
    wm_layers: PerTask[int] = None
    """hidden layers of each member (default: per task)"""
    wm_learning_rate: float = 1e-3
    """Adam learning rate of the world model"""
    wm_nll_beta: float = 0.5
    """beta of the beta-NLL loss (Seitzer et al. 2022); 0 is the plain Gaussian NLL of the paper"""
    wm_batch_size: int = 256
    """transitions per member per gradient step"""
    wm_max_steps: PerTask[int] = None
    """gradient steps at most (default: per task)"""
    wm_holdout: float = 0.1
    """fraction of the dataset held out for early stopping and elite selection"""
    wm_eval_every: int = 250
    """gradient steps between holdout evaluations"""
    wm_patience: int = 4
    """stop after this many holdout evaluations without a 1% improvement of any member"""
    wm_seed: int = 0
    """seed of the world model's training, apart from --seed so that all seeds share one cached model"""
    wm_bf16: PerTask[bool] = None
    """train the world model under bfloat16 autocast (2.6-3.7x faster on CPUs with AMX; holdout errors are
    measured in float32; off, with a note, where the hardware has no native bfloat16 matmuls) (default: per task)"""
    world_model: PerTask[str] = None
    """a saved world model to use instead of training one (default: the cached one for this dataset and these
    wm_* settings, in {runs_dir}/world_models/ or runs/world_models/, trained and saved in the former on first use)"""
    ground_truth_model: bool = False
    """roll out through the real simulator from dataset states instead of a learned model (MOMA-PPO-gt, Table 5):
    no uncertainty, so no penalty and no adaptive time-out"""
    resume: str | None = None
    """a run folder (or its model.pt) to continue: its settings, weights, optimiser, RNG state and step are
    restored and the run goes on in that folder (--total-steps, if given, replaces the saved budget)"""
    save_every: int = 100
    """learning steps between checkpoints (model.pt, everything needed to resume); Ctrl-C and SIGTERM also save one"""

    # synthetic rollouts (section 3.2)
    rollout_batch: PerTask[int] = None
    """parallel rollouts b per learning step (default: 200; 80 on reacher, so that b x k stays 2,000)"""
    rollout_length: PerTask[int] = None
    """maximum rollout length k (default: the paper's 10; 25 on reacher)"""
    episode_start_fraction: PerTask[float] = None
    """fraction of rollouts that start from the first state of a dataset episode (an empty history, as every
    evaluation episode starts) instead of a uniformly drawn state (default: the paper's 0, which draws
    uniformly; 0.25 on reacher)"""
    start_turn: float = 0.0
    """turn each rollout's start state and its history about the vertical axis by an angle drawn uniformly from
    [-start_turn, start_turn] rad (ant only, not in the paper; 0: the dataset's headings)"""
    lambda_r: float = 1.0
    """penalty on the reward uncertainty eps_r"""
    lambda_g: PerTask[float] = None
    """penalty on the general uncertainty eps_g (default: per task; the paper gives no value)"""
    l_eps: float = 1.0
    """uncertainty threshold l_eps: time-out when eps_g >= l_eps; also caps the penalties (inf disables)"""
    penalty: str = "epistemic"
    """reward penalty: epistemic (the paper's eps_r, eps_g) or aleatoric (MOPO's, weighted by lambda_g; section 6.3)"""
    state_noise: float = 1.0
    """scale of the draw around the chosen member's mean next state: 1 samples the member's Gaussian (MOPO's way),
    0 takes its mean (section 3.1 says only "sampled uniformly amongst each ensemble member's next state")"""
    terminal: str = "learned"
    """what ends a synthetic episode: learned (the paper's: the members' Bernoulli heads, majority vote; nothing
    ends where the dataset holds no terminal transition, as reacher's: the heads had none to learn from) or rule
    (the simulator's own test on the next state, as MOPO and MBPO do: Ant's torso height out of [0.2, 1]; MuJoCo
    tasks only)"""

    # MAPPO (appendix A)
    learning_rate: PerTask[float] = None
    """Adam learning rate of the policies and the value function (default: per task; paper 5e-5)"""
    anneal_lr: bool = False
    """decay every learning rate linearly to 0 at --total-steps (CleanRL's PPO; the paper keeps them constant)"""
    hidden: PerTask[int] = None
    """units in each of the two hidden layers of the policy and value networks (default: per task; paper 256)"""
    epochs: int = 5
    """passes over each rollout batch"""
    minibatch_size: int = 500
    """transitions per gradient step (appendix A.2: 256)"""
    clip: float = 0.2
    """PPO ratio clipping"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.98
    """GAE lambda"""
    critic_coef: float = 0.5
    """weight of the value loss"""
    clip_grad: Literal["joint", "separate"] = "joint"
    """gradient norms clipped at 1 (appendix A.2) over all parameters at once (joint), or for the policies, the value
    and each memory module on their own (separate, as MAPPO's actor and critic). Under joint the value's gradient
    sets the policies' step (on ant 1.4-26x theirs); separate scored no higher on ant-medium FO (0.98, 0.99)"""
    entropy_lr: float = 1e-3
    """step size of the entropy temperature's dual update (the paper's entropy bonus coefficient)"""
    entropy_target: PerTask[float] = None
    """target entropy per agent and action dimension, in nats (default: per task; paper -4 reacher, -6 ant)"""
    action_penalty: float = 1.0
    """weight of the penalty on actions beyond [-1, 1] (continuous actions)"""
    log_std_init: float = -2.0
    """log standard deviation the Gaussian policies start from, in (-5, 1) (continuous actions; the paper gives none)"""

    # memory (appendix A)
    memory: PerTask[int] = None
    """past (observation, action) pairs each agent remembers; default: 10 (the paper's) when the
    observation setting hides part of the state, 0 (no memory module) otherwise"""
    memory_dim: PerTask[int] = None
    """width e_h of the memory module's embedding and of its summary (default: per task; paper 128, reacher 16)"""
    memory_learning_rate: float = 1e-4
    """Adam learning rate of the memory module (the paper's)"""
    value_memory: Literal["shared", "detached", "separate"] = "shared"
    """what the value network reads of an agent's past: the policy's memory summary, trained by both losses
    (shared, the paper's); that summary with the value loss's gradient stopped (detached); or a memory module
    of its own (separate). No effect without memory"""
    input_init: Literal["joint", "split"] = "joint"
    """how the first layer of the policy and value networks starts: joint (nn.Linear's default, one bound
    for all its inputs, so the memory's e_h-wide summary shrinks the observation's weights: 5x at e_h 128
    on reacher independent) or split (the observation's and the summary's weights each drawn for their own
    fan-in; not in the paper). No effect without memory"""
    bf16: PerTask[bool] = None
    """run the agents' networks (memory, policies, value) under bfloat16 autocast: 2.5x faster on CPUs with AMX;
    distributions, values and losses stay float32; off, with a note, where the hardware has no native bfloat16
    matmuls, as there it is slower than float32 (default: per task)"""
    compile: PerTask[bool] = None
    """compile the memory module with torch.compile, fusing its attention's elementwise work (about a minute
    of compilation, needs a C++ compiler on CPU; default: on for MuJoCo tasks when one is found)"""


# Where runs with the default --runs-dir cache their world models; runs elsewhere look here too
# (None: only under their own --runs-dir, as benchmark/speed.py --retrain needs).
SHARED_WORLD_MODELS: Path | None = Path(Args.runs_dir) / "world_models"

# Defaults that depend on the task, used for every field left at None.
PAPER_ROLLOUTS = dict(rollout_batch=200, rollout_length=10, episode_start_fraction=0.0)  # section 3.2, uniform starts
TASK_DEFAULTS = {
    # Two actions and a 1-d state: small networks suffice, and a larger learning rate than
    # the paper's 5e-5 converges in seconds (the team agrees within ~10 learning steps; the
    # convention can still shift between rounds until ~40). Entropy target: a near-deterministic policy.
    "coordination": dict(
        dataset="unfavorable", total_steps=60, eval_every=0, hidden=64, learning_rate=1e-3, entropy_target=0.1,
        wm_hidden=64, wm_layers=2, wm_max_steps=1000, wm_bf16=False, bf16=False, lambda_g=1.0, compile=False,
        memory_dim=128, **PAPER_ROLLOUTS,
    ),  # fmt: skip
    # MuJoCo: the paper's MAPPO settings (appendix A.2) except the budget and, on reacher, the
    # learning rate: the paper's 1e5 learning steps at 5e-5 take about 6 hours per reacher run on
    # one CPU core; at 3e-4 all-observant teams pass 0.9 within 500 steps (5e-5: 0.64 after 300,
    # 1e-4: 0.81 after 500). On ant-medium FO, 3e-4 diverged (value loss 1e6 after ~500 steps, the
    # score fell from 0.66 to 0.15) while 1e-4 reached 0.99 after 500 steps and stayed between 0.85
    # and 1.05 up to 3,000, where it ended at 1.09 (10 evaluation episodes each). Reacher's memory
    # summary is 16 wide, not 128, and its rollouts are longer, a quarter from episode starts (see the header).
    "reacher": dict(
        dataset="expert-mix", total_steps=1500, eval_every=250, hidden=256, learning_rate=3e-4, entropy_target=-4.0,
        wm_hidden=200, wm_layers=4, wm_max_steps=100_000, wm_bf16=True, bf16=True, lambda_g=1.0, compile=True,
        memory_dim=16, rollout_batch=80, rollout_length=25, episode_start_fraction=0.25,
    ),  # fmt: skip
    "ant": dict(
        dataset="medium", total_steps=3000, eval_every=500, hidden=256, learning_rate=1e-4, entropy_target=-6.0,
        wm_hidden=200, wm_layers=4, wm_max_steps=100_000, wm_bf16=True, bf16=True, lambda_g=5.0, compile=True,
        memory_dim=128, **PAPER_ROLLOUTS,
    ),  # fmt: skip
}


class BatchedLinear(nn.Module):
    """One linear layer per member (agent or ensemble member), as one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, members: int, fan_in: int, fan_out: int):
        super().__init__()
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default initialisation, for each member
        self.weight = nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def batched_mlp(members: int, sizes: list[int], activation=nn.ReLU) -> nn.Sequential:
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [BatchedLinear(members, fan_in, fan_out), activation()]
    return nn.Sequential(*layers[:-1])


# ---------------------------------------------------------------------------------------
# World model
# ---------------------------------------------------------------------------------------
class WorldModel(nn.Module):
    """Ensemble of Gaussian/Bernoulli models of (s, a) -> (s', r, terminal), all members in one network.

    Each member predicts the normalised state change and reward (mean and log-std) and a
    termination logit. Inputs and targets are normalised with dataset statistics, which are
    buffers so that they travel with the weights.
    """

    def __init__(self, members, state_dim, action_dim, hidden, layers, stats):
        super().__init__()
        self.state_dim = state_dim
        self.net = batched_mlp(members, [state_dim + action_dim] + [hidden] * layers + [2 * (state_dim + 1) + 1], nn.SiLU)
        for name, value in stats.items():  # normalisation and bounding-box statistics
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))

    def forward(self, states, actions):
        """[E, B, S], [E, B, A] -> normalised means [E, B, S+1], log-stds [E, B, S+1], terminal logits [E, B]."""
        x = torch.cat([(states - self.state_mean) / self.state_std, actions], -1)
        out = self.net(x)
        q = self.state_dim + 1
        mean, raw_log_std, logit = out[..., :q], out[..., q : 2 * q], out[..., -1]
        # soft bounds keep the Gaussian likelihood from collapsing on deterministic targets
        log_std = 0.5 - F.softplus(0.5 - raw_log_std)
        log_std = -5.0 + F.softplus(log_std + 5.0)
        return mean, log_std, logit

    def targets(self, states, next_states, rewards):
        """Normalised [state change, reward] targets [..., S+1]."""
        return (torch.cat([next_states - states, rewards[..., None]], -1) - self.target_mean) / self.target_std

    def keep(self, members: torch.Tensor) -> None:
        """Keep only the given ensemble members (e.g. the elites)."""
        for layer in self.net:
            if isinstance(layer, BatchedLinear):
                layer.weight = nn.Parameter(layer.weight.data[members].clone())
                layer.bias = nn.Parameter(layer.bias.data[members].clone())

    @torch.no_grad()
    def terminal_vote(self, states, actions) -> torch.Tensor:
        """The members' majority vote on whether (state, joint action) [B, S], [B, A] ends the episode: [B]."""
        members = self.net[0].weight.shape[0]
        logit = self(states.expand(members, -1, -1), actions.expand(members, -1, -1))[2]
        return majority(logit)

    @torch.no_grad()
    def step(self, states, actions, generator=None, noise=1.0, is_terminal=None):
        """One synthetic step for a batch: states [B, S], encoded joint actions [B, A].

        Returns the next state of a uniformly chosen member (a draw from its Gaussian with the standard
        deviation scaled by `noise`, so 0 gives the member's mean), the mean reward, the terminal flag
        (the members' majority vote, or `is_terminal` of that next state: the simulator's own test), the
        epistemic uncertainties eps_r, eps_g and MOPO's aleatoric uncertainty (the largest norm of a
        member's predicted standard deviation), with the next state and reward clipped to the dataset's
        bounding box.
        """
        members = self.net[0].weight.shape[0]
        mean, log_std, logit = self(states.expand(members, -1, -1), actions.expand(members, -1, -1))
        delta_and_reward = mean * self.target_std + self.target_mean  # [E, B, S+1]
        next_states = states + delta_and_reward[..., :-1]
        rewards = delta_and_reward[..., -1]
        eps_r, eps_g = epistemic_uncertainty(next_states, rewards)
        aleatoric = torch.linalg.vector_norm(log_std.exp() * self.target_std, dim=-1).amax(0)

        pick = torch.randint(members, (states.shape[0],), device=states.device, generator=generator)
        rows = torch.arange(states.shape[0], device=states.device)
        sampled = next_states[pick, rows]
        if noise:  # no draw at all for 0, so that the generator's stream is unchanged by it
            sampled = sampled + torch.randn(states.shape, device=states.device, generator=generator) * (
                noise * log_std[pick, rows, :-1].exp() * self.target_std[:-1]
            )
        if is_terminal is None:
            terminals = majority(logit)
        else:  # tested before the bounding-box clip, which keeps Ant's torso below 1 (the data's highest: 0.99998)
            terminals = is_terminal(sampled)
        next_state = torch.minimum(torch.maximum(sampled, self.state_low), self.state_high)
        reward = rewards.mean(0).clamp(self.reward_low, self.reward_high)
        return next_state, reward, terminals, eps_r, eps_g, aleatoric


def majority(logit: torch.Tensor) -> torch.Tensor:
    """Terminal logits [E, B] -> whether more than half of the members say terminal [B]."""
    return (logit > 0).float().mean(0) > 0.5


def epistemic_uncertainty(next_states: torch.Tensor, rewards: torch.Tensor):
    """eps_r and eps_g of section 3.1 from the members' predictions [E, B, S] and [E, B].

    eps_r: unbiased variance of the reward across members.
    eps_g: Frobenius norm of the unbiased ensemble covariance of x = [s', r]. With D the
    [E, q] matrix of deviations from the mean, ||D^T D||_F = ||D D^T||_F, so the norm is
    taken on the small [E, E] Gram matrix instead of the [q, q] covariance.
    """
    members = rewards.shape[0]
    eps_r = rewards.var(0, unbiased=True)
    x = torch.cat([next_states, rewards[..., None]], -1)
    deviations = x - x.mean(0)
    gram = torch.einsum("mbq,nbq->bmn", deviations, deviations) / (members - 1)
    eps_g = torch.linalg.matrix_norm(gram, ord="fro")
    return eps_r, eps_g


def train_world_model(args, dataset, encode_actions, device, writer, generator):
    """Fit the ensemble with holdout early stopping, then keep the elites. Returns the model."""
    states = torch.as_tensor(dataset.states, device=device)
    next_states = torch.as_tensor(dataset.next_states, device=device)
    rewards = torch.as_tensor(dataset.rewards, device=device)
    terminals = torch.as_tensor(dataset.terminals, device=device, dtype=torch.float32)
    actions = encode_actions(torch.as_tensor(dataset.actions, device=device))

    delta_and_reward = np.concatenate([dataset.next_states - dataset.states, dataset.rewards[:, None]], 1)
    state_mean, state_std = dataset.stats("states")
    stats = dict(
        state_mean=state_mean, state_std=state_std,
        # the floor keeps float rounding in (nearly) constant targets from being scaled up
        # into the loudest thing the model has to fit
        target_mean=delta_and_reward.mean(0), target_std=np.maximum(delta_and_reward.std(0), 1e-3),
        state_low=np.minimum(dataset.states.min(0), dataset.next_states.min(0)),
        state_high=np.maximum(dataset.states.max(0), dataset.next_states.max(0)),
        reward_low=dataset.rewards.min(), reward_high=dataset.rewards.max(),
    )  # fmt: skip
    model = WorldModel(args.wm_members, states.shape[1], actions.shape[1], args.wm_hidden, args.wm_layers, stats).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.wm_learning_rate)

    order = torch.randperm(len(states), device=device, generator=generator)
    n_holdout = max(1, min(int(args.wm_holdout * len(states)), 10_000))
    holdout, train = order[:n_holdout], order[n_holdout:]
    hold_targets = model.targets(states[holdout], next_states[holdout], rewards[holdout])

    def holdout_mse() -> torch.Tensor:  # per member, mean over next-state and reward dims
        with torch.no_grad():
            mean, _, _ = model(states[holdout].expand(args.wm_members, -1, -1), actions[holdout].expand(args.wm_members, -1, -1))
            return ((mean - hold_targets) ** 2).mean((1, 2))

    best_error = holdout_mse()
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    stale, step = 0, 0
    start = last_print = time.time()
    while step < args.wm_max_steps and stale < args.wm_patience:
        for _ in range(args.wm_eval_every):
            # each member draws its own minibatch: [E, B]
            idx = train[torch.randint(len(train), (args.wm_members, args.wm_batch_size), device=device, generator=generator)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.wm_bf16):
                mean, log_std, logit = model(states[idx], actions[idx])
            mean, log_std, logit = mean.float(), log_std.float(), logit.float()  # the losses in float32
            target = model.targets(states[idx], next_states[idx], rewards[idx])
            nll = ((mean - target) / log_std.exp()) ** 2 / 2 + log_std
            # beta-NLL: weighting by the detached variance**beta keeps well-fit, low-variance
            # outputs from drowning the gradient of the others (plain NLL, beta = 0, stalls here)
            nll = (nll * (2 * args.wm_nll_beta * log_std.detach()).exp()).mean()
            bce = F.binary_cross_entropy_with_logits(logit, terminals[idx])
            loss = nll + bce
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        step += args.wm_eval_every
        error, last_nll = holdout_mse(), nll.item()
        if not (math.isfinite(last_nll) and torch.isfinite(error).all()):
            # rather than stop early on a NaN holdout error as if converged and cache the last good snapshot
            raise data.Diverged(
                f"the world model's loss became {last_nll} by step {step:,}: training diverged; "
                "try a smaller --wm-learning-rate"
            )
        improved = error < best_error * 0.99
        stale = 0 if improved.any() else stale + 1
        best_error = torch.where(improved, error, best_error)
        for key, value in model.state_dict().items():  # snapshot the improved members only
            if value.dim() == 3 and value.shape[0] == args.wm_members:
                best_state[key][improved] = value[improved]
        writer.add_scalar("losses/world_model_nll", last_nll, step)
        writer.add_scalar("losses/world_model_holdout_mse", best_error.mean().item(), step)
        if time.time() - last_print > 30:
            last_print = time.time()
            print(f"world model step {step}: mean holdout MSE {best_error.mean():.3e} ({last_print - start:.0f}s)", flush=True)

    model.load_state_dict(best_state)
    elites = torch.argsort(best_error)[: args.wm_elites]
    model.keep(elites)
    errors = ", ".join(f"{e:.2e}" + ("*" if i in elites else "") for i, e in enumerate(best_error.tolist()))
    print(f"world model: {step} steps in {time.time() - start:.1f}s, holdout MSE per member (* elite): {errors}", flush=True)
    model.info = {"steps": step, "seconds": time.time() - start, "holdout_mse": best_error.tolist(), "elites": elites.tolist()}
    return model


def cached_world_model_path(args, dataset) -> Path:
    """Where the world model of this dataset (by content) and these wm_* settings is cached."""
    digest = hashlib.sha256()
    for x in (dataset.states, dataset.actions, dataset.rewards, dataset.next_states, dataset.terminals):
        digest.update(np.ascontiguousarray(x).tobytes())
    settings = {key: value for key, value in asdict(args).items() if key.startswith("wm_")}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    name = f"{args.task}-{Path(args.dataset).stem}-{digest.hexdigest()[:12]}.pt"
    path = Path(args.runs_dir) / "world_models" / name
    # a run in another --runs-dir (variants, sweeps) reuses the model cached under the default one
    # rather than silently spending minutes on training an identical one
    shared = SHARED_WORLD_MODELS / name if SHARED_WORLD_MODELS else None
    return shared if not path.exists() and shared and shared.exists() else path


def save_world_model(model: WorldModel, path: Path) -> None:
    first = model.net[0].weight  # [E, in, hidden]
    config = dict(members=first.shape[0], state_dim=model.state_dim, action_dim=first.shape[1] - model.state_dim,
                  hidden=first.shape[2], layers=sum(isinstance(m, BatchedLinear) for m in model.net) - 1)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # written whole, then renamed: an interrupted run leaves no half file
    torch.save({"config": config, "state_dict": model.state_dict(), "info": getattr(model, "info", {})}, tmp)
    tmp.replace(path)


def load_world_model(path: Path, state_dim: int, action_dim: int, device) -> WorldModel:
    if not Path(path).is_file():
        raise envs.UserInputError(f"world model '{path}' does not exist; leave --world-model unset to train one")
    saved = torch.load(path, map_location=device, weights_only=False)
    config, state = saved["config"], saved["state_dict"]
    if (config["state_dim"], config["action_dim"]) != (state_dim, action_dim):
        raise envs.UserInputError(
            f"world model '{path}' maps {config['state_dim']}-dim states and {config['action_dim']}-dim joint actions; "
            f"this task needs {state_dim} and {action_dim}"
        )
    stats = {key: state[key] for key in ("state_mean", "state_std", "target_mean", "target_std", "state_low",
                                         "state_high", "reward_low", "reward_high")}  # fmt: skip
    model = WorldModel(config["members"], state_dim, action_dim, config["hidden"], config["layers"], stats).to(device)
    model.load_state_dict(state)
    model.info = saved.get("info", {})
    return model


# ---------------------------------------------------------------------------------------
# MAPPO agents
# ---------------------------------------------------------------------------------------
# The two action types share one interface, so that the training loop is the same for both:
#   features(obs [N, B, O], *past) -> the agents' inputs [N, B, F]: normalised observations, with
#       memory followed by the summary of each agent's past (past_obs [N, B, K, O],
#       past_actions [N, B, K, ...], mask [B, K]); the value network reads the same features
#   distribution(features) -> a torch distribution over the agents' actions
#   log_prob_dims(dist, actions) -> [N, B, D] log-probabilities per action dimension
#   encode(actions [B, N, ...]) -> the world model's joint-action input [B, N * ...]
#   bound_error(actions [N, B, ...]) -> [N, B] squared excess over the action bounds
#   act(obs [N, O], *past) -> greedy actions, for evaluation
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

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The embedded tokens x = embed(tokens) + position [N, B, K, E] and qkv(x) split into q, k, v."""
        n, b, k, _ = tokens.shape
        x = self.embed(tokens.flatten(1, 2)).view(n, b, k, -1) + self.position
        # The embedding and the q/k/v projection are both linear with nothing between, so the
        # tokens are projected through the product of their weights: [T, 3E] rather than [E, 3E]
        # per step (T = 17 on ant PO, E = 128): the same function and parameters, 7x fewer multiply-adds
        # (5-15% off the memory's time in our measurements).
        weight = self.embed.weight @ self.qkv.weight  # [N, T, 3E]
        bias = (self.embed.bias + self.position) @ self.qkv.weight + self.qkv.bias  # [N, K, 3E]
        qkv = torch.baddbmm(bias.repeat(1, b, 1), tokens.flatten(1, 2), weight)
        return x, *qkv.view(n, b, k, 3, -1).unbind(3)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, b, k, _ = tokens.shape
        x, q, key, v = self.project(tokens)
        hidden = -1e9 * ~mask  # [B, K] additive mask: masked steps get no attention
        attention = torch.softmax(q @ key.transpose(-1, -2) / math.sqrt(x.shape[-1]) + hidden[:, None], -1)
        x = F.layer_norm(x + attention @ v, x.shape[-1:]) * self.norm_gain + self.norm_bias
        # keys @ query = x @ (W_key @ query): one [E, 1] vector per agent instead of [B * K, E] keys
        scores = torch.bmm(x.flatten(1, 2), self.soft_key @ self.soft_query).view(n, b, k)
        weights = torch.softmax(scores / math.sqrt(x.shape[-1]) + hidden, -1)
        return (weights.unsqueeze(-1) * x).sum(2) * mask.any(-1, keepdim=True)


class CategoricalPolicies(nn.Module):
    """All agents' categorical policies in one batched network: features [N, B, F] -> logits."""

    def __init__(self, env, hidden, obs_mean, obs_std, memory=0, memory_dim=128, n_outputs=None):
        super().__init__()
        self.n_agents, self.n_actions = env.n_agents, env.n_actions
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32).unsqueeze(1))  # [N, 1, O]
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32).unsqueeze(1))
        # tokens: an observation and the action taken (one-hot for categorical actions)
        self.token_dim = env.obs_dim + (env.n_actions or env.act_dim)
        self.memory = Memory(env.n_agents, self.token_dim, memory, memory_dim) if memory else None
        self.feature_dim = env.obs_dim + (memory_dim if memory else 0)
        self.net = batched_mlp(env.n_agents, [self.feature_dim, hidden, hidden, n_outputs or env.n_actions], nn.Tanh)

    def features(self, obs, past_obs=None, past_actions=None, mask=None, memory=None) -> torch.Tensor:
        """The agents' inputs; `memory` summarises the past instead of the policies' module (the value's own)."""
        memory = self.memory if memory is None else memory
        x = (obs - self.obs_mean) / self.obs_std
        if memory is None:
            return x
        past = (past_obs - self.obs_mean.unsqueeze(2)) / self.obs_std.unsqueeze(2)
        return torch.cat([x, memory(torch.cat([past, self.token_actions(past_actions)], -1), mask)], -1)

    def token_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return F.one_hot(actions.long(), self.n_actions).float()

    def distribution(self, features: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.net(features).float())

    def log_prob_dims(self, dist, actions: torch.Tensor) -> torch.Tensor:
        return dist.log_prob(actions).unsqueeze(-1)  # one "dimension" per agent

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        return F.one_hot(actions, self.n_actions).float().flatten(-2)

    def bound_error(self, actions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(actions.shape[:2], device=actions.device)

    def greedy(self, dist) -> torch.Tensor:
        return dist.probs.argmax(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray, *past: np.ndarray) -> np.ndarray:
        """Greedy actions [N, E, ...] from the agents' observations [N, E, O] in E episodes (and their past,
        as envs.evaluate passes it)."""
        device = self.obs_mean.device
        past = [torch.as_tensor(x, device=device) for x in past]
        features = self.features(torch.as_tensor(obs, device=device), *past)
        return self.greedy(self.distribution(features)).cpu().numpy()


class GaussianPolicies(CategoricalPolicies):
    """All agents' Gaussian policies, state-dependent standard deviation, no tanh squashing
    (appendix A: the action-bound penalty keeps the actions near [-1, 1] instead)."""

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0

    def __init__(self, env, hidden, obs_mean, obs_std, memory=0, memory_dim=128, log_std_init=-2.0):
        super().__init__(env, hidden, obs_mean, obs_std, memory, memory_dim, n_outputs=2 * env.act_dim)
        if not self.LOG_STD_MIN < log_std_init < self.LOG_STD_MAX:
            raise envs.UserInputError(f"--log-std-init {log_std_init} is outside ({self.LOG_STD_MIN}, {self.LOG_STD_MAX})")
        # shifts the squashing so that a raw output of 0 (where the network starts, roughly) gives log_std_init
        fraction = (log_std_init - self.LOG_STD_MIN) / (self.LOG_STD_MAX - self.LOG_STD_MIN)
        self.raw_log_std_offset = math.log(fraction / (1 - fraction))

    def token_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return actions.clamp(-1, 1)

    def distribution(self, features: torch.Tensor) -> torch.distributions.Normal:
        mean, raw_log_std = self.net(features).float().chunk(2, -1)  # float32 even under bfloat16 autocast
        log_std = self.LOG_STD_MIN + (self.LOG_STD_MAX - self.LOG_STD_MIN) * torch.sigmoid(raw_log_std + self.raw_log_std_offset)
        return torch.distributions.Normal(mean, log_std.exp())

    def log_prob_dims(self, dist, actions: torch.Tensor) -> torch.Tensor:
        return dist.log_prob(actions)

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        return actions.clamp(-1, 1).flatten(-2)  # the simulator clips its controls to their range

    def bound_error(self, actions: torch.Tensor) -> torch.Tensor:
        excess = (actions.abs() - 1).clamp(min=0)
        return (excess**2).sum(-1)

    def greedy(self, dist) -> torch.Tensor:
        return dist.mean.clamp(-1, 1)


class MixedValue(nn.Module):
    """Centralised value with QMIX-style decomposition: V(s) = sum_i w_i(s) V_i(h_i) + b(s), w_i >= 0,
    where h_i are the agent's features (its observation and memory summary, by default the policy's;
    with --value-memory separate, `memory` is the value's own module)."""

    def __init__(self, n_agents, feature_dim, state_dim, hidden, state_mean, state_std, memory=None):
        super().__init__()
        self.memory = memory
        self.register_buffer("state_mean", torch.as_tensor(state_mean, dtype=torch.float32))
        self.register_buffer("state_std", torch.as_tensor(state_std, dtype=torch.float32))
        self.agent_values = batched_mlp(n_agents, [feature_dim, hidden, hidden, 1], nn.Tanh)
        self.mixer = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_agents + 1))

    def forward(self, features: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """features [N, B, F], states [B, S] -> V(s) [B]."""
        values = self.agent_values(features).squeeze(-1).float()  # [N, B], float32 even under bfloat16 autocast
        mix = self.mixer((states - self.state_mean) / self.state_std).float()  # [B, N + 1]
        return (mix[:, :-1].abs() * values.T).sum(-1) + mix[:, -1]


def value_features(policies, value, mode: str, obs, past: tuple, features=None) -> torch.Tensor:
    """The value network's inputs for observations `obs` and their `past`, given (where already computed) the
    policies' `features` of the same: --value-memory shared, detached or separate (see Args)."""
    if value.memory is not None:
        return policies.features(obs, *past, memory=value.memory)
    features = policies.features(obs, *past) if features is None else features
    if mode == "detached" and policies.memory is not None:  # the summary follows the observation
        obs_dim = obs.shape[-1]
        return torch.cat([features[..., :obs_dim], features[..., obs_dim:].detach()], -1)
    return features


def gradient_clip_groups(policies, value, memories: list, mode: str) -> list[list[nn.Parameter]]:
    """The parameter sets whose gradient norms are clipped at 1 (--clip-grad): all of them at once (joint), or the
    policies' heads, the value (agent values and mixer) and each of the `memories` modules on their own (separate)."""
    if mode == "joint":
        return [[*policies.parameters(), *value.parameters()]]
    heads = [list(policies.net.parameters()), [*value.agent_values.parameters(), *value.mixer.parameters()]]
    return heads + [list(module.parameters()) for module in memories]


def split_input_init(layer: BatchedLinear, obs_dim: int) -> None:
    """Redraw a first layer's weights so that the observation's rows and the memory summary's rows each get
    nn.Linear's bound for their own fan-in (--input-init split), as if each fed a layer of its own."""
    with torch.no_grad():
        for rows in (layer.weight[:, :obs_dim], layer.weight[:, obs_dim:]):
            bound = 1 / math.sqrt(rows.shape[1])
            rows.uniform_(-bound, bound)


def uncertainty_penalty(eps_r, eps_g, aleatoric, args) -> torch.Tensor:
    """The reward penalty of section 3.2, lambda_r min(eps_r, l_eps) + lambda_g min(eps_g, l_eps), or with
    --penalty aleatoric MOPO's lambda_g max_m ||sigma_m(s, a)|| (the ablation of section 6.3)."""
    if args.penalty == "aleatoric":
        return args.lambda_g * aleatoric
    return args.lambda_r * eps_r.clamp(max=args.l_eps) + args.lambda_g * eps_g.clamp(max=args.l_eps)


def terminal_test(terminal: str, env, dataset_terminals: np.ndarray):
    """What ends a synthetic episode (--terminal): None for the members' vote, or a test of the next state.
    Heads trained on a dataset without one terminal transition can only invent terminals off the data, and
    where every reward is negative (reacher) an invented end pays: trained teams steered into them (NOTES)."""
    if terminal == "rule":
        return env.is_terminal
    if not dataset_terminals.any():
        return lambda states: torch.zeros(states.shape[:-1], dtype=torch.bool, device=states.device)
    return None


def adaptive_timeout(eps_g: torch.Tensor, l_eps: float) -> torch.Tensor:
    """Cut a rollout with a time-out once the world model is unreliable: eps_g >= l_eps (section 3.2).
    Tested on eps_g itself: the paper's released code clamps eps_g to l_eps first, so it never fires."""
    return eps_g >= l_eps


def extend_history(past: tuple, obs: torch.Tensor, actions: torch.Tensor) -> tuple:
    """Rollout histories one step later: drop the oldest pair, append (obs [N, b, O], actions [N, b, ...]).
    `past` is (past_obs [N, b, K, O], past_actions [N, b, K, ...], mask [b, K]), or () without memory."""
    if not past:
        return ()
    past_obs, past_actions, mask = past
    return (
        torch.cat([past_obs[:, :, 1:], obs.unsqueeze(2)], 2),
        torch.cat([past_actions[:, :, 1:], actions.unsqueeze(2)], 2),
        torch.cat([mask[:, 1:], torch.ones_like(mask[:, :1])], 1),
    )


def restart_history(ended: torch.Tensor, fresh: tuple, kept: tuple) -> tuple:
    """The kept histories, replaced by the fresh ones in the rollout slots that ended ([b] flags)."""
    return tuple(
        torch.where(ended.view(1, -1, *[1] * (x.dim() - 2)) if x.dim() > 2 else ended[:, None], f, x)
        for f, x in zip(fresh, kept)
    )


def draw_start_rows(n: int, rows: int, first_rows: torch.Tensor, episode_start_fraction: float, generator) -> torch.Tensor:
    """n dataset rows [n] to start rollouts from: uniform over all `rows`, except that a fraction of them
    (--episode-start-fraction) are episode starts `first_rows`, where a memory has seen nothing yet."""
    idx = torch.randint(rows, (n,), device=first_rows.device, generator=generator)
    if episode_start_fraction > 0:  # no extra draws at 0, so that the paper's setting is unchanged
        first = first_rows[torch.randint(len(first_rows), (n,), device=first_rows.device, generator=generator)]
        use_first = torch.rand(n, device=first_rows.device, generator=generator) < episode_start_fraction
        idx = torch.where(use_first, first, idx)
    return idx


@torch.no_grad()
def synthetic_rollouts(env, policies, model_step, sample_starts, args) -> tuple[dict, tuple, tuple]:
    """One batch of section 3.2's rollouts: b = --rollout-batch slots of k = --rollout-length steps, every
    slot, agent and ensemble member at once (no Python loop but the one over time).

    Each slot starts from a dataset state (and its history) drawn by sample_starts(n); at every step the
    agents sample their actions, model_step(states, actions) gives the next state, reward, terminal and
    uncertainties, the reward is penalised and the step times out once eps_g >= l_eps or at t = k - 1.
    A slot that ended (terminal or time-out) restarts at once from a fresh dataset state, so the batch
    always holds k * b transitions. Returns the transitions as [k, b, ...] tensors (actions and log-probs
    [k, N, b, ...]) and, with memory, the histories before each state and each next state, flattened to
    ([N, k * b, K, O], [N, k * b, K, ...], mask [k * b, K]); () without memory."""
    k, b = args.rollout_length, args.rollout_batch
    states, past = sample_starts(b)
    buffer = defaultdict(list)
    for t in range(k):
        obs = env.observe(states).transpose(0, 1)  # [N, b, O]
        with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            dist = policies.distribution(policies.features(obs, *past))
        actions = dist.sample()  # [N, b, ...]
        next_states, reward, terminal, eps_r, eps_g, aleatoric = model_step(states, actions)
        timeout = adaptive_timeout(eps_g, args.l_eps) | (t == k - 1)
        penalty = uncertainty_penalty(eps_r, eps_g, aleatoric, args)
        next_past = extend_history(past, obs, actions)
        transition = dict(
            states=states, actions=actions, log_probs=policies.log_prob_dims(dist, actions), rewards=reward - penalty,
            masks=1.0 - terminal.float(), timeout_masks=1.0 - timeout.float(), next_states=next_states,
            past=past, next_past=next_past,
        )  # fmt: skip
        for key, x in transition.items():
            buffer[key].append(x)
        # a finished slot restarts from a fresh dataset state (and its history)
        fresh_states, fresh_past = sample_starts(b)
        ended = terminal | timeout
        states = torch.where(ended[:, None], fresh_states, next_states)
        past = restart_history(ended, fresh_past, next_past)
    # the histories [k, N, b, K, ...] become [N, k * b, K, ...] and their masks [k * b, K]
    past, next_past = (
        tuple(torch.stack(x).transpose(0, 1).flatten(1, 2) if x[0].dim() > 2 else torch.stack(x).flatten(0, 1)
              for x in zip(*buffer.pop(key)))
        for key in ("past", "next_past")
    )  # fmt: skip
    return {key: torch.stack(x) for key, x in buffer.items()}, past, next_past


def value_range(dataset_rewards: np.ndarray, args) -> tuple[float, float]:
    """The discounted returns that (penalised) rewards within the dataset's range allow: values outside
    it are wrong, so GAE clips to it and the value function cannot chase its bootstraps to infinity."""
    if args.ground_truth_model:  # the simulator: no penalty
        largest_penalty = 0.0
    elif args.penalty == "epistemic":  # each eps is capped at l_eps (0 * inf would be NaN: skip unused terms)
        largest_penalty = sum(weight * args.l_eps for weight in (args.lambda_r, args.lambda_g) if weight > 0)
    else:  # the aleatoric penalty has no cap
        largest_penalty = math.inf if args.lambda_g > 0 else 0.0
    horizon = 1 / (1 - args.gamma)
    return float(dataset_rewards.min() - largest_penalty) * horizon, float(dataset_rewards.max()) * horizon


def timeout_aware_gae(rewards, values, next_values, masks, timeout_masks, gamma, lam):
    """Returns and advantages of appendix A over [k, b] rollouts (time first).

    masks = 1 - terminal: a terminal never bootstraps. timeout_masks = zeta: at a time-out
    (zeta = 0) accumulation stops and the return bootstraps from the next state's value.
    """
    returns = torch.zeros_like(rewards)
    advantages = torch.zeros_like(rewards)
    running_returns = next_values[-1] * masks[-1]
    running_advantages = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        bootstrap = next_values[t] * masks[t]
        running_returns = rewards[t] + gamma * masks[t] * (
            running_returns * timeout_masks[t] + (1 - timeout_masks[t]) * bootstrap
        )
        returns[t] = running_returns
        delta = rewards[t] + gamma * bootstrap - values[t]
        running_advantages = delta + gamma * lam * running_advantages * masks[t] * timeout_masks[t]
        advantages[t] = running_advantages
    return returns, advantages


def get_world_model(args, path: Path, dataset, env, encode_actions, device, writer) -> WorldModel:
    """The world model saved at `path`, or one trained now and saved there."""
    action_input = encode_actions(torch.as_tensor(dataset.actions[:1], device=device)).shape[1]
    # the world model has its own random streams: a cached model and a freshly trained one give the same run
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.wm_seed)
        if args.world_model or path.exists():
            world_model = load_world_model(path, env.state_dim, action_input, device)
            print(f"world model: loaded {path}", flush=True)
        else:
            generator = torch.Generator(device).manual_seed(args.wm_seed)
            world_model = train_world_model(args, dataset, encode_actions, device, writer, generator)
            save_world_model(world_model, path)
            print(f"world model: saved {path}", flush=True)
    return world_model


def main(args: Args) -> dict:
    checkpoint = None
    if args.resume:  # the saved settings, except a new budget
        args, run_dir, checkpoint = data.resume(args)
    for key, value in TASK_DEFAULTS.get(args.task, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.bf16 = data.bf16_if_native(args.bf16, args.cuda)  # emulated bfloat16 is slower than float32
    args.wm_bf16 = data.bf16_if_native(args.wm_bf16, args.cuda, "--wm-bf16")
    start_time = time.time()
    env = envs.make(args.task, args.obs)
    dataset = data.load(env, args.dataset)
    if args.memory is None:
        args.memory = 10 if envs.partially_observed(env) else 0
    if args.penalty not in ("epistemic", "aleatoric"):
        raise envs.UserInputError(f"unknown --penalty '{args.penalty}'; choose epistemic or aleatoric")
    if args.terminal not in ("learned", "rule"):
        raise envs.UserInputError(f"unknown --terminal '{args.terminal}'; choose learned or rule")
    if args.terminal == "rule" and not hasattr(env, "is_terminal"):
        raise envs.UserInputError(f"--terminal rule needs a MuJoCo task (reacher, ant), not {args.task}")
    is_terminal = terminal_test(args.terminal, env, dataset.terminals)
    if not 0 <= args.episode_start_fraction <= 1:
        raise envs.UserInputError(f"--episode-start-fraction {args.episode_start_fraction} is not in [0, 1]")
    if args.start_turn and not hasattr(env, "turn"):
        raise envs.UserInputError(f"--start-turn needs a task whose dynamics ignore the heading (ant), not {args.task}")
    run_name = f"{args.task}-{env.obs_setting}-{Path(args.dataset).stem}__moma_ppo__{args.seed}__{int(start_time)}"
    if checkpoint is None:
        run_dir = data.new_run_dir(args.runs_dir, run_name)
    writer = SummaryWriter(str(run_dir))  # a resumed run appends to its own logs
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(args.seed)
    print(f"{run_dir.name}: {len(dataset)} transitions, {args.total_steps} learning steps on {device}", flush=True)

    obs_mean, obs_std = dataset.stats("observations")
    state_mean, state_std = dataset.stats("states")
    if env.n_actions is not None:
        policies = CategoricalPolicies(env, args.hidden, obs_mean, obs_std, args.memory, args.memory_dim).to(device)
    else:
        policies = GaussianPolicies(env, args.hidden, obs_mean, obs_std, args.memory, args.memory_dim, args.log_std_init).to(device)
    value_memory = None
    if args.memory and args.value_memory == "separate":
        value_memory = Memory(env.n_agents, policies.token_dim, args.memory, args.memory_dim)
    value = MixedValue(env.n_agents, policies.feature_dim, env.state_dim, args.hidden, state_mean, state_std, value_memory)
    value = value.to(device)
    if args.memory and args.input_init == "split":
        for layer in (policies.net[0], value.agent_values[0]):
            split_input_init(layer, env.obs_dim)
    memories = [module for module in (policies.memory, value.memory) if module is not None]
    if args.compile:  # fuses the attention's elementwise work
        for module in memories:
            data.compile_in_place(module, device=device)
    action_dims = 1 if env.n_actions is not None else env.act_dim
    if args.ground_truth_model:
        world_model, wm_path = envs.Simulators(args.task, args.rollout_batch, seed=args.seed), "ground truth"
        print("rollouts through the real simulator (--ground-truth-model)", flush=True)
    else:
        wm_path = Path(args.world_model) if args.world_model else cached_world_model_path(args, dataset)
        world_model = get_world_model(args, wm_path, dataset, env, policies.encode, device, writer)
    groups = [{"params": [*policies.net.parameters(), *value.agent_values.parameters(), *value.mixer.parameters()]}]
    if memories:  # with their own learning rate
        groups.append({"params": [p for module in memories for p in module.parameters()], "lr": args.memory_learning_rate})
    optimizer = torch.optim.Adam(groups, lr=args.learning_rate)
    base_learning_rates = [group["lr"] for group in optimizer.param_groups]
    clip_groups = gradient_clip_groups(policies, value, memories, args.clip_grad)
    entropy_alpha = torch.zeros(env.n_agents, action_dims, device=device)  # per agent and action dimension

    start_states = torch.as_tensor(dataset.states, device=device)
    # with memory, a rollout starts with its dataset state's history (agent-major, like the features)
    episode_first = torch.as_tensor(dataset.episode_first(), device=device)
    first_rows = torch.as_tensor(np.flatnonzero(dataset.episode_starts), device=device)  # --episode-start-fraction
    dataset_obs = torch.as_tensor(dataset.observations, device=device).transpose(0, 1)  # [N, T, O]
    dataset_actions = torch.as_tensor(dataset.actions, device=device).transpose(0, 1)  # [N, T, ...]
    k, b = args.rollout_length, args.rollout_batch
    value_low, value_high = value_range(dataset.rewards, args)

    def sample_starts(n: int) -> tuple[torch.Tensor, tuple]:
        """n dataset states to start rollouts from, and with memory their histories (past obs, actions, mask)."""
        idx = draw_start_rows(n, len(start_states), first_rows, args.episode_start_fraction, generator)
        states, angle = start_states[idx], None
        if args.start_turn:  # no extra draws at 0, so that the paper's setting is unchanged
            angle = args.start_turn * (2 * torch.rand(n, device=device, generator=generator) - 1)
            states = env.turn(states, angle)
        if not args.memory:
            return states, ()
        past, mask = data.history_index(episode_first[idx], idx, args.memory)
        past_obs = dataset_obs[:, past]
        if angle is not None:  # the history turned with its state: [b, K, S] -> [N, b, K, O]
            past_obs = env.observe(env.turn(start_states[past], angle[:, None])).permute(2, 0, 1, 3)
        return states, (past_obs, dataset_actions[:, past], mask)

    def amp():
        """bfloat16 autocast of the agents' networks (--bf16); their outputs are cast back to float32."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def model_step(states: torch.Tensor, actions: torch.Tensor) -> tuple:
        """One step of every rollout slot from states [b, S] with the agents' actions [N, b, ...]: the world
        model's, or with --ground-truth-model the simulator's (exact: zero uncertainty, no penalty, no time-out)."""
        if not args.ground_truth_model:
            joint = policies.encode(actions.transpose(0, 1))
            return world_model.step(states, joint, generator, args.state_noise, is_terminal)
        per_agent = actions.transpose(0, 1)
        per_agent = per_agent if env.n_actions is not None else per_agent.clamp(-1, 1)  # as the world model sees them
        next_states, reward, terminal = (
            torch.as_tensor(x, device=device) for x in world_model.step(states.cpu().numpy(), per_agent.cpu().numpy())
        )
        zero = torch.zeros_like(reward)
        return next_states, reward, terminal, zero, zero, zero

    def evaluate() -> tuple[float, float]:
        returns = envs.evaluate(env, policies.act, args.eval_episodes, seed=args.seed, memory=args.memory)
        return float(returns.mean()), data.normalized_score(args.task, returns)

    def save_checkpoint(step: int) -> None:
        """Everything needed to evaluate the agents or to go on training (--resume), written atomically."""
        state = {
            "args": asdict(args),
            "policies": policies.state_dict(),  # state dicts include the normalisation statistics
            "value": value.state_dict(),
            "world_model": str(wm_path),  # the weights are there (cached models are shared between runs)
            "optimizer": optimizer.state_dict(),
            "entropy_alpha": entropy_alpha,
            "step": step,
            "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()},
            "wall_seconds": wall_seconds(),
        }
        data.save_checkpoint(run_dir, state)

    start_step, previous_seconds = 0, 0.0
    if checkpoint is not None:
        policies.load_state_dict(checkpoint["policies"])
        value.load_state_dict(checkpoint["value"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        entropy_alpha.copy_(checkpoint["entropy_alpha"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        start_step, previous_seconds = checkpoint["step"], checkpoint.get("wall_seconds", 0.0)
        if checkpoint["rng"]["generator"].numel() == generator.get_state().numel():
            generator.set_state(checkpoint["rng"]["generator"])
        else:  # saved on the other kind of device (CPU and CUDA generators differ): draw afresh from here
            generator.manual_seed(args.seed + start_step)
            print(f"the saved rollout generator is another device's; reseeded it for {device}", flush=True)
        print(f"resuming {run_dir} at learning step {start_step}", flush=True)
    wall_seconds = lambda: previous_seconds + time.time() - start_time  # noqa: E731, over all sessions of the run

    timed_from, ppo_start = start_step, time.time()  # speed is measured after the first learning step (compilation)
    progress = data.Progress(args.total_steps, start_step)  # a line a minute between evaluations
    with data.stop_requests() as stop:
        for step in range(start_step + 1, args.total_steps + 1):
            if args.anneal_lr:
                for group, base in zip(optimizer.param_groups, base_learning_rates):
                    group["lr"] = base * (1 - (step - 1) / args.total_steps)
            # -- synthetic rollouts through the world model, then their values and advantages --
            rollout, past, next_past = synthetic_rollouts(env, policies, model_step, sample_starts, args)
            with torch.no_grad():
                obs = env.observe(rollout["states"]).permute(2, 0, 1, 3).flatten(1, 2)  # [N, k * b, O]
                next_obs = env.observe(rollout["next_states"]).permute(2, 0, 1, 3).flatten(1, 2)
                flat_states = rollout["states"].flatten(0, 1)
                with amp():
                    values = value(value_features(policies, value, args.value_memory, obs, past), flat_states).view(k, b)
                    next_features = value_features(policies, value, args.value_memory, next_obs, next_past)
                    next_values = value(next_features, rollout["next_states"].flatten(0, 1)).view(k, b)
                values, next_values = values.clamp(value_low, value_high), next_values.clamp(value_low, value_high)
                returns, advantages = timeout_aware_gae(
                    rollout["rewards"], values, next_values, rollout["masks"], rollout["timeout_masks"], args.gamma, args.gae_lambda
                )

            # -- MAPPO update on the k * b synthetic transitions --
            flat_actions = rollout["actions"].transpose(0, 1).flatten(1, 2)  # [N, k*b, ...]
            flat_log_probs = rollout["log_probs"].transpose(0, 1).flatten(1, 2)  # [N, k*b, D]
            flat_returns, flat_advantages = returns.flatten(), advantages.flatten()
            flat_advantages = (flat_advantages - flat_advantages.mean()) / (flat_advantages.std() + 1e-8)
            for _ in range(args.epochs):
                for idx in torch.randperm(k * b, device=device, generator=generator).split(args.minibatch_size):
                    actions = flat_actions[:, idx]
                    mb_obs, mb_past = obs[:, idx], tuple(x[idx] if x.dim() == 2 else x[:, idx] for x in past)
                    with amp():
                        features = policies.features(mb_obs, *mb_past)
                        log_probs = policies.log_prob_dims(policies.distribution(features), actions)  # [N, mb, D]
                        mb_value_features = value_features(policies, value, args.value_memory, mb_obs, mb_past, features)
                        predicted_values = value(mb_value_features, flat_states[idx])
                    ratio = (log_probs - flat_log_probs[:, idx]).sum(-1).exp()  # one ratio per agent: [N, mb]
                    clipped_ratio = ratio.clamp(1 - args.clip, 1 + args.clip)
                    adv = flat_advantages[idx]
                    policy_loss = -torch.min(ratio * adv, clipped_ratio * adv).mean(1).sum()
                    # appendix A: entropy estimated as E_old[-ratio * log pi_new] per action dimension,
                    # clipped like the objective; its temperature follows a dual update towards the target
                    entropy = torch.min(
                        -(ratio[..., None] * log_probs).mean(1), -(clipped_ratio[..., None] * log_probs).mean(1)
                    )  # [N, D]
                    entropy_alpha += args.entropy_lr * (args.entropy_target - entropy.detach())
                    entropy_alpha.clamp_(min=0.0)
                    entropy_bonus = -(entropy * entropy_alpha).sum()
                    # appendix A: squared excess over the action bounds, ratio-weighted like the objective
                    bound_error = policies.bound_error(actions)  # [N, mb]
                    bound_penalty = torch.max((ratio * bound_error).mean(1), (clipped_ratio * bound_error).mean(1)).sum()
                    value_loss = ((predicted_values - flat_returns[idx]) ** 2).mean()
                    loss = policy_loss + args.critic_coef * value_loss + entropy_bonus + args.action_penalty * bound_penalty
                    optimizer.zero_grad()
                    loss.backward()
                    for params in clip_groups:
                        nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()

            writer.add_scalar("losses/policy_loss", policy_loss.item(), step)
            writer.add_scalar("losses/value_loss", value_loss.item(), step)
            writer.add_scalar("losses/entropy", entropy.mean().item(), step)
            writer.add_scalar("losses/entropy_alpha", entropy_alpha.mean().item(), step)
            writer.add_scalar("charts/synthetic_reward", rollout["rewards"].mean().item(), step)
            writer.add_scalar("charts/timeout_rate", 1 - rollout["timeout_masks"][:-1].mean().item(), step)
            writer.add_scalar("charts/terminal_rate", 1 - rollout["masks"].mean().item(), step)  # episodes ended
            progress(step, synthetic_reward=rollout["rewards"].mean(), timeout_rate=1 - rollout["timeout_masks"][:-1].mean())
            if step == start_step + 1 < args.total_steps:
                timed_from, ppo_start = step, time.time()
            else:
                writer.add_scalar("charts/SPS", int((step - timed_from) * k * b / (time.time() - ppo_start)), step)
            if args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
                ret, score = evaluate()
                writer.add_scalar("eval/return", ret, step)
                writer.add_scalar("eval/normalized_score", score, step)
                print(f"step {step}: return {ret:.2f}, normalized score {score:.3f}", flush=True)
            if stop or step % args.save_every == 0:
                save_checkpoint(step)
            if stop:
                writer.close()
                raise data.Stopped(f"stopped at learning step {step}; go on with: python algos/moma_ppo.py --resume {run_dir}")

    ppo_end = time.time()
    ret, score = evaluate()
    writer.add_scalar("eval/return", ret, args.total_steps)
    writer.add_scalar("eval/normalized_score", score, args.total_steps)
    writer.close()
    save_checkpoint(args.total_steps)
    result = {
        "task": args.task, "obs": env.obs_setting, "dataset": args.dataset, "algo": "moma_ppo", "seed": args.seed,
        "normalized_score": score, "return": ret, "eval_episodes": args.eval_episodes,
        "total_steps": args.total_steps, "wall_seconds": wall_seconds(), "device": str(device),
        "world_model": str(wm_path), "synthetic_per_second": (args.total_steps - timed_from) * k * b / (ppo_end - ppo_start),
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
