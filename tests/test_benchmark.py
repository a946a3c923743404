"""The benchmark tools: the grid's worker, recording runs made outside the grid (--add), the world-model sweep, the rollout diagnosis, the off-data comparison, the episode statistics."""

import csv
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from conftest import ROOT
from torch.utils.tensorboard import SummaryWriter


def load_benchmark(name: str):
    """benchmark/NAME.py as a module (benchmark/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmark" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


run = load_benchmark("run")


def fake_run(folder, seed, scores):
    """A finished run folder: result.json and an eval/normalized_score curve in TensorBoard."""
    folder.mkdir(parents=True)
    writer = SummaryWriter(str(folder))
    for step, score in scores:
        writer.add_scalar("eval/normalized_score", score, step)
    writer.close()
    result = dict(algo="moma_ppo", task="ant", obs="po", dataset="medium", seed=seed, normalized_score=scores[-1][1],
                  wall_seconds=12.5, device="cpu", total_steps=scores[-1][0], eval_episodes=100)  # fmt: skip
    result["return"] = 100.0
    (folder / "result.json").write_text(json.dumps(result))
    return folder


def test_add_records_each_run_and_its_curve_once(tmp_path):
    csv_path, rows = tmp_path / "table4.csv", []
    first = fake_run(tmp_path / "a", 0, [(500, 0.3), (1000, 0.5)])
    second = fake_run(tmp_path / "b", 1, [(1000, 0.7)])
    run.add_runs((str(first), str(second)), "ant", csv_path, rows)
    run.add_runs((str(first),), "ant", csv_path, rows)  # already there: skipped

    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert [(r["seed"], float(r["normalized_score"]), r["total_steps"]) for r in table] == [("0", 0.5, "1000"), ("1", 0.7, "1000")]
    with csv_path.with_name("table4_curves.csv").open() as f:
        curves = list(csv.DictReader(f))
    assert [(r["seed"], r["step"], float(r["normalized_score"])) for r in curves] == [
        ("0", "500", pytest.approx(0.3)), ("0", "1000", pytest.approx(0.5)), ("1", "1000", pytest.approx(0.7))
    ]  # fmt: skip
    assert len(rows) == 2


def test_summary_shows_each_cells_best_covered_budget_and_names_the_rows_of_each_budget(tmp_path, monkeypatch):
    def row(dataset, seed, score, steps):
        return dict(algo="moma_ppo", obs="fo", dataset=dataset, seed=str(seed), normalized_score=str(score),
                    wall_seconds="60", total_steps=str(steps))  # fmt: skip

    rows = [row("medium", 0, 1.0, 3000), row("medium", 1, 1.2, 3000), row("expert", 0, 1.1, 3000),
            row("expert", 0, 1.3, 6000), row("expert", 1, 1.5, 6000)]  # fmt: skip
    table = run.summary_table("4b", rows)
    assert "| FO ant-expert |" in table and "**1.40 ± 0.10** (1.49 ± 0.01)" in table  # the 6,000-step runs only
    assert "**1.10 ± 0.10** (1.29 ± 0.06)" in table
    assert "moma_ppo 3,000 (FO ant-medium), moma_ppo 6,000 (FO ant-expert)." in table
    assert "4 runs, 4.0 CPU-minutes" in table
    rows[0]["device"] = "cuda"
    assert "4 runs (1 of them on a GPU), 4.0 minutes in all" in run.summary_table("4b", rows)
    del rows[0]["device"]

    # One seed of a longer budget does not replace two seeds of a shorter one; the curves show both.
    rows.append(row("medium", 0, 0.2, 10000))
    table = run.summary_table("4b", rows)
    assert "**1.10 ± 0.10** (1.29 ± 0.06)" in table and "**0.20**" not in table
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    curves = tmp_path / "table4_curves.csv"
    curves.write_text("algo,task,obs,dataset,seed,total_steps,step,normalized_score\n"
                      "moma_ppo,ant,fo,medium,0,3000,3000,1.0\nmoma_ppo,ant,fo,medium,1,3000,3000,1.2\n"
                      "moma_ppo,ant,fo,medium,0,10000,10000,0.2\n")  # fmt: skip
    lines = run.curves_table("4b", rows).splitlines()
    assert "| MOMA-PPO | FO ant-medium | 3,000 | 2 | 3,000: 1.10 |" in lines
    assert "| MOMA-PPO | FO ant-medium | 10,000 | 1 | 10,000: 0.20 |" in lines


def test_grid_jobs_skip_the_runs_of_this_budget_already_recorded_and_pass_the_grids_flags():
    cells = [("icql", "fo", "medium"), ("iomar", "fo", "medium")]
    rows = [dict(algo="icql", obs="fo", dataset="medium", seed="0", total_steps="50000"),
            dict(algo="iomar", obs="fo", dataset="medium", seed="0", total_steps="10000")]  # fmt: skip
    args = run.Args(table="4b", seeds=2, total_steps=50_000, eval_every=5_000, cuda=True)
    jobs, done = run.grid_jobs(args, "ant", cells, rows)
    assert done == 1  # the 10,000-step IOMAR run is another budget's
    assert [(algo, argv[argv.index("--seed") + 1]) for algo, argv in jobs] == [("iomar", "0"), ("icql", "1"), ("iomar", "1")]
    assert jobs[0][1] == ["--task", "ant", "--obs", "fo", "--dataset", "medium", "--seed", "0",
                          "--total-steps", "50000", "--eval-every", "5000", "--cuda"]  # fmt: skip
    jobs, done = run.grid_jobs(run.Args(table="4b", seeds=1), "ant", cells, rows)  # the scripts' own budgets, on CPU
    assert done == 2 and jobs == []


def test_grid_worker_reads_the_curve_of_the_run_it_made(tmp_path):
    import torch

    threads = torch.get_num_threads()
    try:
        argv = ["--task", "coordination", "--dataset", "unfavorable", "--total-steps", "20", "--eval-every", "10",
                "--eval-episodes", "2", "--runs-dir", str(tmp_path)]  # fmt: skip
        result = run.run_one(("ibc", argv))
    finally:
        torch.set_num_threads(threads)  # the worker keeps to one thread; the rest of the tests need not
    assert result["run_dir"].startswith(str(tmp_path))
    assert [step for step, _ in result["curve"]] == [10, 20]
    assert result["curve"][-1][1] == pytest.approx(result["normalized_score"])


def test_a_failing_grid_job_is_reported_not_raised(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # run_one sets one thread for its worker process
    result = run.run_one(("ibc", ["--task", "nosuchtask", "--runs-dir", str(tmp_path)]))
    assert result["algo"] == "ibc" and "nosuchtask" in result["error"] and not result["stopped"]


def test_a_grid_job_stopped_by_a_signal_is_told_apart_from_a_failure(monkeypatch):
    import torch

    class Script:  # what every script does on Ctrl-C or SIGTERM: save a checkpoint, then raise data.Stopped
        @dataclass
        class Args:
            seed: int = 0

        @staticmethod
        def main(args):
            raise run.data.Stopped(f"stopped at step 3; go on with: python algos/x.py --resume runs/x__{args.seed}")

    monkeypatch.setattr(run, "script_module", lambda name: Script)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # run_one sets one thread for its worker process
    result = run.run_one(("x", ["--seed", "1"]))
    assert result["stopped"] and result["error"] == "stopped at step 3; go on with: python algos/x.py --resume runs/x__1"


def _worker_waiting_for_a_stop_request(ready, path):
    """What a grid worker's script does: wait in its training loop until Ctrl-C or SIGTERM asks it to stop, then save."""
    import time

    with run.data.stop_requests() as requests:
        ready.set()
        while not requests:
            time.sleep(0.01)
    Path(path).write_text("checkpoint saved")


def test_sigterm_to_the_grid_reaches_its_workers_and_stops_the_grid(tmp_path):
    import multiprocessing as mp
    import os
    import signal

    context = mp.get_context("fork")  # a plain child of this process, as the grid's pool workers are
    ready, saved = context.Event(), tmp_path / "saved"
    worker = context.Process(target=_worker_waiting_for_a_stop_request, args=(ready, str(saved)))
    worker.start()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert ready.wait(30)
        run.stop_workers_on_sigterm()
        with pytest.raises(KeyboardInterrupt):  # the grid ends as on Ctrl-C
            os.kill(os.getpid(), signal.SIGTERM)  # `kill GRID_PID`
            worker.join(30)  # the handler runs here at the latest
        worker.join(30)
        assert worker.exitcode == 0 and saved.read_text() == "checkpoint saved"  # the worker stopped cleanly, after saving
    finally:
        signal.signal(signal.SIGTERM, previous)
        if worker.is_alive():
            worker.kill()


def test_add_refuses_unfinished_runs_and_other_tasks(tmp_path):
    (tmp_path / "running").mkdir()
    with pytest.raises(SystemExit, match="has not finished"):
        run.add_runs((str(tmp_path / "running"),), "ant", tmp_path / "t.csv", [])
    ant = fake_run(tmp_path / "ant", 0, [(10, 0.1)])
    with pytest.raises(SystemExit, match="ran task ant, not this table.s task reacher"):
        run.add_runs((str(ant),), "reacher", tmp_path / "t.csv", [])


def test_world_model_sweep_appends_one_row_per_config_and_skips_measured_ones(small_reacher_dataset, tmp_path, capsys):
    sweep = load_benchmark("wm_sweep")
    out = tmp_path / "wm_sweep.csv"
    args = sweep.Args(task="reacher", dataset=small_reacher_dataset, configs=["1x16", "2x8"], max_steps=500, out=str(out))
    sweep.main(args)
    rows = list(csv.DictReader(out.open()))
    assert [(r["layers"], r["hidden"]) for r in rows] == [("1", "16"), ("2", "8")]
    assert all(r["dataset"] == "expert-mix-small" and 0 < int(r["steps"]) <= 500 and float(r["holdout_mse_elites"]) > 0 for r in rows)
    sweep.main(args)  # measured already: nothing is added
    assert len(list(csv.DictReader(out.open()))) == 2
    assert "in " + str(out) + " already" in capsys.readouterr().out
    with pytest.raises(sweep.envs.UserInputError, match="LAYERSxWIDTH"):
        sweep.main(sweep.Args(task="reacher", dataset=small_reacher_dataset, configs=["wide"], out=str(out)))


def test_rollout_diagnosis_compares_model_and_simulator(small_reacher_dataset, tmp_path, capsys):
    from algos import moma_ppo

    moma_ppo.main(moma_ppo.Args(task="reacher", obs="independent", dataset=small_reacher_dataset, total_steps=1, wm_max_steps=50,
                                wm_eval_every=25, rollout_batch=20, minibatch_size=100, eval_episodes=1, runs_dir=str(tmp_path)))  # fmt: skip
    (run_dir,) = tmp_path.glob("*__*")
    diagnosis = load_benchmark("rollout_diagnosis")
    capsys.readouterr()
    diagnosis.main(diagnosis.Args(run=str(run_dir), starts=6, model_steps=3, sim_steps=20))
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("reward per step over 3 steps: world model ")
    assert len(lines[2].split()) == 1 + 3 and len(lines[3].split()) == 1 + 3  # "model:" / "simulator:" and 3 rewards
    # reacher's data hold no terminal: training ends no rollout on one, the vote's share is reported beside
    assert lines[4].startswith("ended by a terminal state within 3 steps: world model 0.0% (terminals: none in the dataset; ")
    assert lines[4].endswith("simulator 0.0%")  # reacher never ends
    assert lines[5].startswith("simulator, 20 steps (0.0% ended by a terminal state)")
    assert [x.split(":")[0] for x in lines[6].split()] == ["0", "10"]  # 20 steps, a mean every 10
    assert lines[7].startswith("  after 20 steps: fingertip ") and "inverse-kinematics solution in" in lines[7]
    # with nothing remembered the agents act differently from the same states (the memory is read); after
    # one learning step the difference is small, so compare every rollout figure, not one rounded line
    diagnosis.main(diagnosis.Args(run=str(run_dir), starts=6, model_steps=3, sim_steps=20, history="empty"))
    empty = capsys.readouterr().out.splitlines()
    assert empty[0] == lines[0] and empty[2:] != lines[2:]
    with pytest.raises(diagnosis.envs.UserInputError, match="--history"):
        diagnosis.main(diagnosis.Args(run=str(run_dir), history="none"))


def test_heading_probe_turns_what_only_the_torso_agent_sees(tmp_path, capsys):
    import numpy as np
    import torch
    from algos import moma_ppo
    from data import mujoco_datasets

    dataset = tmp_path / "ant-small.npz"
    np.savez(dataset, **mujoco_datasets.build("ant", "random", size=200))
    moma_ppo.main(moma_ppo.Args(task="ant", obs="po", dataset=str(dataset), total_steps=1, wm_max_steps=20, wm_eval_every=10,
                                wm_hidden=16, wm_layers=1, hidden=16, memory_dim=8, rollout_batch=20, minibatch_size=100,
                                eval_episodes=1, runs_dir=str(tmp_path)))  # fmt: skip
    (run_dir,) = tmp_path.glob("*__*")
    probe = load_benchmark("heading_probe")
    capsys.readouterr()
    results = probe.main(probe.Args(run=str(run_dir), starts=12, angles=[-0.5, 0.0, 0.5]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("changes against the turn +0.00") and len(lines) == 1 + 3 * (2 + 3)  # 3 bands of 3 turns
    base = results[0.0]
    for angle in (-0.5, 0.5):
        figures = results[angle]
        heading_change = (figures["heading"] - base["heading"] - angle + np.pi) % (2 * np.pi) - np.pi
        assert heading_change.abs().max() < 1e-4
        # under PO only agent 0 sees the torso: the other agents act the same at every heading, agent 0 does not
        assert torch.equal(figures["action"][1:], base["action"][1:]) and not torch.equal(figures["action"][0], base["action"][0])
        assert not torch.equal(figures["value"], base["value"]) and not torch.equal(figures["sim"], base["sim"])
        assert torch.isfinite(figures["model"]).all() and (figures["eps_g"] >= 0).all()
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
    checkpoint["args"]["task"] = "reacher"
    torch.save(checkpoint, tmp_path / "reacher.pt")
    with pytest.raises(probe.envs.UserInputError, match="for ant runs"):
        probe.main(probe.Args(run=str(tmp_path / "reacher.pt")))


def test_offdata_rollouts_stay_in_one_episode_and_every_model_sees_the_same_actions(small_reacher_dataset, tmp_path, capsys):
    import numpy as np
    from algos import moma_ppo

    offdata = load_benchmark("wm_offdata")
    # 3 episodes of 50 steps: a 10-step window from t stays in t's episode only for t % 50 <= 40
    episode_starts = np.arange(150) % 50 == 0
    timeouts = np.arange(150) % 50 == 49
    fake = type("D", (), dict(episode_starts=episode_starts, timeouts=timeouts, terminals=np.zeros(150, bool), __len__=lambda self: 150))()
    starts = offdata.rollout_starts(fake, 10, 120, np.random.default_rng(0))
    assert len(set(starts)) == 120 and all(t % 50 <= 40 for t in starts)
    with pytest.raises(offdata.envs.UserInputError, match="steps left in their episode"):
        offdata.rollout_starts(fake, 10, 124, np.random.default_rng(0))

    moma_ppo.main(moma_ppo.Args(task="reacher", obs="all-observant", dataset=small_reacher_dataset, total_steps=1, wm_max_steps=50,
                                wm_eval_every=25, rollout_batch=20, minibatch_size=100, eval_episodes=1, runs_dir=str(tmp_path)))  # fmt: skip
    (model,) = (tmp_path / "world_models").glob("*.pt")
    out = tmp_path / "offdata.csv"
    old_fields = offdata.FIELDS[: offdata.FIELDS.index("return_diff_corr")]  # a file written before those columns
    out.write_text(",".join(old_fields) + "\n" + ",".join(f"old{i}" for i in range(len(old_fields))) + "\n")
    offdata.main(offdata.Args(world_models=[str(model), str(model)], dataset=small_reacher_dataset, starts=20, horizon=4,
                              sigmas=[0.0, 1.0], csv=str(out)))  # fmt: skip
    earlier, *rows = list(csv.DictReader(out.open()))
    assert list(earlier) == offdata.FIELDS and earlier["task"] == "old0" and earlier["return_diff_corr"] == ""
    assert [(r["sigma"], r["step"]) for r in rows] == [(s, t) for s in ("0.0", "1.0") for t in ("1", "2", "4")] * 2
    assert rows[:6] == rows[6:]  # the same noise draws for each model
    # two draws only where there is noise (the fit itself: test_return_difference_fit)
    assert all(r["return_diff_corr"] == "nan" for r in rows[:3])
    assert all(-1 <= float(r["return_diff_corr"]) <= 1 and 0 <= float(r["return_diff_sign"]) <= 1 for r in rows[3:6])
    assert all(int(r["alive"]) == 20 and float(r["state_error"]) > 0 and float(r["eps_g"]) >= 0 for r in rows)  # reacher never ends
    votes = [[float(r["vote_ended"]) for r in rows[i : i + 3]] for i in range(0, 12, 3)]  # a share that only grows
    assert all(0 <= v[0] <= v[1] <= v[2] <= 1 for v in votes)
    assert "sigma 1: step 1: state " in capsys.readouterr().out


def test_return_difference_fit():
    import numpy as np

    offdata = load_benchmark("wm_offdata")
    sim = np.array([-2.0, -1.0, 0.5, 3.0])
    assert np.allclose(offdata.return_difference_fit(0.5 * sim + 1.0, sim), (1.0, 0.5, 0.5))  # -1 -> 0.5, -2 -> 0: wrong signs
    assert np.allclose(offdata.return_difference_fit(-sim, sim), (-1.0, 0.0, -1.0))
    assert np.isnan(offdata.return_difference_fit(sim, np.zeros(4))).all()


def test_an_interrupted_grid_run_goes_on_from_its_checkpoint(tmp_path, monkeypatch):
    """A run folder with a checkpoint and no result.json is picked up again by a grid job with the same script,
    settings and budget, and only by such a job."""
    import torch

    monkeypatch.chdir(tmp_path)  # the grid's runs go to ./runs
    threads = torch.get_num_threads()
    argv = ["--task", "coordination", "--obs", "fo", "--dataset", "unfavorable", "--seed", "1", "--total-steps", "20",
            "--eval-every", "0", "--eval-episodes", "2"]  # fmt: skip
    try:
        result = run.run_one(("ibc", argv))
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path / result["run_dir"]
    assert run.unfinished_run("ibc", argv) is None  # finished: nothing to go on with
    (folder / "result.json").unlink()  # as if stopped before the end, with its last checkpoint saved
    assert run.unfinished_run("ibc", argv) == folder.relative_to(tmp_path)
    assert run.unfinished_run("ibc", [*argv[:-6], "--total-steps", "30", *argv[-4:]]) is None  # another budget
    assert run.unfinished_run("ibc", [*argv, "--learning-rate", "1e-3"]) is None  # another setting
    assert run.unfinished_run("ibc", [*argv[:7], "0", *argv[8:]]) is None  # another seed
    assert run.unfinished_run("maiql", argv) is None  # another script


def test_an_interrupted_run_is_found_where_bfloat16_was_switched_off(tmp_path, monkeypatch):
    """Where the CPU lacks native bfloat16 the scripts run and save --bf16 False although the MuJoCo default
    is on; the grid settles that default the same way, so it still finds the run to go on from."""
    import torch

    monkeypatch.chdir(tmp_path)
    module = run.script_module("ibc")
    argv = ["--task", "reacher", "--obs", "independent", "--seed", "0", "--total-steps", "20"]
    args = module.Args(task="reacher", obs="independent", seed=0, total_steps=20)
    for key, value in module.TASK_DEFAULTS["reacher"].items():  # as main() fills them
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.bf16 = False  # what main() saves on such a CPU
    folder = Path("runs/reacher-independent-expert-mix__ibc__0__1")
    folder.mkdir(parents=True)
    torch.save({"args": asdict(args)}, folder / "model.pt")
    monkeypatch.setattr(module.data, "native_bf16", lambda cuda: False)
    assert run.unfinished_run("ibc", argv) == folder
    assert run.unfinished_run("ibc", [*argv, "--cuda"]) == folder  # begun on the CPU, it goes on on a GPU
    monkeypatch.setattr(module.data, "native_bf16", lambda cuda: True)  # there the run would have used bfloat16
    assert run.unfinished_run("ibc", argv) is None


def test_episode_stats_replays_the_final_evaluation_and_records_each_episode(small_reacher_dataset, tmp_path, capsys):
    import numpy as np

    from algos import ibc

    ibc.main(ibc.Args(task="reacher", obs="independent", dataset=small_reacher_dataset, total_steps=5, eval_episodes=3,
                      compile=False, runs_dir=str(tmp_path)))  # fmt: skip
    (run_dir,) = tmp_path.glob("*__*")
    result = json.loads((run_dir / "result.json").read_text())
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    stats = load_benchmark("episode_stats")
    out = stats.main(stats.Args(run=str(run_dir)))
    assert out["score"] == result["normalized_score"]  # the same episodes and actions as the run's own evaluation
    assert out["lengths"] == [50, 50, 50] and np.isclose(np.mean(out["returns"]), result["return"])
    assert all(0 <= d < 0.5 for d in out["tip_distance"]) and set(out["elbow"]) <= {-1, 0, 1}
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # it resumed a copy, not the run

    episodes = []  # on ant the torso's displacement too: a team that does nothing stands where it started
    ant = stats.Recorder(stats.envs.make("ant", "po"), episodes)
    ant.reset(seed=0)
    while ant.agents:
        ant.step({agent: np.zeros(2) for agent in ant.possible_agents})
    ((episode,),) = [episodes]
    assert episode["length"] == 1000 and np.linalg.norm(episode["displacement"]) < 0.5 and 900 < episode["return"] < 1001

    episodes = []  # on reacher the fingertip's final distance: the state's last two components (tip - target)
    reacher = stats.Recorder(stats.envs.make("reacher", "independent"), episodes)
    reacher.reset(seed=0)
    while reacher.agents:
        reacher.step({agent: np.full(1, 0.5) for agent in reacher.possible_agents})
    ((episode,),) = [episodes]
    assert np.isclose(episode["tip_distance"], np.linalg.norm(reacher.state()[8:10]), atol=1e-6)
    assert episode["elbow"] == 1  # both joints driven positive: the elbow ends bent to +
    # the recorded joints and links put the fingertip where the simulator has it
    (l1, l2), (q1, q2) = episode["links"], episode["joints"]
    forward = np.array([l1 * np.cos(q1) + l2 * np.cos(q1 + q2), l1 * np.sin(q1) + l2 * np.sin(q1 + q2)])
    assert np.allclose(forward - episode["target"], reacher.state()[8:10], atol=1e-6)


def test_reacher_inverse_kinematics_and_the_agents_convention():
    import numpy as np

    stats = load_benchmark("episode_stats")
    links = (0.1, 0.11)
    rng = np.random.default_rng(0)
    radius, angle = rng.uniform(0.03, 0.2, 50), rng.uniform(-np.pi, np.pi, 50)
    target = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    solutions = stats.reacher_ik(target, links)  # [2, E, 2]
    for q, sign in zip(solutions, (1, -1)):
        tip = np.stack([links[0] * np.cos(q[:, 0]) + links[1] * np.cos(q.sum(1)),
                        links[0] * np.sin(q[:, 0]) + links[1] * np.sin(q.sum(1))], axis=1)  # fmt: skip
        assert np.allclose(tip, target, atol=1e-9) and np.all(np.sign(q[:, 1]) == sign)
    far = stats.reacher_ik(np.array([[0.5, 0.0]]), links)  # out of reach: stretched towards it
    assert np.allclose(far[:, 0], 0.0)

    # agents on the + solution, then with the elbow switched to the - one's angle: they disagree
    plus, minus = solutions[0], solutions[1]
    report = stats.convention_report(target, plus + 0.01, links)
    assert report["agree"].all() and (report["nearest"] == 1).all() and np.allclose(report["joint_error"], 0.01)
    mixed = np.stack([plus[:, 0], minus[:, 1]], axis=1)
    report = stats.convention_report(target, mixed, links)
    assert not report["agree"].any() and (report["nearest"][:, 0] == 1).all() and (report["nearest"][:, 1] == -1).all()
    assert np.allclose(report["joint_error"], np.abs(stats.wrap(minus[:, 1] - plus[:, 1])))
