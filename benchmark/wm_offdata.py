"""How well world models predict once the actions leave the data: model against simulator.

    python benchmark/wm_offdata.py runs/world_models/reacher-expert-mix-*.pt --task reacher

A model's holdout error measures it on the dataset's own actions; MOMA-PPO's agents act otherwise,
and they learn from what the model predicts there. From `--starts` dataset states (each with at
least `--horizon` more steps in its episode) the dataset's next actions, plus Gaussian noise of
standard deviation sigma for each of `--sigmas` (clipped to [-1, 1]), are played open loop for
`--horizon` steps in each world model (a uniformly chosen elite's mean prediction, no sampled noise)
and in the simulator from the same states. Printed for each model and sigma: the state error after
1, horizon / 2 and horizon steps (root mean square over dimensions, in units of the dataset's
standard deviation of each), the mean absolute reward error over the rollouts and the mean epistemic
uncertainty eps_g (section 3.1, what MOMA-PPO's penalty charges: does it grow where the error does?), the share
of rollouts that the members' terminal vote would have ended by then (on data without terminals, such as
reacher's, an invented end); on reacher also how far apart the two predicted fingertip-to-target vectors are,
in centimetres. Rollouts that the
simulator ends with a terminal state are left out from that step on. One row per model, sigma
and step goes to `--csv` (default benchmark/results/wm_offdata.csv).
"""

from __future__ import annotations

import csv
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

FIELDS = ["task", "dataset", "world_model", "wm_steps", "holdout_mse_elites", "sigma", "step", "state_error",
          "reward_error", "eps_g", "vote_ended", "tip_error_cm", "alive"]  # fmt: skip


@dataclass
class Args:
    world_models: tyro.conf.Positional[list[str]]
    """world-model files (`runs/world_models/*.pt`, as algos/moma_ppo.py caches them)"""
    task: str = "reacher"
    """reacher or ant: the task the models were trained on"""
    dataset: str = "expert-mix"
    """the dataset the models were trained on, whose states and actions start the rollouts"""
    starts: int = 1000
    """dataset states to start from"""
    horizon: int = 10
    """steps per rollout (MOMA-PPO's rollout length by default)"""
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.3])
    """standard deviations of the noise added to the dataset's actions"""
    seed: int = 0
    """seed of the start states, the noise and the choice of members"""
    csv: str = "benchmark/results/wm_offdata.csv"
    """where the rows are appended ('' for none)"""
    threads: int | None = 1
    """torch CPU threads (None: torch's choice)"""


def rollout_starts(dataset: data.Dataset, horizon: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices t whose transitions t .. t + horizon - 1 lie in one episode and are not absorbing before the last."""
    t = np.arange(len(dataset) - horizon + 1)
    ok = np.ones(len(t), dtype=bool)
    for lag in range(1, horizon):
        ok &= ~dataset.episode_starts[t + lag] & ~dataset.terminals[t + lag - 1] & ~dataset.timeouts[t + lag - 1]
    candidates = t[ok]
    if len(candidates) < count:
        raise envs.UserInputError(f"only {len(candidates)} dataset states have {horizon} steps left in their episode")
    return rng.choice(candidates, count, replace=False)


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    env = envs.make(args.task)
    if env.n_actions is not None:
        raise envs.UserInputError("the comparison is for the MuJoCo tasks (reacher, ant)")
    dataset = data.load(env, args.dataset)
    rng = np.random.default_rng(args.seed)
    starts = rollout_starts(dataset, args.horizon, args.starts, rng)
    actions = dataset.actions.reshape(len(dataset), env.n_agents, env.act_dim)
    _, state_std = dataset.stats("states")
    simulators = envs.Simulators(args.task, args.starts, seed=args.seed)
    report_steps = sorted({1, max(1, args.horizon // 2), args.horizon})

    # the same draws for every model and sigma (scaled by it), so that the models are compared on equal terms
    unit_noise = rng.standard_normal((args.horizon, args.starts, env.n_agents, env.act_dim)).astype(np.float32)
    rows = []
    for path in args.world_models:
        model = moma_ppo.load_world_model(path, env.state_dim, env.n_agents * env.act_dim, torch.device("cpu"))
        info = getattr(model, "info", {})
        elites = info.get("elites", [])
        holdout = float(np.mean([info["holdout_mse"][i] for i in elites])) if elites else float("nan")
        print(f"{Path(path).name}: {info.get('steps', '?')} training steps, elites' holdout MSE {holdout:.2e}")
        for sigma in args.sigmas:
            generator = torch.Generator().manual_seed(args.seed)
            sim_states, model_states = dataset.states[starts], torch.as_tensor(dataset.states[starts])
            alive, reward_errors, eps_g, line = np.ones(args.starts, dtype=bool), [], [], []
            voted = np.zeros(args.starts, dtype=bool)
            for step in range(1, args.horizon + 1):
                joint = np.clip(actions[starts + step - 1] + sigma * unit_noise[step - 1], -1, 1)
                with torch.no_grad():
                    encoded = torch.as_tensor(joint.reshape(args.starts, -1))  # as the agents' encode: clipped, flattened
                    model_next, model_reward, vote, _, step_eps_g, _ = model.step(model_states, encoded, generator, noise=0.0)
                voted |= vote.numpy()
                sim_next, sim_reward, sim_terminal = simulators.step(sim_states, joint)
                reward_errors.append(np.abs(model_reward.numpy() - sim_reward)[alive].mean())
                eps_g.append(step_eps_g.numpy()[alive].mean())
                alive = alive & ~sim_terminal
                model_states, sim_states = model_next, sim_next
                if step in report_steps:
                    gap = model_states.numpy()[alive] - sim_states[alive]
                    state_error = float(np.sqrt(((gap / state_std) ** 2).mean()))
                    # reacher's state ends with the fingertip-to-target vector (envs/reacher.py)
                    tip = float(np.linalg.norm(gap[:, 8:10], axis=1).mean() * 100) if args.task == "reacher" else float("nan")
                    rows.append(dict(task=args.task, dataset=Path(args.dataset).stem, world_model=Path(path).name, wm_steps=info.get("steps", ""),
                                     holdout_mse_elites=f"{holdout:.3e}", sigma=sigma, step=step, state_error=f"{state_error:.4f}",
                                     reward_error=f"{np.mean(reward_errors):.5f}", eps_g=f"{np.mean(eps_g):.3e}", vote_ended=f"{voted.mean():.4f}", tip_error_cm=f"{tip:.3f}", alive=int(alive.sum())))  # fmt: skip
                    line.append(f"step {step}: state {state_error:.3f}" + (f", tip {tip:.2f} cm" if args.task == "reacher" else ""))
            print(f"  sigma {sigma:g}: " + "; ".join(line) + f"; reward error {np.mean(reward_errors):.4f}, eps_g {np.mean(eps_g):.2e}, "
                  f"vote ended {voted.mean():.1%}", flush=True)
    if args.csv:
        out = Path(args.csv)
        new = not out.exists()
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"{len(rows)} rows appended to {out}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.UserInputError as error:
        sys.exit(f"error: {error}")
