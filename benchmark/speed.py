"""How fast MOMA-PPO runs on this machine (issue #4), for README's comparison with the paper's compute.

    python benchmark/speed.py --task ant --obs po --dataset medium

1. World model: trains the ensemble on the dataset to holdout convergence (early stopping) and
   prints the time, the steps and each member's holdout error. The model is cached where
   algos/moma_ppo.py looks for it, so later runs on the same dataset reuse it; if it is cached
   already, the figures measured when it was trained are printed (--retrain measures again).
2. The MOMA-PPO loop: `--loop-steps` learning steps (synthetic rollouts through the world model
   and the MAPPO update) and their synthetic transitions per second.

Run it alone: two busy processes on two cores slow each other down many times over.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from algos import moma_ppo  # noqa: E402


@dataclass
class Args:
    task: str = "ant"
    """environment: reacher or ant"""
    obs: str | None = "po"
    """observation setting of the loop part"""
    dataset: str = "medium"
    """dataset name or file"""
    loop_steps: int = 20
    """MOMA-PPO learning steps to time"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice, all cores)"""
    cuda: bool = False
    """use the GPU when one is available"""
    compile: bool | None = None
    """torch.compile the memory module (default: algos/moma_ppo.py's, on for MuJoCo tasks with a C++ compiler)"""
    retrain: bool = False
    """train the world model again even if it is cached"""
    runs_dir: str = "runs"
    """where runs and the world-model cache go (as in algos/moma_ppo.py)"""


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    run_args = moma_ppo.Args(
        task=args.task, obs=args.obs, dataset=args.dataset, total_steps=args.loop_steps, eval_every=0, eval_episodes=1,
        cuda=args.cuda, compile=args.compile, runs_dir=args.runs_dir, save_every=10**9,  # no checkpoint inside the timed loop
    )  # fmt: skip
    if args.retrain:  # a fresh cache folder for this measurement, so the shared cached model is not replaced
        run_args.runs_dir = str(Path(args.runs_dir) / f"speed-{int(time.time())}")
        moma_ppo.SHARED_WORLD_MODELS = None  # nor loaded from there
    result = moma_ppo.main(run_args)
    info = torch.load(result["world_model"], map_location="cpu", weights_only=False)["info"]
    errors = ", ".join(f"{e:.3g}" for e in info["holdout_mse"])
    device = result["device"] if torch.device(result["device"]).type == "cpu" else torch.cuda.get_device_name()
    print(f"device: {device}, {torch.get_num_threads()} CPU threads")
    print(f"world model ({args.task} {args.dataset}): {info['seconds']:.0f} s to holdout convergence, {info['steps']} steps; "
          f"holdout MSE per member (normalised targets): {errors}; elites {info['elites']}")  # fmt: skip
    print(f"MOMA-PPO loop ({args.task} {args.obs}): {result['synthetic_per_second']:.0f} synthetic transitions/s "
          f"over learning steps 2-{args.loop_steps} (the first one compiles)")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
