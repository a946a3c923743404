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
simulator ends with a terminal state are left out from that step on.

An agent learns from the model which of its choices pays more, not how much a rollout earns. So for
sigma > 0 a second, independent noise draw is played from the same starts (the same members chosen
at each step), and the difference between the two draws' rewards summed up to each reported step is
compared between model and simulator over the starts that neither draw ended: its correlation, the
share of starts where the model picks the same winner (the sign agrees) and the slope of a least-squares
fit of the model's difference on the simulator's (below 1: the model credits the actions' effect too
little). One row per model, sigma and step goes to `--csv` (default benchmark/results/wm_offdata.csv).
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
          "reward_error", "eps_g", "vote_ended", "tip_error_cm", "alive", "return_diff_corr", "return_diff_sign",
          "return_diff_slope"]  # fmt: skip


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


def open_loop(model, simulators, start_states: np.ndarray, joint_actions: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Joint actions [H, B, N, A] played from `start_states` [B, S] in the model and the simulator: per step [H, B, ...]."""
    generator = torch.Generator().manual_seed(seed)  # the same seed: the same member at each step for every draw
    model_states, sim_states = torch.as_tensor(start_states), start_states
    out = {key: [] for key in ("model_state", "model_reward", "vote", "eps_g", "sim_state", "sim_reward", "sim_terminal")}
    for joint in joint_actions:
        with torch.no_grad():
            encoded = torch.as_tensor(joint.reshape(len(start_states), -1))  # as the agents' encode: clipped, flattened
            model_states, model_reward, vote, _, eps_g, _ = model.step(model_states, encoded, generator, noise=0.0)
        sim_states, sim_reward, sim_terminal = simulators.step(sim_states, joint)
        for key, value in zip(out, (model_states, model_reward, vote, eps_g, sim_states, sim_reward, sim_terminal)):
            out[key].append(np.asarray(value))
    return {key: np.stack(value) for key, value in out.items()}


def return_difference_fit(model_diff: np.ndarray, sim_diff: np.ndarray) -> tuple[float, float, float]:
    """Correlation, sign agreement and least-squares slope of the model's return differences on the simulator's."""
    if len(sim_diff) < 2 or sim_diff.std() == 0:
        return float("nan"), float("nan"), float("nan")
    slope = float(np.cov(model_diff, sim_diff)[0, 1] / sim_diff.var(ddof=1))
    return float(np.corrcoef(model_diff, sim_diff)[0, 1]), float(np.mean(np.sign(model_diff) == np.sign(sim_diff))), slope


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
    data_actions = np.stack([actions[starts + t] for t in range(args.horizon)])  # [H, B, N, A]
    _, state_std = dataset.stats("states")
    simulators = envs.Simulators(args.task, args.starts, seed=args.seed)
    report_steps = sorted({1, max(1, args.horizon // 2), args.horizon})

    # the same draws for every model and sigma (scaled by it), so that the models are compared on equal terms
    unit_noise = rng.standard_normal((2, *data_actions.shape)).astype(np.float32)
    rows = []
    for path in args.world_models:
        model = moma_ppo.load_world_model(path, env.state_dim, env.n_agents * env.act_dim, torch.device("cpu"))
        info = getattr(model, "info", {})
        elites = info.get("elites", [])
        holdout = float(np.mean([info["holdout_mse"][i] for i in elites])) if elites else float("nan")
        print(f"{Path(path).name}: {info.get('steps', '?')} training steps, elites' holdout MSE {holdout:.2e}")
        for sigma in args.sigmas:
            draws = [open_loop(model, simulators, dataset.states[starts], np.clip(data_actions + sigma * noise, -1, 1), args.seed)
                     for noise in unit_noise[: 2 if sigma else 1]]  # fmt: skip
            a = draws[0]
            ended = [np.logical_or.accumulate(draw["sim_terminal"], 0) for draw in draws]  # [H, B]: by the end of step t + 1
            alive = np.concatenate([np.ones_like(ended[0][:1]), ~ended[0][:-1]])  # [H, B]: not ended before step t + 1
            line = []
            for step in report_steps:
                ok = ~ended[0][step - 1]  # states after `step` steps that the simulator did not end
                gap = a["model_state"][step - 1][ok] - a["sim_state"][step - 1][ok]
                state_error = float(np.sqrt(((gap / state_std) ** 2).mean()))
                reward_error = np.mean([np.abs(a["model_reward"][t] - a["sim_reward"][t])[alive[t]].mean() for t in range(step)])
                eps_g = np.mean([a["eps_g"][t][alive[t]].mean() for t in range(step)])
                voted = a["vote"][:step].any(0).mean()
                # reacher's state ends with the fingertip-to-target vector (envs/reacher.py)
                tip = float(np.linalg.norm(gap[:, 8:10], axis=1).mean() * 100) if args.task == "reacher" else float("nan")
                fit = (float("nan"),) * 3
                if len(draws) == 2:  # rewards summed to `step` over starts that neither draw's simulator ended by then
                    both = ok & ~ended[1][step - 1]
                    model_diff = (a["model_reward"][:step] - draws[1]["model_reward"][:step]).sum(0)[both]
                    sim_diff = (a["sim_reward"][:step] - draws[1]["sim_reward"][:step]).sum(0)[both]
                    fit = return_difference_fit(model_diff, sim_diff)
                rows.append(dict(task=args.task, dataset=Path(args.dataset).stem, world_model=Path(path).name, wm_steps=info.get("steps", ""),
                                 holdout_mse_elites=f"{holdout:.3e}", sigma=sigma, step=step, state_error=f"{state_error:.4f}",
                                 reward_error=f"{reward_error:.5f}", eps_g=f"{eps_g:.3e}", vote_ended=f"{voted:.4f}", tip_error_cm=f"{tip:.3f}",
                                 alive=int(ok.sum()), return_diff_corr=f"{fit[0]:.4f}", return_diff_sign=f"{fit[1]:.4f}", return_diff_slope=f"{fit[2]:.4f}"))  # fmt: skip
                line.append(f"step {step}: state {state_error:.3f}" + (f", tip {tip:.2f} cm" if args.task == "reacher" else "")
                            + (f", return difference corr {fit[0]:.2f} sign {fit[1]:.2f} slope {fit[2]:.2f}" if len(draws) == 2 else ""))  # fmt: skip
            print(f"  sigma {sigma:g}: " + "; ".join(line) + f"; reward error {reward_error:.4f}, eps_g {eps_g:.2e}, "
                  f"vote ended {voted:.1%}", flush=True)
    if args.csv:
        out = Path(args.csv)
        out.parent.mkdir(parents=True, exist_ok=True)
        header, earlier = None, []
        if out.exists():
            with out.open(newline="") as f:
                reader = csv.DictReader(f)
                earlier, header = list(reader), reader.fieldnames
        if header is not None and header != FIELDS:  # written before a column was added: rewritten with it left blank
            with out.open("w", newline="") as f:
                writer = csv.DictWriter(f, FIELDS, restval="")
                writer.writeheader()
                writer.writerows(earlier)
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if header is None:
                writer.writeheader()
            writer.writerows(rows)
        print(f"{len(rows)} rows appended to {out}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.UserInputError as error:
        sys.exit(f"error: {error}")
