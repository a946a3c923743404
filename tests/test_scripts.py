"""Smoke runs of every script with tiny budgets, determinism, and clear errors on bad input."""

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "ibc": dict(total_steps=20),
    "iql_central": dict(total_steps=20),
    "maiql": dict(total_steps=20),
    "maiql_ft": dict(total_steps=20),
    "moma_ppo": dict(total_steps=2, wm_max_steps=50, wm_eval_every=25, rollout_batch=20, minibatch_size=100),
}
RESULT_FIELDS = {"task", "obs", "dataset", "algo", "seed", "normalized_score", "return", "wall_seconds", "run_dir"}


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
    (run_dir,) = tmp_path.glob("*__*")  # run folders, not the world-model cache
    assert run_dir.name.startswith(f"coordination-fo-unfavorable__{script}__0__")
    assert result["run_dir"] == str(run_dir)
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
        (run_dir,) = (tmp_path / str(i)).glob("*__*")
        checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
        weights.append(checkpoint["policies" if script == "moma_ppo" else "policy"])
    same = [torch.equal(weights[0][k], weights[1][k]) for k in weights[0]]
    different = [torch.equal(weights[0][k], weights[2][k]) for k in weights[0] if k.endswith("weight")]
    assert all(same) and not all(different)


@pytest.mark.parametrize("script", list(TINY))
def test_a_run_never_writes_into_another_runs_folder(script, tmp_path):
    """Run names end with the start second: a run whose name is taken (another run of the same setting
    started that second) gets its own folder and leaves the other one alone."""
    now = int(time.time())
    taken = [tmp_path / f"coordination-fo-unfavorable__{script}__0__{second}" for second in range(now, now + 60)]
    for folder in taken:
        folder.mkdir()
    result = run(script, tmp_path)
    assert Path(result["run_dir"]).name in {f"{folder.name}-2" for folder in taken}
    assert (Path(result["run_dir"]) / "result.json").is_file()
    assert not any(any(folder.iterdir()) for folder in taken)


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


@pytest.mark.parametrize("obs", ["all-observant", "independent", "leader-only"])
def test_ibc_smoke_run_on_reacher(obs, small_reacher_dataset, tmp_path):
    from algos import ibc

    args = ibc.Args(task="reacher", obs=obs, dataset=small_reacher_dataset, total_steps=20, eval_episodes=2, runs_dir=str(tmp_path),
                    compile=False)  # fmt: skip
    result = ibc.main(args)
    assert result["obs"] == obs and np.isfinite(result["normalized_score"])


def test_iql_central_smoke_run_on_reacher(small_reacher_dataset, tmp_path):
    from algos import iql_central

    args = iql_central.Args(
        task="reacher", obs="all-observant", dataset=small_reacher_dataset, eval_episodes=2, runs_dir=str(tmp_path),
        **TINY["iql_central"],
    )  # fmt: skip
    result = iql_central.main(args)
    assert result["obs"] == "all-observant" and np.isfinite(result["normalized_score"])
    (run_dir,) = tmp_path.glob("*__*")  # run folders, not the world-model cache
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
    assert checkpoint["policy"]["head.log_std"].shape == (2,)  # one per dimension of the joint action


def test_iql_central_smoke_run_on_ant(small_ant_dataset, tmp_path):
    from algos import iql_central

    args = iql_central.Args(
        task="ant", dataset=small_ant_dataset, eval_episodes=1, runs_dir=str(tmp_path / "runs"), **TINY["iql_central"]
    )  # fmt: skip
    result = iql_central.main(args)
    assert result["obs"] == "fo" and np.isfinite(result["normalized_score"])


@pytest.mark.parametrize("obs", ["all-observant", "leader-only"])
def test_moma_ppo_smoke_run_on_reacher(obs, small_reacher_dataset, tmp_path):
    from algos import moma_ppo

    args = moma_ppo.Args(
        task="reacher", obs=obs, dataset=small_reacher_dataset, eval_episodes=2, runs_dir=str(tmp_path),
        **{**TINY["moma_ppo"], "wm_hidden": 32, "wm_layers": 2, "hidden": 32},
        compile=False,  # compiled: the ant PO smoke run and tests/test_moma_ppo.py
    )  # fmt: skip
    result = moma_ppo.main(args)
    assert result["obs"] == obs and np.isfinite(result["normalized_score"])
    (run_dir,) = tmp_path.glob("*__*")  # run folders, not the world-model cache
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
    assert checkpoint["entropy_alpha"].shape == (2, 1)  # per agent and action dimension


@pytest.fixture(scope="module")
def small_ant_dataset(tmp_path_factory):
    """400 transitions of ant random (the step-0 snapshot), as a file."""
    from data import mujoco_datasets

    path = tmp_path_factory.mktemp("ant") / "random-small.npz"
    np.savez(path, **mujoco_datasets.build("ant", "random", size=400))
    return str(path)


ANT_TINY = {
    "ibc": dict(total_steps=10), "maiql": dict(total_steps=10), "matd3bc": dict(total_steps=10),
    "itd3bc": dict(total_steps=10), "icql": dict(total_steps=10), "iomar": dict(total_steps=10),
    "moma_ppo": dict(total_steps=1, wm_max_steps=20, wm_eval_every=10, wm_hidden=16, wm_layers=1, rollout_batch=20,
                     minibatch_size=100),
}  # fmt: skip


@pytest.mark.parametrize("obs", ["fo", "po"])
@pytest.mark.parametrize("script", list(ANT_TINY))
def test_smoke_run_on_ant(script, obs, small_ant_dataset, tmp_path):
    """Every script on both ant observation settings (MAIQL-ft: tests/test_maiql_ft.py; IQL: centralized, fo only)."""
    module = importlib.import_module(f"algos.{script}")
    args = module.Args(task="ant", obs=obs, dataset=small_ant_dataset, eval_episodes=1, hidden=16, memory_dim=8,
                       runs_dir=str(tmp_path), **ANT_TINY[script])  # fmt: skip
    result = module.main(args)
    assert result["task"] == "ant" and result["obs"] == obs and np.isfinite(result["normalized_score"])
    (run_dir,) = tmp_path.glob("*__*")  # run folders, not the world-model cache
    assert torch.load(run_dir / "model.pt", weights_only=False)["args"]["memory"] == (10 if obs == "po" else 0)


@pytest.mark.parametrize("script", ["ibc", "iql_central", "maiql", "maiql_ft", "matd3bc", "itd3bc", "icql", "iomar"])
def test_bf16_changes_the_training_but_keeps_float32_weights(script, small_reacher_dataset, tmp_path, monkeypatch):
    """--bf16 (the MuJoCo default) really runs the matmuls in bfloat16 (the weights differ from a float32
    run's after a few steps) while the parameters, and so the checkpoint, stay float32 and finite."""
    module = importlib.import_module(f"algos.{script}")
    monkeypatch.setattr(module.data, "native_bf16", lambda cuda: True)  # emulated where the CPU lacks it
    weights = {}
    for bf16 in (True, False):
        runs_dir = tmp_path / str(bf16)
        args = module.Args(task="reacher", obs="all-observant", dataset=small_reacher_dataset, total_steps=4,
                           eval_episodes=1, hidden=16, runs_dir=str(runs_dir), bf16=bf16)  # fmt: skip
        assert np.isfinite(module.main(args)["normalized_score"])
        (run_dir,) = runs_dir.glob("*__*")
        weights[bf16] = torch.load(run_dir / "model.pt", weights_only=False)["policy"]
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights[True].values())
    assert not all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])


RESUMABLE = ["ibc", "iql_central", "maiql", "matd3bc", "itd3bc", "icql", "iomar"]  # moma_ppo, maiql_ft: their own tests


@pytest.mark.parametrize("script", RESUMABLE)
def test_checkpoint_then_resume_continues_where_it_stopped(script, small_reacher_dataset, tmp_path):
    """6 steps, then --resume with a budget of 12, gives the weights, optimiser states and targets of
    12 steps in one go (with memory where the script has it), in the first run's folder."""
    module = importlib.import_module(f"algos.{script}")
    obs = "all-observant" if script == "iql_central" else "independent"  # iql_central: centralized, FO only
    common = dict(task="reacher", obs=obs, dataset=small_reacher_dataset, eval_episodes=1, hidden=16)
    if script != "iql_central":
        common |= {"memory_dim": 8, "compile": False}
    whole = module.main(module.Args(total_steps=12, runs_dir=str(tmp_path / "whole"), **common))
    first = module.main(module.Args(total_steps=6, runs_dir=str(tmp_path / "split"), **common))
    resumed = module.main(module.Args(resume=first["run_dir"], total_steps=12))
    assert resumed["run_dir"] == first["run_dir"] and resumed["total_steps"] == 12
    a, b = (torch.load(Path(r["run_dir"]) / "model.pt", weights_only=True) for r in (whole, resumed))
    assert a["step"] == b["step"] == 12 and a.keys() == b.keys()
    state_dicts = [k for k, v in a.items() if isinstance(v, dict) and k not in ("args", "rng")]
    assert len(state_dicts) >= 2  # at least the policy and its optimiser
    for key in state_dicts:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{script}: {key}")


def test_sigterm_saves_a_checkpoint_and_says_how_to_go_on(small_reacher_dataset, tmp_path):
    import signal

    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "algos" / "ibc.py"), "--task", "reacher", "--dataset", small_reacher_dataset,
         "--total-steps", "10000000", "--hidden", "16", "--runs-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while "steps on" not in (line := proc.stdout.readline()):  # training has started (after any notes)
        assert line, "the script ended before training started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    (run_dir,) = tmp_path.iterdir()
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    assert 0 < checkpoint["step"] < 10_000_000
    assert proc.returncode == 1
    assert err.strip() == f"stopped at step {checkpoint['step']}; go on with: python algos/ibc.py --resume {run_dir}"
