# Multi-Agent Implicit Q-Learning (MAIQL), the CTDE model-free baseline of the paper
# (section 5.1 and Appendix A, equations 1-7).
#
# IQL (Kostrikov et al. 2022) made multi-agent with QMIX value decomposition: every agent has
# its own Q_i(o_i, a_i) and V_i(o_i), and state-conditioned non-negative mixing weights combine
# them into the team's values (eq. 4, 5):
#     Q_tot(s, a) = sum_i w_Q^i(s) Q_i(o_i, a_i) + b_Q(s),    V_tot(s) = sum_i w_V^i(s) V_i(o_i) + b_V(s).
# V_tot learns the `expectile` of the target Q_tot over the dataset's joint actions (eq. 1),
# Q_tot regresses on r + gamma V_tot(s') (eq. 2), and each agent's policy pi_i(a_i | o_i) is
# extracted by advantage-weighted regression with the team's advantage (eq. 3, 6, 7).
# Training is centralised (mixers see the state); execution is decentralised (each agent acts
# greedily on its own observation).
#
# On the coordination game the monotonic mixture cannot represent the reward 1[a_1 = a_2]: its
# best additive fit gives agent i an advantage for `right` of about 2 P_data(a_j = right) - 1,
# so each agent turns towards the other one's majority action. Both go right on `favorable`,
# they swap conventions and miss each other on `unfavorable`, and on `neutral` the outcome of
# each round hangs on the dataset's sampling noise (paper Table 3: 1.0, 0.0, 0.9 +- 0.1).
#
# Differences from the paper: categorical policies (continuous tasks come later); the weights
# and the bias of a mixer come from one 2x256 MLP of the state with N+1 outputs (QMIX uses
# separate hypernetworks); as in CORL's IQL, the advantage and the Q target use V_tot before
# this step's V update, so that the three losses come from one batch
# and are minimised with one backward pass (their parameters are disjoint).
# The agents' networks are one batched network ([agents, in, out] weights).
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
    """environment: coordination"""
    obs: str | None = None
    """observation setting (default: the task's first one; coordination has only `fo`)"""
    dataset: str = "unfavorable"
    """dataset name (coordination: favorable, neutral, unfavorable) or a .npz/.hdf5 file"""
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
    """Adam learning rate of the Q, V and policy networks (mixers included)"""
    hidden: int | None = None
    """units in each of the two hidden layers of every network (agents' networks and mixers) (default: per task; paper 256)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak coefficient of the target Q networks (agents' Q and their mixer)"""
    expectile: float = 0.7
    """expectile of the target Q_tot that V_tot regresses to (0.5: the mean, i.e. SARSA)"""
    beta: float = 3.0
    """AWR inverse temperature: the policies imitate the data with weights exp(beta * team advantage)"""
    max_weight: float = 100.0
    """upper clip of the AWR weights exp(beta * team advantage)"""
    max_grad_norm: float = 1.0
    """gradient norm clip, applied to each of Q (with its mixer), V (with its mixer) and the policies"""


# Defaults that depend on the task, used for every field left at None.
TASK_DEFAULTS = {
    # coordination: the unfavorable runs pass through a transient (agents switching convention at
    # different times, steps 300-700) before they settle; on neutral the per-round effects are
    # tiny (dataset sampling noise) and take about 2500 steps to resolve. 64 units as in every
    # script on this task (two actions, a 1-d observation); ~6 ms a step on one CPU thread.
    "coordination": dict(total_steps=3000, eval_every=0, hidden=64),
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
        out = self.net(states)  # [B, N + 1]
        return (out[:, :-1].abs().T * values).sum(0) + out[:, -1]


class MixedQ(nn.Module):
    """Q_tot(s, a) = sum_i w_Q^i(s) Q_i(o_i, a_i) + b_Q(s); each Q_i outputs one value per action."""

    def __init__(self, n_agents: int, obs_dim: int, state_dim: int, n_actions: int, hidden: int):
        super().__init__()
        self.agents = agent_mlp(n_agents, obs_dim, hidden, n_actions)
        self.mixer = Mixer(state_dim, n_agents, hidden)

    def forward(self, obs: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs [N, B, O], states [B, S] (normalised), actions [N, B] -> Q_tot [B]."""
        q = self.agents(obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # [N, B]
        return self.mixer(states, q)


class MixedV(nn.Module):
    """V_tot(s) = sum_i w_V^i(s) V_i(o_i) + b_V(s)."""

    def __init__(self, n_agents: int, obs_dim: int, state_dim: int, hidden: int):
        super().__init__()
        self.agents = agent_mlp(n_agents, obs_dim, hidden, 1)
        self.mixer = Mixer(state_dim, n_agents, hidden)

    def forward(self, obs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """obs [N, B, O], states [B, S] (normalised) -> V_tot [B]."""
        return self.mixer(states, self.agents(obs).squeeze(-1))


class CategoricalHead:
    """Categorical actions over `n` choices, parametrised by n logits. The policies' swappable part:
    a Gaussian head for continuous tasks would provide the same three members."""

    def __init__(self, n: int):
        self.n_params = n

    def log_prob(self, logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


class Policies(nn.Module):
    """All agents' decentralised policies pi_i(a_i | o_i) as one batched network."""

    def __init__(self, n_agents: int, obs_dim: int, head: CategoricalHead, hidden: int, obs_mean, obs_std):
        super().__init__()
        self.head = head
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean).unsqueeze(1))  # [N, 1, O], for `act` (training
        self.register_buffer("obs_std", torch.as_tensor(obs_std).unsqueeze(1))  # batches are normalised up front)
        self.net = agent_mlp(n_agents, obs_dim, hidden, head.n_params)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Log-likelihoods [N, B] of the agents' actions [N, B] given their normalised observations [N, B, O]."""
        return self.head.log_prob(self.net(obs), actions)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions of the N agents from their raw observations [N, O]."""
        obs = (torch.as_tensor(obs, device=self.obs_mean.device).unsqueeze(1) - self.obs_mean) / self.obs_std
        return self.head.greedy(self.net(obs)).squeeze(1).cpu().numpy()


def main(args: Args) -> dict:
    for key, value in TASK_DEFAULTS.get(args.task, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    start_time = time.time()
    env = envs.make(args.task, args.obs)
    dataset = data.load(env, args.dataset)
    if env.n_actions is None:
        raise envs.UserInputError(f"maiql.py supports categorical actions only so far; task '{args.task}' is continuous")
    run_name = f"{args.task}-{env.obs_setting}-{Path(args.dataset).stem}__maiql__{args.seed}__{int(start_time)}"
    run_dir = Path(args.runs_dir) / run_name
    writer = SummaryWriter(str(run_dir))
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
    actions = torch.as_tensor(dataset.actions, device=device).transpose(0, 1)  # [N, T]
    rewards = torch.as_tensor(dataset.rewards, device=device)
    not_done = 1.0 - torch.as_tensor(dataset.terminals, dtype=torch.float32, device=device)

    n, o, s_dim = env.n_agents, env.obs_dim, env.state_dim
    qf = MixedQ(n, o, s_dim, env.n_actions, args.hidden).to(device)
    qf_target = MixedQ(n, o, s_dim, env.n_actions, args.hidden).to(device)
    qf_target.load_state_dict(qf.state_dict())
    qf_target.requires_grad_(False)
    vf = MixedV(n, o, s_dim, args.hidden).to(device)
    policy = Policies(n, o, CategoricalHead(env.n_actions), args.hidden, obs_mean, obs_std).to(device)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=args.learning_rate, fused=True)
    v_optimizer = torch.optim.Adam(vf.parameters(), lr=args.learning_rate, fused=True)
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=True)
    optimizers = {"q": (q_optimizer, qf), "v": (v_optimizer, vf), "policy": (policy_optimizer, policy)}

    def evaluate() -> tuple[float, float]:
        returns = envs.evaluate(env, policy.act, args.eval_episodes, seed=args.seed)
        return float(returns.mean()), data.normalized_score(args.task, returns)

    print(f"{run_name}: {len(dataset)} transitions, {args.total_steps} steps on {device}", flush=True)
    for step in range(1, args.total_steps + 1):
        idx = torch.randint(len(dataset), (args.batch_size,), device=device)
        o, s, a = observations[:, idx], states[idx], actions[:, idx]
        with torch.no_grad():
            target_q = qf_target(o, s, a)  # [B], Q_hat_tot(s, a) of eq. 5
            next_v = vf(next_observations[:, idx], next_states[idx])
            q_backup = rewards[idx] + args.gamma * not_done[idx] * next_v

        # V: expectile regression of V_tot on the target Q_tot of the dataset's joint actions (eq. 1)
        v = vf(o, s)
        diff = target_q - v
        v_loss = (torch.abs(args.expectile - (diff < 0).float()) * diff.square()).mean()
        # Q: Q_tot regresses on r + gamma V_tot(s') (eq. 2)
        q = qf(o, s, a)
        q_loss = (q - q_backup).square().mean()
        # Policies: AWR with the team advantage (eq. 3 with the factored policy of eq. 6). The weight
        # exp(beta (Q_hat_tot - V_tot)) = B(s) prod_i exp(beta (w_hat_Q^i Q_hat_i - w_V^i V_i)) with
        # B(s) = exp(beta (b_hat_Q(s) - b_V(s))): this is eq. 7 (whose B(s) omits the beta).
        weights = torch.exp(args.beta * diff.detach()).clamp(max=args.max_weight)
        policy_loss = -(weights * policy.log_prob(o, a).sum(0)).mean()

        for optimizer, _ in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        (v_loss + q_loss + policy_loss).backward()  # disjoint parameters: the same as three backward passes
        for optimizer, net in optimizers.values():
            nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm, foreach=True)
            optimizer.step()
        with torch.no_grad():
            for p, p_target in zip(qf.parameters(), qf_target.parameters()):
                p_target.lerp_(p, args.tau)

        if step % 100 == 0:
            writer.add_scalar("losses/q_loss", q_loss.item(), step)
            writer.add_scalar("losses/v_loss", v_loss.item(), step)
            writer.add_scalar("losses/policy_loss", policy_loss.item(), step)
            writer.add_scalar("losses/q_values", q.mean().item(), step)
            writer.add_scalar("losses/v_values", v.mean().item(), step)
            writer.add_scalar("losses/advantage", diff.mean().item(), step)
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
            "qf": qf.state_dict(),
            "qf_target": qf_target.state_dict(),
            "vf": vf.state_dict(),
            "policy": policy.state_dict(),  # includes the observation normalisation statistics
            "q_optimizer": q_optimizer.state_dict(),
            "v_optimizer": v_optimizer.state_dict(),
            "policy_optimizer": policy_optimizer.state_dict(),
            "obs_mean": torch.as_tensor(obs_mean),  # tensors, so that torch.load(weights_only=True) works
            "obs_std": torch.as_tensor(obs_std),
            "state_mean": torch.as_tensor(state_mean),
            "state_std": torch.as_tensor(state_std),
            "step": args.total_steps,
            "rng": torch.get_rng_state(),  # the only generator the training draws from
        },
        run_dir / "model.pt",
    )
    result = {
        "task": args.task, "obs": env.obs_setting, "dataset": args.dataset, "algo": "maiql", "seed": args.seed,
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
