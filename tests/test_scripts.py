"""Smoke runs of every script with tiny budgets, determinism, and clear errors on bad input."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "ibc": dict(total_steps=20),
    "iql_central": dict(total_steps=20),
    "maiql": dict(total_steps=20),
    "moma_ppo": dict(total_steps=2, wm_max_steps=50, wm_eval_every=25, rollout_batch=20, minibatch_size=100),
}
RESULT_FIELDS = {"task", "obs", "dataset", "algo", "seed", "normalized_score", "return", "wall_seconds"}


def run(script: str, tmp_path: Path, **overrides) -> dict:
    module = importlib.import_module(f"algos.{script}")
    args = module.Args(dataset="unfavorable", eval_episodes=2, runs_dir=str(tmp_path), **{**TINY[script], **overrides})
    return module.main(args)


@pytest.mark.parametrize("script", list(TINY))
def test_smoke_run_writes_results_logs_and_checkpoint(script, tmp_path, capsys):
    result = run(script, tmp_path)
    assert RESULT_FIELDS <= set(result)
    assert result["algo"] == script and result["task"] == "coordination" and result["obs"] == "fo"
    assert 0.0 <= result["normalized_score"] <= 1.0
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith(f"coordination-fo-unfavorable__{script}__0__")
    assert json.loads((run_dir / "result.json").read_text()) == result
    assert list(run_dir.glob("events.out.tfevents.*"))
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
    assert checkpoint["step"] == result["total_steps"]
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == f"normalized_score: {result['normalized_score']:.4f}"


@pytest.mark.parametrize("script", list(TINY))
def test_same_seed_same_weights(script, tmp_path):
    weights = []
    for i, seed in enumerate([3, 3, 4]):
        run(script, tmp_path / str(i), seed=seed)
        (run_dir,) = (tmp_path / str(i)).iterdir()
        checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
        weights.append(checkpoint["policies" if script == "moma_ppo" else "policy"])
    same = [torch.equal(weights[0][k], weights[1][k]) for k in weights[0]]
    different = [torch.equal(weights[0][k], weights[2][k]) for k in weights[0] if k.endswith("weight")]
    assert all(same) and not all(different)


def cli(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "algos" / f"{script}.py"), *argv], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("script", list(TINY))
def test_unknown_task_is_one_clear_line(script):
    out = cli(script, "--task", "chess")
    assert out.returncode != 0
    assert out.stderr.strip() == "error: unknown task 'chess'; choose one of: coordination, reacher, ant"
    assert "Traceback" not in out.stdout + out.stderr


def test_malformed_dataset_file_is_one_clear_line(tmp_path):
    from data import coordination

    raw = coordination.build("neutral", episodes=5)
    raw["rewards"][3] = np.nan
    np.savez(tmp_path / "bad.npz", **raw)
    out = cli("moma_ppo", "--dataset", str(tmp_path / "bad.npz"), "--runs-dir", str(tmp_path))
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.npz'} has NaN or infinite values in 'rewards' (1 rows); clean or regenerate it"]
    out = cli("ibc", "--dataset", "biased")
    assert out.returncode != 0 and out.stderr.startswith("error: unknown dataset 'biased'")
