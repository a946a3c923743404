"""Behaviour-policy training and MuJoCo dataset collection, on tiny budgets."""

import json

import numpy as np
import pytest
import torch

import data
import envs
from data import behaviour
from data import mujoco_datasets as mujoco


def test_running_stats_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 4))
    stats = behaviour.RunningStats(4)
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.var, x.var(0), rtol=1e-3)


def test_training_snapshots_and_resumes(tmp_path, capsys):
    common = dict(task="reacher", elbow=1, num_envs=2, num_steps=16, minibatches=2, epochs=1, hidden=16,
                  snapshot_every=64, policies_dir=str(tmp_path / "policies"))  # fmt: skip
    behaviour.main(behaviour.Args(total_steps=64, **common))
    behaviour.main(behaviour.Args(total_steps=128, **common))  # picks up the checkpoint
    assert "resuming reacher-elbow+1 at step 64" in capsys.readouterr().out
    steps = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "policies" / "reacher-elbow+1").glob("step_*.pt"))
    assert steps[0] == 0 and steps[-1] == 128
    policy = behaviour.load_policy(tmp_path / "policies" / "reacher-elbow+1" / "step_000000128.pt")
    assert policy.act(np.zeros((3, 10), dtype=np.float32)).shape == (3, 2)


def test_mirrored_reacher_team_is_the_mirror_image():
    # Reacher is symmetric about the x axis: the mirrored policy started from the mirrored
    # state produces the mirrored trajectory, so it bends its elbow the opposite way.
    torch.manual_seed(0)
    policy = behaviour.BehaviourPolicy(10, 2, 16)
    mirrored = mujoco.MirroredReacherPolicy(policy)
    env, mirror_env = envs.make("reacher"), envs.make("reacher")
    env.reset(seed=0)
    mirror_env.reset(seed=0)
    mirror_env.set_state(env.state() * mujoco.MirroredReacherPolicy.FLIP)
    for _ in range(20):
        s, ms = env.state(), mirror_env.state()
        np.testing.assert_allclose(ms, s * mujoco.MirroredReacherPolicy.FLIP, atol=1e-4)
        a = policy.act(s, deterministic=True)
        ma = mirrored.act(ms, deterministic=True)
        env.step({"agent_0": a[:1], "agent_1": a[1:]})
        mirror_env.step({"agent_0": ma[:1], "agent_1": ma[1:]})


def test_collect_writes_a_valid_dataset(monkeypatch, tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "ant"
    folder.mkdir()
    for step, ret in [(0, -50.0), (1000, 300.0), (2000, 1000.0)]:
        policy = behaviour.BehaviourPolicy(27, 8, 8)
        torch.save({"policy": policy.state_dict(), "obs_dim": 27, "act_dim": 8, "hidden": 8, "step": step,
                    "training_return": ret, "task": "ant", "elbow": 0}, folder / f"step_{step:09d}.pt")  # fmt: skip
    monkeypatch.setattr(mujoco, "POLICIES", tmp_path)
    raw = mujoco.build("ant", "full-replay", size=600)
    assert len(raw["rewards"]) == 600
    ends = raw["terminals"] | raw["timeouts"]
    assert ends[-1]
    continuing = ~ends[:-1]
    np.testing.assert_array_equal(raw["next_observations"][:-1][continuing], raw["observations"][1:][continuing])
    ds = data.to_multi_agent(raw, envs.make("ant", "po"))
    assert ds.actions.shape == (600, 4, 2) and ds.observations.shape == (600, 4, 15)
    # medium: the snapshot whose training return is nearest 80% normalized (300 of 0 -> 375)
    references = tmp_path / "references.json"
    references.write_text(json.dumps({"ant": {"random": 0.0, "expert": 375.0}}))
    monkeypatch.setattr(mujoco, "REFERENCES", references)
    chosen = []
    monkeypatch.setattr(mujoco, "collect", lambda task, policies, steps, seed, **kw: chosen.append((policies, steps)) or {})
    monkeypatch.setattr(mujoco, "load_policy", lambda p: p.name)
    mujoco.build("ant", "medium", size=10)
    mujoco.build("ant", "expert", size=10)
    assert chosen == [(["step_000001000.pt"], [10]), (["step_000002000.pt"], [10])]
    # random: step 0 with unit action noise, as D4RL's randomly initialised policies
    monkeypatch.setattr(mujoco, "load_policy", behaviour.load_policy)
    mujoco.build("ant", "random", size=10)
    (policy,), steps = chosen[-1]
    assert steps == [10] and torch.all(policy.log_std == 0)


def test_collecting_with_the_simulators_in_their_own_processes_gives_the_same_data():
    torch.manual_seed(0)
    policy = behaviour.BehaviourPolicy(27, 8, 8)
    serial = mujoco.collect("ant", [policy], [160], seed=5, num_envs=4, parallel=False)
    parallel = mujoco.collect("ant", [policy], [160], seed=5, num_envs=4, parallel=True)
    for key in serial:
        np.testing.assert_array_equal(serial[key], parallel[key], err_msg=key)


def test_reference_returns_are_measured_and_recorded(monkeypatch, tmp_path):
    folder = tmp_path / "reacher-elbow+1"
    folder.mkdir()
    for step in (0, 100):
        policy = behaviour.BehaviourPolicy(10, 2, 8)
        torch.save({"policy": policy.state_dict(), "obs_dim": 10, "act_dim": 2, "hidden": 8, "step": step,
                    "training_return": None, "task": "reacher", "elbow": 1}, folder / f"step_{step:09d}.pt")  # fmt: skip
    monkeypatch.setattr(mujoco, "POLICIES", tmp_path)
    monkeypatch.setattr(mujoco, "REFERENCES", tmp_path / "references.json")
    refs = mujoco.measure_references("reacher", episodes=10)
    assert refs["random_policy"] == "reacher-elbow+1/step_000000000.pt, greedy"
    assert refs["expert_policy"] == "reacher-elbow+1/step_000000100.pt, sampled"
    assert refs["random"] == refs["random_greedy"]  # reacher: the paper's reference is a greedy random policy
    for key in ("random_sampled", "random_greedy", "zero_actions", "expert"):
        assert -200 < refs[key] < 0  # 50 steps of -distance - control cost
    assert "reacher" in (tmp_path / "references.json").read_text()


def test_episode_returns_take_whole_episodes_equally_from_each_simulator():
    class Still:
        def act(self, obs):
            return np.zeros((len(obs), 2), dtype=np.float32)

    returns = mujoco.episode_returns("reacher", Still(), episodes=7, seed=0, num_envs=3)
    assert returns.shape == (7,) and np.all(returns < 0)


def test_normalized_score_without_references_says_what_to_do(monkeypatch):
    monkeypatch.delitem(data.REFERENCE_RETURNS, "ant", raising=False)
    with pytest.raises(envs.UserInputError, match="python -m data.mujoco_datasets --task ant"):
        data.normalized_score("ant", [0.0])
