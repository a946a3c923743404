"""Which world-model width and depth give the best holdout error per CPU minute (issue #4).

    python benchmark/wm_sweep.py --task ant --dataset medium --configs 3x200 4x200 3x400 4x400 --threads 1

Trains MOMA-PPO's ensemble (algos/moma_ppo.py's own `train_world_model`: 7 members, holdout early
stopping, bfloat16 autocast on MuJoCo) once per `LAYERSxWIDTH` and appends one row per config to
`benchmark/results/wm_sweep.csv`: the steps and seconds to convergence, the elites' mean holdout
MSE (normalised targets) at the end, and the best mean over all members after 5, 10 and 20
minutes (empty when training stopped before). Configs already in the CSV for this task, dataset
and device are skipped, so an interrupted sweep goes on where it stopped (`--redo` measures them
again). Nothing is cached for algos/moma_ppo.py: choose there with
`--wm-hidden` and `--wm-layers`.

Run it alone: two busy processes on two cores slow each other down many times over.
"""

from __future__ import annotations

import csv
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import envs  # noqa: E402
from algos import moma_ppo  # noqa: E402

FIELDS = ["task", "dataset", "layers", "hidden", "members", "steps", "seconds", "holdout_mse_elites",
          "holdout_mse_5min", "holdout_mse_10min", "holdout_mse_20min", "device", "threads"]  # fmt: skip


@dataclass
class Args:
    task: str = "ant"
    """environment: reacher or ant"""
    dataset: str = "medium"
    """dataset name or file"""
    configs: list[str] = field(default_factory=lambda: ["3x200", "4x200", "3x400", "4x400"])
    """ensembles to train, each as LAYERSxWIDTH (hidden layers x units per layer; ours: 4x200, the paper's: 4x1024)"""
    max_steps: int = 100_000
    """gradient steps at the most, if the holdout error has not stopped improving before"""
    threads: int | None = 1
    """torch CPU threads (None: torch's choice, all cores)"""
    cuda: bool = False
    """use the GPU when one is available"""
    out: str = str(ROOT / "benchmark" / "results" / "wm_sweep.csv")
    """the CSV the rows are appended to"""
    redo: bool = False
    """measure configs again that the CSV already has"""


class HoldoutCurve:
    """Stands in for the TensorBoard writer: keeps (seconds, mean holdout MSE) as training goes."""

    def __init__(self):
        self.start, self.points = time.time(), []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if tag == "losses/world_model_holdout_mse":
            self.points.append((time.time() - self.start, value))

    def at(self, seconds: float) -> float | str:
        """The best error reached within `seconds` ('' if training stopped before: see the final one)."""
        reached = [value for t, value in self.points if t <= seconds]
        return min(reached) if reached and self.points[-1][0] > seconds else ""


def parse_config(config: str) -> tuple[int, int]:
    try:
        layers, hidden = (int(x) for x in config.lower().split("x"))
    except ValueError:
        raise envs.UserInputError(f"config '{config}' is not LAYERSxWIDTH, e.g. 4x200") from None
    return layers, hidden


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    env = envs.make(args.task)
    if env.n_actions is not None:
        raise envs.UserInputError("the sweep is for the MuJoCo tasks (reacher, ant)")
    dataset = data.load(env, args.dataset)
    out = Path(args.out)
    done = set()
    if out.is_file() and not args.redo:
        with out.open() as f:
            done = {(r["task"], r["dataset"], int(r["layers"]), int(r["hidden"]), r["device"]) for r in csv.DictReader(f)}
    encode_actions = functools.partial(moma_ppo.GaussianPolicies.encode, None)  # [B, N, A] -> [B, N * A]
    for config in args.configs:
        layers, hidden = parse_config(config)
        if (args.task, Path(args.dataset).stem, layers, hidden, device_name) in done:
            print(f"{config}: in {out} already (--redo measures it again)")
            continue
        wm_args = moma_ppo.Args(task=args.task, dataset=args.dataset, wm_hidden=hidden, wm_layers=layers, wm_max_steps=args.max_steps)
        for key, value in moma_ppo.TASK_DEFAULTS[args.task].items():  # as algos/moma_ppo.py fills its defaults
            if getattr(wm_args, key) is None:
                setattr(wm_args, key, value)
        wm_args.wm_bf16 = data.bf16_if_native(wm_args.wm_bf16, args.cuda, "--wm-bf16")
        print(f"{config}: training {wm_args.wm_members} members on {len(dataset)} transitions ({device_name})", flush=True)
        torch.manual_seed(wm_args.wm_seed)
        curve = HoldoutCurve()
        generator = torch.Generator(device).manual_seed(wm_args.wm_seed)
        model = moma_ppo.train_world_model(wm_args, dataset, encode_actions, device, curve, generator)
        info = model.info
        elite_mse = sum(info["holdout_mse"][i] for i in info["elites"]) / len(info["elites"])
        row = dict(task=args.task, dataset=Path(args.dataset).stem, layers=layers, hidden=hidden, members=wm_args.wm_members,
                   steps=info["steps"], seconds=round(info["seconds"], 1), holdout_mse_elites=elite_mse,
                   holdout_mse_5min=curve.at(300), holdout_mse_10min=curve.at(600), holdout_mse_20min=curve.at(1200),
                   device=device_name, threads=torch.get_num_threads())  # fmt: skip
        new_file = not out.is_file()
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        print(f"{config}: {info['steps']} steps in {info['seconds']:.0f} s, elites' holdout MSE {elite_mse:.3e}", flush=True)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.UserInputError as error:
        sys.exit(f"error: {error}")
