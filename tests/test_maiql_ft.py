"""MAIQL-ft: the replay buffer shared by the dataset and the simulator rollouts, and smoke runs."""

import numpy as np
import pytest
import torch

import data
import envs
from algos import maiql_ft
from data import mujoco_datasets


def test_rollouts_start_from_dataset_states_and_chain_their_histories(small_reacher_dataset):
    env = envs.make("reacher", "independent")
    dataset = data.load(env, small_reacher_dataset)
    T, K, b, k = len(dataset), 3, 4, 3
    torch.manual_seed(0)
    replay = maiql_ft.ReplayBuffer(env, dataset, extra=10 * b, memory=K, device=torch.device("cpu"))
    rollouts = maiql_ft.SimulatorRollouts("reacher", replay, b=b, k=k, seed=0)
    seen = []

    def random_actions(obs, past):
        assert obs.shape == (2, b, env.obs_dim) and past[0].shape == (2, b, K, env.obs_dim + 1)
        seen.append(obs)
        return torch.rand(2, b, 1) * 2 - 1

    for _ in range(10):
        rollouts.step(random_actions)
    assert replay.size == T + 10 * b
    sim = envs.Simulators("reacher", 1)
    lengths = {}
    for j in range(T, replay.size):
        previous = int(replay.history[j, -1])
        if replay.history_mask[j, -1] and previous >= T:  # the rollout goes on from the row before
            assert previous == j - b  # rows come b at a time, one per rollout
            torch.testing.assert_close(replay.states[j], replay.next_states[previous])
            assert replay.history[j, :-1].tolist() == replay.history[previous, 1:].tolist()
            lengths[j] = lengths[previous] + 1
        else:  # a rollout's first step: a dataset state with its dataset history
            # (episodes reset with the same seed share their first state: any of those rows will do)
            starts = torch.nonzero((replay.states[:T] == replay.states[j]).all(1)).flatten()
            mask = replay.history_mask[j]
            assert any(
                replay.history_mask[r].tolist() == mask.tolist() and torch.equal(replay.history[r][mask], replay.history[j][mask])
                for r in starts
            )
            lengths[j] = 1
        assert lengths[j] <= k
        # the stored transition is the simulator's
        raw = replay.states[j] * torch.as_tensor(replay.state_std) + torch.as_tensor(replay.state_mean)
        action = replay.actions[:, j].numpy()[None]
        next_state, reward, _ = sim.step(raw.numpy()[None], action)
        raw_next = replay.next_states[j].numpy() * replay.state_std + replay.state_mean
        np.testing.assert_allclose(next_state[0], raw_next, atol=1e-4)
        assert reward[0] == pytest.approx(replay.rewards[j].item(), abs=1e-4)
    assert max(lengths.values()) == k  # rollouts are cut at k steps
    # the policy saw what the buffer stored
    torch.testing.assert_close(torch.cat(seen, 1), replay.observations[:, T:].transpose(0, 1).reshape(10, b, 2, -1)
                               .permute(2, 0, 1, 3).reshape(2, 10 * b, -1))  # fmt: skip


@pytest.mark.parametrize("task, obs", [("reacher", "all-observant"), ("reacher", "independent"), ("reacher", "leader-only"),
                                       ("ant", "fo"), ("ant", "po")])  # fmt: skip
def test_smoke_run_collects_as_many_online_transitions_as_offline(task, obs, small_reacher_dataset, tmp_path, monkeypatch):
    if task == "ant":  # 400 transitions of ant random: the step-0 snapshot
        path = tmp_path / "ant-small.npz"
        np.savez(path, **mujoco_datasets.build("ant", "random", size=400))
        dataset = str(path)
    else:
        dataset = small_reacher_dataset
    args = maiql_ft.Args(task=task, obs=obs, dataset=dataset, total_steps=20, eval_episodes=1, hidden=32,
                         rollout_batch=16, runs_dir=str(tmp_path / "runs"), compile=task == "ant")  # fmt: skip
    result = maiql_ft.main(args)
    assert result["algo"] == "maiql_ft" and result["obs"] == obs
    assert np.isfinite(result["normalized_score"]) and np.isfinite(result["offline_normalized_score"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
    assert 400 <= checkpoint["online_transitions"] < 400 + 16
    assert (checkpoint["memory"] is not None) == envs.partially_observed(envs.make(task, obs))


def test_a_run_stopped_during_fine_tuning_resumes_where_it_stopped(small_reacher_dataset, tmp_path, monkeypatch):
    """Stopped (as by SIGTERM) at step 14 of 20, in the fine-tuning phase, and resumed: the same weights,
    optimiser states and online data as 20 steps in one go (with memory, so the rollouts' histories too)."""
    import contextlib

    args = dict(task="reacher", obs="independent", dataset=small_reacher_dataset, total_steps=20, eval_episodes=1,
                hidden=16, memory_dim=8, rollout_batch=16, compile=False)  # fmt: skip
    whole = maiql_ft.main(maiql_ft.Args(runs_dir=str(tmp_path / "whole"), **args))

    class StopAtStep14(list):  # the loop asks `if stop` twice per step
        checks = 0

        def __bool__(self):
            self.checks += 1
            return self.checks > 2 * 13

    with monkeypatch.context() as patch:
        patch.setattr(data, "stop_requests", contextlib.contextmanager(lambda: (yield StopAtStep14())))
        with pytest.raises(data.Stopped, match="stopped at step 14; go on with: python algos/maiql_ft.py --resume"):
            maiql_ft.main(maiql_ft.Args(runs_dir=str(tmp_path / "split"), **args))
    (run_dir,) = (tmp_path / "split").iterdir()
    stopped = torch.load(run_dir / "model.pt", weights_only=True)
    assert stopped["step"] == 14 and 0 < stopped["online_transitions"] < 400  # half-way through fine-tuning
    with pytest.raises(envs.UserInputError, match="resume without --total-steps"):
        maiql_ft.main(maiql_ft.Args(resume=str(run_dir), total_steps=30))
    resumed = maiql_ft.main(maiql_ft.Args(resume=str(run_dir)))
    assert resumed["run_dir"] == str(run_dir)
    assert resumed["offline_normalized_score"] == whole["offline_normalized_score"]
    a, b = (torch.load(r + "/model.pt", weights_only=True) for r in (whole["run_dir"], resumed["run_dir"]))
    assert a["step"] == b["step"] == 20 and a["online_transitions"] == b["online_transitions"]
    for key in ("qf", "qf_target", "vf", "policy", "memory", "memory_target", "q_optimizer", "policy_optimizer",
                "memory_optimizer", "online_rows", "rollouts"):  # fmt: skip
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
