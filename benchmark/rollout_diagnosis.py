"""Where a MOMA-PPO policy's score is lost: in the world model, or over the long run in the simulator.

    python benchmark/rollout_diagnosis.py runs/ant-po-medium__moma_ppo__0__<time>

From `--starts` dataset states (with their dataset histories under partial observability, as in
training) the run's greedy agents act for:
1. `--model-steps` steps in the run's world model and, from the same states, in the simulator:
   the mean reward per step of each (does the model credit what the simulator pays?) and the share
   of rollouts a terminal state ended (does the model end them where the simulator does?);
2. `--sim-steps` steps in the simulator: the share ended, the mean reward per step every 10 steps and, on ant, how
   far the torso has turned from its start heading (mean |change of yaw|), since ant's reward is
   the velocity along x; on reacher, where the fingertip ends and whether the two agents end on the same
   inverse-kinematics solution (benchmark/episode_stats.py's test of their bend convention).

Under partial observability `--history empty` starts the agents with nothing remembered, as in an
evaluation episode, and `--history shuffled` with the history of another start state: if the team
took its convention from the dataset history it starts with, these would change it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import envs  # noqa: E402
from algos import moma_ppo  # noqa: E402
from benchmark.episode_stats import convention_report, reacher_links  # noqa: E402

History = Literal["dataset", "empty", "shuffled"]


@dataclass
class Args:
    run: tyro.conf.Positional[str]
    """a MOMA-PPO run folder (or its model.pt)"""
    starts: int = 500
    """dataset states to start from"""
    model_steps: int = 10
    """steps of the model-vs-simulator comparison (training's rollout length by default)"""
    sim_steps: int = 200
    """steps of the long simulator rollouts"""
    seed: int = 0
    """seed of the start states and of the world model's sampling"""
    history: History = "dataset"
    """with memory, what the agents remember at the start: dataset (their start state's history, as in
    training), empty (nothing, as at an evaluation episode's start) or shuffled (another start state's)"""
    threads: int | None = 1
    """torch CPU threads (None: torch's choice)"""


def load_agents(run_args, checkpoint, env) -> tuple:
    """A MOMA-PPO run's policies (their normalisation statistics come with the weights) and its world model (None
    for a run trained in the real simulator, --ground-truth-model), on the CPU."""
    n, o = env.n_agents, env.obs_dim
    policies = moma_ppo.GaussianPolicies(env, run_args.hidden, np.zeros((n, o)), np.ones((n, o)), run_args.memory, run_args.memory_dim, run_args.log_std_init)
    policies.load_state_dict(checkpoint["policies"])
    world_model = None
    if not run_args.ground_truth_model:
        world_model = moma_ppo.load_world_model(checkpoint["world_model"], env.state_dim, n * env.act_dim, torch.device("cpu"))
    return policies, world_model


def main(args: Args) -> None:
    if args.history not in get_args(History):  # tyro checks the command line; this, Args made in code
        raise envs.UserInputError(f"unknown --history '{args.history}'; choose {', '.join(get_args(History))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_args, _, checkpoint = data.resume(moma_ppo.Args(resume=args.run))
    env = envs.make(run_args.task, run_args.obs)
    if env.n_actions is not None:
        raise envs.UserInputError("the diagnosis is for the MuJoCo tasks (reacher, ant)")
    dataset = data.load(env, run_args.dataset)
    policies, world_model = load_agents(run_args, checkpoint, env)  # no world model to compare: trained in the simulator

    generator = torch.Generator().manual_seed(args.seed)
    is_terminal = moma_ppo.terminal_test(run_args.terminal, env, dataset.terminals)  # as training ends rollouts
    starts = torch.randint(len(dataset), (args.starts,), generator=generator)
    start_states = torch.as_tensor(dataset.states)[starts]
    start_past = ()
    if run_args.memory:
        rows, mask = data.history_index(torch.as_tensor(dataset.episode_first())[starts], starts, run_args.memory)
        start_past = tuple(torch.as_tensor(x).transpose(0, 1)[:, rows] for x in (dataset.observations, dataset.actions)) + (mask,)
        if args.history == "empty":
            start_past = (*start_past[:2], torch.zeros_like(mask))
        elif args.history == "shuffled":
            other = torch.randperm(args.starts, generator=generator)
            start_past = (start_past[0][:, other], start_past[1][:, other], mask[other])
    simulators = envs.Simulators(run_args.task, args.starts, seed=args.seed)

    @torch.no_grad()
    def rollout(steps: int, in_model: bool) -> tuple[list[float], list[float], float, float, torch.Tensor]:
        """Mean reward per step over the rollouts still alive, the mean |yaw change| (ant), the share
        of rollouts that a terminal state ended, the share the members' vote would have ended (in the
        model; what ends them where the run's test is another) and the final states."""
        states, past, alive = start_states.clone(), start_past, torch.ones(args.starts)
        voted = torch.zeros(args.starts, dtype=torch.bool)
        rewards, turns = [], []
        for _ in range(steps):
            obs = env.observe(states).transpose(0, 1)  # [N, B, O]
            actions = policies.distribution(policies.features(obs, *past)).mean
            if in_model:
                joint = policies.encode(actions.transpose(0, 1))
                voted |= world_model.terminal_vote(states, joint) & (alive > 0)
                next_states, reward, terminal, *_ = world_model.step(states, joint, generator, run_args.state_noise, is_terminal)
            else:
                joint = actions.transpose(0, 1).clamp(-1, 1).numpy()
                next_states, reward, terminal = (torch.as_tensor(x) for x in simulators.step(states.numpy(), joint))
            rewards.append(((reward * alive).sum() / alive.sum().clamp(min=1)).item())
            alive = alive * (1 - terminal.float())
            past = moma_ppo.extend_history(past, obs, actions)
            states = next_states.float()
            if run_args.task == "ant":
                turns.append(((env.heading(states) - env.heading(start_states) + np.pi) % (2 * np.pi) - np.pi).abs().mean().item())
        return rewards, turns, 1 - alive.mean().item(), voted.float().mean().item(), states

    print(f"{Path(args.run).name}: {args.starts} starts, greedy agents")
    if world_model is None:
        print("trained in the real simulator (--ground-truth-model): no world model to compare with it")
    else:
        model_rewards, _, model_ended, model_voted, _ = rollout(args.model_steps, in_model=True)
        sim_rewards, _, sim_ended, _, _ = rollout(args.model_steps, in_model=False)
        print(f"reward per step over {args.model_steps} steps: world model {np.mean(model_rewards):.3f}, simulator {np.mean(sim_rewards):.3f}")
        print("  model:    ", " ".join(f"{r:.3f}" for r in model_rewards))
        print("  simulator:", " ".join(f"{r:.3f}" for r in sim_rewards))
        test = "vote" if is_terminal is None else "none in the dataset" if run_args.terminal == "learned" else "rule"
        print(f"ended by a terminal state within {args.model_steps} steps: world model {model_ended:.1%} (terminals: {test}; "
              f"the members' vote would end {model_voted:.1%}), simulator {sim_ended:.1%}")
    long_rewards, turns, long_ended, _, final = rollout(args.sim_steps, in_model=False)
    print(f"simulator, {args.sim_steps} steps ({long_ended:.1%} ended by a terminal state), reward per step from step t "
          "(t: mean over the next 10):")
    print("  " + " ".join(f"{t}:{np.mean(long_rewards[t:t + 10]):.3f}" for t in range(0, args.sim_steps, 10)))
    if turns:
        print("  mean |yaw change| (rad) after t steps: " + " ".join(f"{t}:{turns[t - 1]:.2f}" for t in range(20, args.sim_steps + 1, 20)))
    if run_args.task == "reacher":  # the state: cos q, sin q, target, joint velocities, fingertip - target
        final, links = final.numpy(), reacher_links(simulators.envs[0].env.unwrapped.model)
        report = convention_report(final[:, 4:6], np.arctan2(final[:, 2:4], final[:, 0:2]), links)
        distance = np.linalg.norm(final[:, 8:10], axis=1)
        print(f"  after {args.sim_steps} steps: fingertip {100 * distance.mean():.1f} cm from the target on average "
              f"(median {100 * np.median(distance):.1f}), the agents nearest the same inverse-kinematics solution in "
              f"{report['agree'].mean():.0%} of rollouts, the elbow bent + in {np.mean(final[:, 3] > 0):.0%}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.UserInputError as error:
        sys.exit(f"error: {error}")
