"""algos/itd3bc.py: smoke runs on every reacher observation setting, determinism, and its formulas."""

import json

import numpy as np
import pytest
import torch

from algos import ibc, itd3bc

RESULT_FIELDS = {"task", "obs", "dataset", "algo", "seed", "normalized_score", "return", "eval_episodes", "total_steps"}


def run(dataset, runs_dir, obs="all-observant", **overrides) -> dict:
    args = itd3bc.Args(
        task="reacher", obs=obs, dataset=dataset, total_steps=20, eval_episodes=2, runs_dir=str(runs_dir), hidden=32,
        **overrides,
    )  # fmt: skip
    return itd3bc.main(args)


@pytest.mark.parametrize("obs", ["all-observant", "independent", "leader-only"])
def test_smoke_run_on_reacher(obs, small_reacher_dataset, tmp_path, capsys):
    result = run(small_reacher_dataset, tmp_path, obs)
    assert RESULT_FIELDS <= set(result)
    assert result["algo"] == "itd3bc" and result["obs"] == obs and np.isfinite(result["normalized_score"])
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith(f"reacher-{obs}-expert-mix-small__itd3bc__0__")
    assert json.loads((run_dir / "result.json").read_text()) == result
    assert list(run_dir.glob("events.out.tfevents.*"))
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    assert checkpoint["step"] == 20
    assert checkpoint["args"]["memory"] == (0 if obs == "all-observant" else 10)
    assert any(k.startswith("memory.") for k in checkpoint["policy_target"]) == (obs != "all-observant")
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"normalized_score: {result['normalized_score']:.4f}"


def test_same_seed_same_weights(small_reacher_dataset, tmp_path):
    checkpoints = []
    for i, seed in enumerate([3, 3, 4]):
        run(small_reacher_dataset, tmp_path / str(i), "independent", seed=seed)  # with memory
        (run_dir,) = (tmp_path / str(i)).iterdir()
        checkpoints.append(torch.load(run_dir / "model.pt", weights_only=True))
    for key in ("policy", "critics_target"):
        first, again, other = (c[key] for c in checkpoints)
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert not all(torch.equal(first[k], other[k]) for k in first if k.endswith("weight"))


def test_coordination_game_is_refused():
    with pytest.raises(itd3bc.envs.UserInputError, match="needs continuous actions"):
        itd3bc.main(itd3bc.Args(task="coordination"))


def test_td3_target_takes_the_smaller_twin_and_stops_at_terminals():
    q_next = torch.tensor([[[1.0, 5.0, -2.0]], [[3.0, 4.0, -1.0]]])  # [2 twins, 1 agent, 3 transitions]
    target = itd3bc.td3_target(q_next, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 0.0, 1.0]), gamma=0.9)
    assert torch.allclose(target, torch.tensor([[0.5 + 0.9 * 1.0, 0.5, 0.5 + 0.9 * -2.0]]))


def test_actor_loss_scales_q_by_a_constant_lambda_per_agent():
    # agent 0: Q = -2, -4 (mean |Q| 3), agent 1: Q = 1, 1 (mean |Q| 1); one action dimension
    q1 = torch.tensor([[-2.0, -4.0], [1.0, 1.0]], requires_grad=True)
    pi = torch.tensor([[[0.5], [0.0]], [[0.0], [0.0]]])
    a = torch.tensor([[[0.0], [0.0]], [[1.0], [-1.0]]])
    loss = itd3bc.td3bc_actor_loss(q1, pi, a, alpha=2.5)
    # agent 0: -(2.5 / 3) * -3 + 0.25 / 2; agent 1: -2.5 * 1 + 1
    assert loss.item() == pytest.approx(2.5 + 0.125 - 2.5 + 1.0)
    loss.backward()
    # lambda is a constant: dL/dQ_i = -lambda_i / B (with a gradient through lambda, agent 0's would be 0)
    assert torch.allclose(q1.grad, torch.tensor([[-2.5 / 3 / 2] * 2, [-2.5 / 2] * 2]))


def test_twin_critics_are_independent_per_agent_and_twin():
    torch.manual_seed(0)
    critics = itd3bc.TwinCritics(n_agents=3, feature_dim=4, act_dim=2, hidden=8)
    features, actions = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    q = critics(features, actions)
    assert q.shape == (2, 3, 5)
    features[1] += 1.0  # only agent 1's two critics see it
    changed = (critics(features, actions) != q).any(-1)
    assert changed.tolist() == [[False, True, False], [False, True, False]]
    assert not torch.equal(q[0], q[1])  # the twins are initialised independently


def test_memory_is_ibc_memory():
    torch.manual_seed(0)
    ours, reference = itd3bc.Memory(2, 6, 10, 16), ibc.Memory(2, 6, 10, 16)
    reference.load_state_dict(ours.state_dict())
    tokens, mask = torch.randn(2, 4, 10, 6), torch.rand(4, 10) > 0.3
    assert torch.equal(ours(tokens, mask), reference(tokens, mask))


def test_act_normalises_like_training():
    """policy.act on raw inputs (as envs.evaluate passes them) equals the training path on normalised ones."""
    import envs

    torch.manual_seed(0)
    env = envs.make("reacher", "independent")
    n, o, k = env.n_agents, env.obs_dim, 10
    obs_mean, obs_std = np.random.randn(n, o).astype(np.float32), np.random.rand(n, o).astype(np.float32) + 0.5
    policy = itd3bc.Policies(env, 16, obs_mean, obs_std, memory=k, memory_dim=8)
    e = 3  # episodes side by side, as envs.evaluate passes them
    obs, past_obs = np.random.randn(n, e, o).astype(np.float32), np.random.randn(n, e, k, o).astype(np.float32)
    past_actions = np.random.rand(n, e, k, env.act_dim).astype(np.float32)
    mask = np.arange(k)[None] >= np.array([[4], [0], [9]])  # [E, K]: 6, 10 and 1 steps of past
    acted = policy.act(obs, past_obs, past_actions, mask)
    obs_n = torch.as_tensor((obs - obs_mean[:, None]) / obs_std[:, None])  # [N, E, O]
    past_n = torch.as_tensor((past_obs - obs_mean[:, None, None]) / obs_std[:, None, None])  # [N, E, K, O]
    features = policy.features(obs_n, past_n, torch.as_tensor(past_actions), torch.as_tensor(mask))
    assert acted.shape == (n, e, env.act_dim)
    assert np.allclose(acted, policy(features).detach().numpy(), atol=1e-6)
