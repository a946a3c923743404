# Centralized Implicit Q-Learning (IQL, Kostrikov et al. 2022), the centralized-execution
# upper bound of the paper (section 5.1, Table 3 "IQL").
#
# One single agent sees the global state and picks the JOINT action of the team, so there is
# no strategy agreement problem to solve: any greedy joint action is coordinated by
# construction. IQL learns V(s) as the `expectile` of the target Q(s, a) over the dataset's
# actions (eq. 1 of Appendix A), Q(s, a) by SARSA-style regression on r + gamma V(s') (eq. 2),
# and extracts the policy by advantage-weighted regression (AWR, eq. 3).
#
# Categorical actions (coordination): the joint action is one of n_actions ** n_agents
# combinations, indexed by the mixed-radix number whose digit i (weight n_actions ** i) is agent
# i's action; the Q network outputs one value per joint action and the policy is categorical
# over them.
#
# Continuous actions (reacher, ant): the joint action is the simulator's action vector, the
# agents' actions put together by env.join_actions (N * act_dim values in [-1, 1]); it is an
# input of the Q networks beside the state, and the policy is a Gaussian over it with mean
# tanh(MLP(s)). Evaluation acts with the mean and hands each agent its part (env.split_actions).
#
# Differences from the paper / the official implementation: the paper describes tanh-squashed
# Gaussians with a state-dependent variance; we follow the official code instead (tanh on the
# mean only, a learned log std that does not depend on the state, clamped to [-5, 2]) but
# without its cosine decay of the policy's learning rate; as in CORL's IQL, the advantage and
# the Q target use V before this step's V update (the official code updates V first), so that
# the three losses come from one batch and are minimised with one backward pass (their
# parameters are disjoint).
# On MuJoCo the training steps run under bfloat16 autocast (--bf16; the layers return float32) where
# the hardware has native bfloat16 (float32 elsewhere): 2-3x faster on CPUs with AMX, at the cost of
# bfloat16 rounding inside the matmuls.
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
    leader-only; ant: fo, po); unused by the centralized agent, which sees the global state, but part of the run name"""
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
    """episodes per evaluation (greedy joint actions: the most likely one, or the Gaussian's mean)"""
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
    """Adam learning rate of the Q, V and policy networks (the Gaussian's log std included)"""
    hidden: PerTask[int] = None
    """units in each of the two hidden layers of every network (default: per task; paper 256)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak coefficient of the target Q networks"""
    expectile: float = 0.7
    """expectile of the target Q that V regresses to (0.5: the mean, i.e. SARSA)"""
    beta: float = 3.0
    """AWR inverse temperature: the policy imitates the data with weights exp(beta * advantage)"""
    max_weight: float = 100.0
    """upper clip of the AWR weights exp(beta * advantage)"""
    max_grad_norm: float = 1.0
    """gradient norm clip, applied to each network (Q, V, policy) separately"""
    bf16: PerTask[bool] = None
    """run the training steps' matmuls under bfloat16 autocast: about 2.7x faster on CPUs with AMX (and on
    recent GPUs); the layers return float32, so losses, targets and evaluation stay float32 (default: per
    task: on for MuJoCo, off for the coordination game; off, with a note, where the hardware has no native
    bfloat16 matmuls, as there it is slower than float32)"""


# Defaults that depend on the task, used for every field left at None.
TASK_DEFAULTS = {
    # coordination: every seed and dataset has converged to 1.0 by step 200; 600 leaves margin.
    # 64 units as in every script on this task (two actions, a 1-d state).
    "coordination": dict(dataset="unfavorable", total_steps=600, eval_every=0, hidden=64, bf16=False),
    # MuJoCo: the paper's 1e6 steps and 2x256 networks
    "reacher": dict(dataset="expert-mix", total_steps=1_000_000, eval_every=50_000, hidden=256, bf16=True),
    "ant": dict(dataset="medium", total_steps=1_000_000, eval_every=50_000, hidden=256, bf16=True),
}
MAX_JOINT_ACTIONS = 4096  # categorical actions: the Q network has one output per joint action
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # continuous actions: the Gaussian's log std range, as in the official IQL


class BatchedLinear(nn.Module):
    """Several independent linear layers applied as one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, members: int, fan_in: int, fan_out: int):
        super().__init__()
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default initialisation, for each member
        self.weight = nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight).float()  # float32 outside the matmul under --bf16


def mlp(fan_in: int, hidden: int, fan_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(fan_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, fan_out))


class TwinQ(nn.Module):
    """Two Q networks as one batched network. Categorical actions (`n_joint` of them): normalised states
    [B, S] -> Q of every joint action [2, B, J]; continuous ones (`n_joint` None): states and joint actions
    [B, S + joint_dim] -> [2, B, 1]."""

    def __init__(self, state_dim: int, n_joint: int | None, joint_dim: int, hidden: int):
        super().__init__()
        self.categorical = n_joint is not None
        fan_in, fan_out = (state_dim, n_joint) if self.categorical else (state_dim + joint_dim, 1)
        self.net = nn.Sequential(
            BatchedLinear(2, fan_in, hidden), nn.ReLU(),
            BatchedLinear(2, hidden, hidden), nn.ReLU(),
            BatchedLinear(2, hidden, fan_out),
        )  # fmt: skip

    def forward(self, states: torch.Tensor, joint_actions: torch.Tensor) -> torch.Tensor:
        """Q-values [2, B] of the joint actions ([B] indices or [B, joint_dim]) taken in the states [B, S]."""
        if self.categorical:
            q = self.net(states.expand(2, *states.shape))
            return q.gather(-1, joint_actions.expand(2, -1).unsqueeze(-1)).squeeze(-1)
        x = torch.cat([states, joint_actions], -1)
        return self.net(x.expand(2, *x.shape)).squeeze(-1)


class CategoricalHead:
    """Categorical actions over `n` choices, parametrised by n logits. The policy's swappable part:
    GaussianHead provides the same three members for continuous actions."""

    def __init__(self, n: int):
        self.n_params = n

    def log_prob(self, logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


class GaussianHead(nn.Module):
    """Continuous actions in [-1, 1]^n: a Gaussian with mean tanh(params) over n params and a learned
    log std that does not depend on the state (a module, as it owns that parameter)."""

    def __init__(self, n: int):
        super().__init__()
        self.n_params = n
        self.log_std = nn.Parameter(torch.zeros(n))

    def log_prob(self, params: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        z = (actions - torch.tanh(params)) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std).sum(-1) - 0.5 * self.n_params * math.log(2 * math.pi)

    def greedy(self, params: torch.Tensor) -> torch.Tensor:
        return torch.tanh(params)


class Policy(nn.Module):
    """Centralized policy: global states [B, S] -> parameters of the joint-action distribution."""

    def __init__(self, state_dim: int, head: CategoricalHead | GaussianHead, hidden: int, state_mean, state_std):
        super().__init__()
        self.head = head
        self.register_buffer("state_mean", torch.as_tensor(state_mean))  # [S], for `act` (training batches
        self.register_buffer("state_std", torch.as_tensor(state_std))  # are normalised once, up front)
        self.net = mlp(state_dim, hidden, head.n_params)

    def log_prob(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Log-likelihood [B] of the actions taken in the normalised states [B, S]."""
        return self.head.log_prob(self.net(states).float(), actions)  # float32 under --bf16

    @torch.no_grad()
    def act(self, states: np.ndarray) -> np.ndarray:
        """Greedy joint actions of raw global states [E, S]: their indices [E], or the simulator's action vectors [E, joint_dim]."""
        states = (torch.as_tensor(states, device=self.state_mean.device) - self.state_mean) / self.state_std
        return self.head.greedy(self.net(states)).cpu().numpy()


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
    n_joint = env.n_actions**env.n_agents if categorical else None  # joint actions to choose from
    joint_dim = env.n_agents * env.act_dim  # continuous actions: the simulator's action vector
    if categorical and n_joint > MAX_JOINT_ACTIONS:
        raise envs.UserInputError(
            f"task '{args.task}' has {n_joint} joint actions ({env.n_actions} per agent, {env.n_agents} agents); "
            f"iql_central.py enumerates them and handles at most {MAX_JOINT_ACTIONS}"
        )
    run_name = f"{args.task}-{env.obs_setting}-{Path(args.dataset).stem}__iql_central__{args.seed}__{int(start_time)}"
    if checkpoint is None:
        run_dir = data.new_run_dir(args.runs_dir, run_name)
    writer = SummaryWriter(str(run_dir))  # a resumed run appends to its own logs
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    # The whole dataset on the device, states normalised once here rather than in every step.
    state_mean, state_std = dataset.stats("states")
    states = torch.as_tensor((dataset.states - state_mean) / state_std, device=device)
    next_states = torch.as_tensor((dataset.next_states - state_mean) / state_std, device=device)
    if categorical:
        radix = env.n_actions ** torch.arange(env.n_agents, device=device)  # agent i's digit has weight n_actions**i
        joint_actions = (torch.as_tensor(dataset.actions, device=device) * radix).sum(-1)  # [T]
        head = CategoricalHead(n_joint)
    else:  # back to the simulator's action vectors, the order the policy acts in
        joint_actions = torch.as_tensor(env.join_actions(dataset.actions), device=device)  # [T, joint_dim]
        head = GaussianHead(joint_dim)
    rewards = torch.as_tensor(dataset.rewards, device=device)
    not_done = 1.0 - torch.as_tensor(dataset.terminals, dtype=torch.float32, device=device)

    qf = TwinQ(env.state_dim, n_joint, joint_dim, args.hidden).to(device)
    qf_target = TwinQ(env.state_dim, n_joint, joint_dim, args.hidden).to(device)
    qf_target.load_state_dict(qf.state_dict())
    qf_target.requires_grad_(False)
    vf = mlp(env.state_dim, args.hidden, 1).to(device)
    policy = Policy(env.state_dim, head, args.hidden, state_mean, state_std).to(device)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=args.learning_rate, fused=True)
    v_optimizer = torch.optim.Adam(vf.parameters(), lr=args.learning_rate, fused=True)
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=True)
    optimizers = {"q": (q_optimizer, qf), "v": (v_optimizer, vf), "policy": (policy_optimizer, policy)}

    radix_np = radix.cpu().numpy() if categorical else None

    def act(states: np.ndarray) -> np.ndarray:
        # Centralized execution, the point of this baseline: one controller reads the global states
        # [E, S] of the E episodes (envs.evaluate's global_state) instead of the agents' observations.
        joint = policy.act(states)
        if categorical:
            return joint[None] // radix_np[:, None] % env.n_actions  # the joint actions' digits, [N, E]
        return env.split_actions(joint).swapaxes(0, 1)  # each agent's part, [N, E, act_dim]

    def evaluate() -> tuple[float, float]:
        returns = envs.evaluate(env, act, args.eval_episodes, seed=args.seed, global_state=True)
        return float(returns.mean()), data.normalized_score(args.task, returns)

    actions_text = f"{n_joint} joint actions" if categorical else f"{joint_dim}-dim joint actions"
    print(f"{run_dir.name}: {len(dataset)} transitions, {actions_text}, {args.total_steps} steps on {device}", flush=True)

    def save_checkpoint(step: int) -> None:
        """Everything needed to evaluate the agents or to go on training (--resume), written atomically."""
        state = {
            "args": asdict(args),
            "qf": qf.state_dict(),
            "qf_target": qf_target.state_dict(),
            "vf": vf.state_dict(),
            "policy": policy.state_dict(),  # includes the state normalisation statistics
            "q_optimizer": q_optimizer.state_dict(),
            "v_optimizer": v_optimizer.state_dict(),
            "policy_optimizer": policy_optimizer.state_dict(),
            "state_mean": torch.as_tensor(state_mean),  # tensors, so that torch.load(weights_only=True) works
            "state_std": torch.as_tensor(state_std),
            "step": step,
            "rng": data.rng_state(),  # torch's generators: the only ones the training draws from
            "wall_seconds": wall_seconds(),
        }
        data.save_checkpoint(run_dir, state)

    start_step, previous_seconds = 0, 0.0
    if checkpoint is not None:
        start_step, previous_seconds = data.restore(
            checkpoint, run_dir, qf=qf, qf_target=qf_target, vf=vf, policy=policy, q_optimizer=q_optimizer,
            v_optimizer=v_optimizer, policy_optimizer=policy_optimizer
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
                s, a = states[idx], joint_actions[idx]
                with torch.no_grad():
                    target_q = qf_target(s, a).min(0).values  # [B], the min of the twins as in IQL
                    next_v = vf(next_states[idx]).squeeze(-1).float()
                    q_backup = rewards[idx] + args.gamma * not_done[idx] * next_v

                # V: expectile regression on the target Q of the dataset's joint actions (eq. 1)
                v = vf(s).squeeze(-1).float()
                diff = target_q - v
                v_loss = (torch.abs(args.expectile - (diff < 0).float()) * diff.square()).mean()
                # Q: both twins regress on r + gamma V(s') (eq. 2)
                q = qf(s, a)  # [2, B]
                q_loss = (q - q_backup).square().mean(1).sum()
                # policy: advantage-weighted regression on the dataset's joint actions (eq. 3)
                weights = torch.exp(args.beta * diff.detach()).clamp(max=args.max_weight)
                policy_loss = -(weights * policy.log_prob(s, a)).mean()

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
                progress(step, q_loss=q_loss, v_loss=v_loss, q_values=q.mean())
                writer.add_scalar("losses/q_loss", q_loss.item(), step)
                writer.add_scalar("losses/v_loss", v_loss.item(), step)
                writer.add_scalar("losses/policy_loss", policy_loss.item(), step)
                writer.add_scalar("losses/q_values", q.mean().item(), step)
                writer.add_scalar("losses/v_values", v.mean().item(), step)
                writer.add_scalar("losses/advantage", diff.mean().item(), step)
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
                raise data.Stopped(f"stopped at step {step}; go on with: python algos/iql_central.py --resume {run_dir}")

    ret, score = evaluate()
    writer.add_scalar("eval/return", ret, args.total_steps)
    writer.add_scalar("eval/normalized_score", score, args.total_steps)
    writer.close()
    save_checkpoint(args.total_steps)
    result = {
        "task": args.task, "obs": env.obs_setting, "dataset": args.dataset, "algo": "iql_central", "seed": args.seed,
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
