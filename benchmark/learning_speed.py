"""Gradient steps per second of every model-free script on this machine (issue #5).

    python benchmark/learning_speed.py --task reacher --obs independent --threads 1

Each script runs twice, for `--short` and `--long` steps with no evaluation during training, and
the speed is (long - short) / (time difference): data loading, network building and the final
evaluation cancel out. Run it alone (two busy processes on two cores slow each other down).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPTS = ("ibc", "iql_central", "maiql", "maiql_ft", "matd3bc", "itd3bc", "icql", "iomar")


@dataclass
class Args:
    task: str = "reacher"
    """environment: reacher or ant"""
    obs: str | None = None
    """observation setting (default: the task's first, full observability)"""
    dataset: str | None = None
    """dataset (default: each script's for the task)"""
    scripts: tuple[str, ...] = SCRIPTS
    """which scripts to time"""
    short: int = 200
    """steps of the first run"""
    long: int = 1200
    """steps of the second run"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""
    cuda: bool = False
    """use the GPU when one is available"""
    compile: bool | None = None
    """compile the memory module (scripts that have --compile; default: each script's own)"""


def timed_run(module, args: Args, steps: int, runs_dir: str) -> float:
    run_args = module.Args(task=args.task, obs=args.obs, seed=0, total_steps=steps, eval_every=0, eval_episodes=1,
                           cuda=args.cuda, runs_dir=runs_dir, **({"dataset": args.dataset} if args.dataset else {}))  # fmt: skip
    if args.compile is not None and hasattr(run_args, "compile"):
        run_args.compile = args.compile
    if hasattr(run_args, "finetune_fraction"):  # MAIQL-ft: time its fine-tuning phase, the slower one, at the
        run_args.finetune_fraction = 1.0  # paper's rate (1M simulator transitions over 1M fine-tuning steps)
        run_args.online_transitions = steps
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        module.main(run_args)
    return time.time() - start


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    for script in args.scripts:
        if args.obs not in (None, "fo", "all-observant") and script == "iql_central":
            continue  # centralized execution: full observability only
        module = importlib.import_module(f"algos.{script}")
        with tempfile.TemporaryDirectory() as runs_dir:
            timed_run(module, args, args.short, runs_dir)  # warm-up: the dataset file into the OS cache, lazy imports
            short, long = (timed_run(module, args, steps, runs_dir) for steps in (args.short, args.long))
        print(f"{script:<12} {args.task} {args.obs or 'default obs'}: {(args.long - args.short) / (long - short):7.1f} steps/s",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
