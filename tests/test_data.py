import time

import numpy as np
import pytest

import data
import envs
from data import coordination


@pytest.fixture(scope="module")
def env():
    return envs.make("coordination")


@pytest.mark.parametrize("name", list(coordination.BEHAVIOUR))
def test_coordination_datasets_match_table_1(env, name):
    ds = data.load(env, name)
    p0, p1 = coordination.BEHAVIOUR[name]
    assert len(ds) == 10_000
    # behaviour policies: P(agent goes right) within 3 standard errors of 10k draws
    np.testing.assert_allclose(ds.actions.mean(0), [p0, p1], atol=0.015)
    # the dataset's average score (mean reward per round), paper Table 1
    assert abs(ds.rewards.mean() - coordination.PAPER_AVERAGE_SCORE[name]) < 0.015
    assert abs(data.normalized_score("coordination", ds.episode_returns()) - ds.rewards.mean()) < 1e-6


def test_layout(env):
    ds = data.load(env, "neutral")
    T = len(ds)
    assert ds.states.shape == ds.next_states.shape == (T, env.state_dim)
    assert ds.observations.shape == ds.next_observations.shape == (T, env.n_agents, env.obs_dim)
    assert ds.actions.shape == (T, env.n_agents) and ds.actions.dtype == np.int64
    assert ds.rewards.shape == ds.terminals.shape == ds.timeouts.shape == ds.episode_starts.shape == (T,)
    # 10-round episodes: a start every 10 steps, a terminal at every 10th step
    assert ds.episode_starts.sum() == ds.terminals.sum() == T // 10
    assert np.all(np.flatnonzero(ds.episode_starts) % 10 == 0)
    np.testing.assert_allclose(ds.states[ds.episode_starts], 0.0)
    np.testing.assert_allclose(ds.next_states[:-1][~ds.terminals[:-1]], ds.states[1:][~ds.terminals[:-1]])
    assert len(ds.episode_returns()) == T // 10


def test_generation_is_deterministic():
    a, b = coordination.build("unfavorable", episodes=50, seed=3), coordination.build("unfavorable", episodes=50, seed=3)
    c = coordination.build("unfavorable", episodes=50, seed=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["actions"], c["actions"])


def test_stats_leave_constant_components_unscaled(env):
    ds = data.load(env, "favorable")
    mean, std = ds.stats("observations")
    assert mean.shape == std.shape == (env.n_agents, env.obs_dim)
    np.testing.assert_allclose(mean, 0.45, atol=1e-5)
    ds.observations[..., 0] = 3.0
    assert np.all(ds.stats("observations")[1] == 1.0)


def _write(tmp_path, **changes):
    raw = coordination.build("neutral", episodes=20)
    raw.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del raw[key]
    path = tmp_path / "custom.npz"
    np.savez(path, **raw)
    return str(path)


def test_loads_a_file_by_path(env, tmp_path):
    ds = data.load(env, _write(tmp_path))
    assert len(ds) == 200


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rewards=None), "missing rewards"),
        (dict(rewards=np.zeros(199, dtype=np.float32)), "different lengths"),
        (dict(rewards=np.full(200, np.nan, dtype=np.float32)), "NaN or infinite values in 'rewards'"),
        (dict(observations=np.zeros((200, 3), dtype=np.float32)), "observations of shape"),
        (dict(actions=np.full((200, 2), 2)), "actions of shape"),
        (dict(actions=np.zeros((200, 3), dtype=np.int64)), "actions of shape"),
    ],
)
def test_rejects_malformed_files(env, tmp_path, changes, message):
    with pytest.raises(envs.UserInputError, match=message):
        data.load(env, _write(tmp_path, **changes))


def test_rejects_unknown_names_and_missing_files(env, tmp_path):
    with pytest.raises(envs.UserInputError, match="unknown dataset 'nope'"):
        data.load(env, "nope")
    with pytest.raises(envs.UserInputError, match="does not exist"):
        data.load(env, str(tmp_path / "missing.npz"))
    (tmp_path / "garbage.npz").write_text("not a zip file")
    with pytest.raises(envs.UserInputError, match="cannot read"):
        data.load(env, str(tmp_path / "garbage.npz"))


def test_reads_a_d4rl_ant_hdf5_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    env = envs.make("ant", "po")
    rng = np.random.default_rng(0)
    T = 30
    observations = rng.normal(size=(T + 1, 111)).astype(np.float32)  # D4RL ant: 27 dims + contact forces
    actions = rng.uniform(-1, 1, size=(T, 8)).astype(np.float32)
    with h5py.File(tmp_path / "ant-medium-v2.hdf5", "w") as f:
        f["observations"], f["next_observations"] = observations[:-1], observations[1:]
        f["actions"], f["rewards"] = actions, rng.normal(size=T).astype(np.float32)
        f["terminals"], f["timeouts"] = np.zeros(T, bool), np.arange(T) == T - 1
        f.create_group("infos")["qpos"] = np.zeros((T, 15))  # groups are ignored
    ds = data.load(env, str(tmp_path / "ant-medium-v2.hdf5"))
    np.testing.assert_array_equal(ds.states, observations[:-1, :27])
    np.testing.assert_array_equal(ds.actions[:, 0], actions[:, [2, 3]])  # agent 0 drives the front-left leg
    assert ds.observations.shape == (T, 4, 15)
    np.testing.assert_array_equal(ds.observations[:, 1, :4], observations[:-1, [7, 8, 21, 22]])


def test_reads_a_local_minari_dataset(tmp_path):
    h5py = pytest.importorskip("h5py")
    env = envs.make("reacher", "independent")
    rng = np.random.default_rng(0)
    folder = tmp_path / "mujoco" / "reacher" / "expert-v0"
    (folder / "data").mkdir(parents=True)
    lengths = [5, 3]
    with h5py.File(folder / "data" / "main_data.hdf5", "w") as f:
        for i, T in enumerate(lengths):
            episode = f.create_group(f"episode_{i}")
            episode["observations"] = rng.normal(size=(T + 1, 10)).astype(np.float32)  # one more than actions
            episode["actions"] = rng.uniform(-1, 1, size=(T, 2)).astype(np.float32)
            episode["rewards"] = rng.normal(size=T)
            episode["terminations"] = np.zeros(T, bool)
            episode["truncations"] = np.arange(T) == T - 1
        first = f["episode_0"]["observations"][()]
    ds = data.load(env, str(folder))
    assert len(ds) == sum(lengths)
    np.testing.assert_array_equal(ds.states[:5], first[:-1])
    np.testing.assert_array_equal(ds.next_states[:5], first[1:])
    assert ds.episode_starts.tolist() == [True, False, False, False, False, True, False, False]
    assert ds.observations.shape == (8, 2, 5)


def test_new_run_dir_gives_every_caller_its_own_folder(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: data.new_run_dir(tmp_path / "runs", "task__algo__0__1"), range(8)))
    assert len(set(folders)) == 8 and all(f.is_dir() for f in folders)
    assert {f.name for f in folders} == {"task__algo__0__1"} | {f"task__algo__0__1-{i}" for i in range(2, 9)}


def test_stop_requests_collects_signals_and_restores_the_handlers():
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with data.stop_requests() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


def test_resume_reads_the_saved_settings_keeps_a_new_budget_and_drops_unknown_ones(tmp_path, capsys):
    import dataclasses

    import torch

    @dataclasses.dataclass
    class Args:
        total_steps: int | None = None
        seed: int = 0
        resume: str | None = None
        cuda: bool = False

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = {"total_steps": 10, "seed": 7, "resume": None, "cuda": True, "old_flag": 1}
    data.save_checkpoint(run_dir, {"args": saved, "step": 5})
    assert not (run_dir / "model.pt.tmp").exists()
    args, folder, checkpoint = data.resume(Args(resume=str(run_dir)))
    assert (args.total_steps, args.seed, args.resume, folder, checkpoint["step"]) == (10, 7, str(run_dir), run_dir, 5)
    assert "old_flag" in capsys.readouterr().out
    assert not args.cuda  # started with --cuda, resumed without it: the device is the new command's
    args, _, _ = data.resume(Args(resume=str(run_dir / "model.pt"), total_steps=20, cuda=True))
    assert args.total_steps == 20 and args.seed == 7 and args.cuda
    with pytest.raises(envs.UserInputError, match="nothing to resume"):
        data.resume(Args(resume=str(tmp_path / "nowhere")))
    state = data.rng_state()
    first = torch.rand(3)
    data.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


@pytest.mark.filterwarnings("error")  # a loss that requires grad is read without torch's warning
def test_progress_prints_a_line_at_most_every_interval_with_speed_time_left_and_values(monkeypatch, capsys):
    import torch

    clock = [1000.0]
    monkeypatch.setattr(data.time, "time", lambda: clock[0])
    progress = data.Progress(total_steps=10_000, start_step=4_000, seconds=60)
    for now, step in ((1030.0, 4_100), (1100.0, 4_200), (1150.0, 4_300), (1200.0, 4_400)):
        clock[0] = now
        progress(step, loss=torch.tensor(0.123456, requires_grad=True) * 1, rate=2)
    lines = capsys.readouterr().out.splitlines()
    # 30 s: too early; 100 s: 200 steps since the start (resumed at 4,000) -> 2 steps/s, 5,800 steps left = 48 min;
    # 150 s: 50 s after the last line; 200 s: 400 steps in 200 s, 5,600 steps left = 47 min
    assert lines == [
        "step 4,200/10,000: 2 steps/s, 48 min left, loss 0.1235, rate 2",
        "step 4,400/10,000: 2 steps/s, 47 min left, loss 0.1235, rate 2",
    ]


def test_progress_stops_a_run_whose_numbers_are_no_longer_finite():
    import torch

    progress = data.Progress(total_steps=1_000, seconds=3600)  # no line due: the check runs on every call
    progress(100, q_loss=torch.tensor(2.0, requires_grad=True) * 1, online=5)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(data.Diverged, match=f"q_loss became {bad} by step 200: training diverged; try a smaller --learning-rate"):
            progress(200, q_loss=torch.tensor(bad), online=5)
    assert issubclass(data.Diverged, envs.UserInputError)  # the scripts print it on one line, without a traceback


def test_compile_in_place_says_why_not_without_a_cpp_compiler(monkeypatch, capsys):
    import torch

    module = torch.nn.Linear(2, 2)
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    data.compile_in_place(module, device=torch.device("cpu"))
    assert "no C++ compiler" in capsys.readouterr().out
    assert module._compiled_call_impl is None  # left as it was
    data.compile_in_place(module, device=torch.device("cuda"))  # the GPU compiles without one
    assert module._compiled_call_impl is not None


@pytest.mark.parametrize("capabilities, native", [({"amx_bf16": True}, True), ({"avx512_bf16": True}, True),
                                                   ({"amx_bf16": False, "avx512_bf16": False, "avx512_f": True}, False)])  # fmt: skip
def test_bfloat16_autocast_only_where_the_cpu_has_native_bfloat16_matmuls(monkeypatch, capsys, capabilities, native):
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert data.native_bf16(cuda=False) is native
    assert data.bf16_if_native(True, cuda=False) is native
    note = capsys.readouterr().out
    assert ("no native bfloat16" in note) is (not native) and ("--bf16" in note) is (not native)
    assert data.bf16_if_native(False, cuda=False) is False  # never switched on
    assert capsys.readouterr().out == ""
