"""Does a MOMA-PPO ant run know which way to face? Its value, world model and agents at turned dataset states.

    python benchmark/heading_probe.py runs/ant-po-medium__moma_ppo__0__<time>

Ant's reward is the torso's velocity along x, while its dynamics do not depend on the heading: a state
turned about the vertical axis (orientation and velocity turned together) has the same future, turned.
`--starts` dataset states (with their histories under partial observability) are turned by each of
`--angles`, and for each band of start heading the probe prints:
- the simulator's reward for the dataset's action: what facing that way pays in one step;
- the run's world model's mean reward and median eps_g: does it know, and how unsure is it off the
  data's headings (the penalty is lambda_g eps_g per step);
- the change of the run's value V: does the critic rank headings as the rewards do;
- how much each agent's greedy action changes: under PO only agent 0 sees the torso, so only it can steer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import envs  # noqa: E402
from algos import moma_ppo  # noqa: E402
from benchmark.rollout_diagnosis import load_agents  # noqa: E402

BANDS = [(-0.9, -0.5), (-0.5, -0.15), (-0.15, 0.15)]  # start headings (rad); ant-medium's median is -0.37


@dataclass
class Args:
    run: tyro.conf.Positional[str]
    """a MOMA-PPO ant run folder (or its model.pt)"""
    starts: int = 3000
    """dataset states to turn"""
    angles: list[float] = field(default_factory=lambda: [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0])
    """turns about the vertical axis (rad, counter-clockwise seen from above)"""
    seed: int = 0
    """seed of the start states"""
    threads: int | None = 1
    """torch CPU threads (None: torch's choice)"""


@torch.no_grad()
def main(args: Args) -> dict[float, dict[str, torch.Tensor]]:
    """Prints the probe; returns each turn's per-state figures (for tests)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    run_args, _, checkpoint = data.resume(moma_ppo.Args(resume=args.run))
    if run_args.task != "ant":
        raise envs.UserInputError(f"the heading probe is for ant runs, not {run_args.task}")
    env = envs.make(run_args.task, run_args.obs)
    dataset = data.load(env, run_args.dataset)
    n = env.n_agents
    policies, world_model = load_agents(run_args, checkpoint, env)
    value_memory = None
    if run_args.memory and run_args.value_memory == "separate":
        value_memory = moma_ppo.Memory(n, policies.token_dim, run_args.memory, run_args.memory_dim)
    zeros = np.zeros(env.state_dim)
    value = moma_ppo.MixedValue(n, policies.feature_dim, env.state_dim, run_args.hidden, zeros, zeros + 1, value_memory)
    value.load_state_dict(checkpoint["value"])

    generator = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(len(dataset), (args.starts,), generator=generator)
    states = torch.as_tensor(dataset.states, dtype=torch.float32)
    start_states, actions = states[starts], torch.as_tensor(dataset.actions, dtype=torch.float32)[starts].clamp(-1, 1)
    history = None
    if run_args.memory:  # the start states' dataset histories, turned with them
        rows, mask = data.history_index(torch.as_tensor(dataset.episode_first())[starts], starts, run_args.memory)
        history = (states[rows], torch.as_tensor(dataset.actions).transpose(0, 1)[:, rows], mask)
    simulators = envs.Simulators("ant", args.starts, seed=args.seed)

    results = {}  # angle -> per-state figures
    for angle in args.angles:
        turned = env.turn(start_states, angle)
        obs = env.observe(turned).transpose(0, 1)  # [N, B, O]
        past = ()
        if history is not None:
            past_states, past_actions, mask = history
            past_obs = env.observe(env.turn(past_states, angle)).permute(2, 0, 1, 3)  # [B, K, N, O] -> [N, B, K, O]
            past = (past_obs, past_actions, mask)
        features = policies.features(obs, *past)
        value_features = moma_ppo.value_features(policies, value, run_args.value_memory, obs, past, features)
        _, sim_reward, _ = simulators.step(turned.numpy(), actions.numpy())
        figures = {
            "heading": env.heading(turned),
            "sim": torch.as_tensor(sim_reward, dtype=torch.float32),
            "value": value(value_features, turned),
            "action": policies.greedy(policies.distribution(features)),  # [N, B, A]
        }
        if world_model is not None:
            _, model_reward, _, _, eps_g, _ = world_model.step(turned, actions.flatten(1), generator, 0.0)
            figures |= {"model": model_reward, "eps_g": eps_g}
        results[angle] = figures

    reference = min(args.angles, key=abs)  # each turn's value and actions are compared with this one's
    base, start_heading = results[reference], env.heading(start_states)
    print(f"{Path(args.run).name}: {args.starts} dataset states of {run_args.dataset}, {run_args.obs.upper()}, "
          f"step {checkpoint['step']}; changes against the turn {reference:+.2f}")
    for low, high in BANDS:
        band = (start_heading > low) & (start_heading < high)
        print(f"start heading in ({low:+.2f}, {high:+.2f}) rad: {int(band.sum())} states")
        print("   turn  heading  reward: simulator  model  eps_g(median)  value change  |action change| per agent")
        for angle, f in results.items():
            model = f"{'-':>6}  {'-':>13}"
            if world_model is not None:
                model = f"{f['model'][band].mean():6.2f}  {f['eps_g'][band].median():13.2f}"
            value_change = (f["value"] - base["value"])[band].mean()
            action_change = (f["action"] - base["action"]).abs().mean(-1)[:, band].mean(1)
            print(f"  {angle:+.2f}  {f['heading'][band].mean():+7.2f}  {f['sim'][band].mean():17.2f}  {model}  "
                  f"{value_change:+12.1f}  " + " ".join(f"{x:.3f}" for x in action_change.tolist()))
    return results


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.UserInputError as error:
        sys.exit(f"error: {error}")
