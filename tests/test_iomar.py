"""algos/iomar.py: smoke runs on every reacher observation setting, determinism, and its formulas."""

import json

import numpy as np
import pytest
import torch

from algos import ibc, iomar

RESULT_FIELDS = {"task", "obs", "dataset", "algo", "seed", "normalized_score", "return", "eval_episodes", "total_steps"}


def run(dataset, runs_dir, obs="all-observant", **overrides) -> dict:
    args = iomar.Args(
        task="reacher", obs=obs, dataset=dataset, total_steps=20, eval_episodes=2, runs_dir=str(runs_dir), hidden=32,
        **overrides,
    )  # fmt: skip
    return iomar.main(args)


@pytest.mark.parametrize("obs", ["all-observant", "independent", "leader-only"])
def test_smoke_run_on_reacher(obs, small_reacher_dataset, tmp_path, capsys):
    result = run(small_reacher_dataset, tmp_path, obs)
    assert RESULT_FIELDS <= set(result)
    assert result["algo"] == "iomar" and result["obs"] == obs and np.isfinite(result["normalized_score"])
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith(f"reacher-{obs}-expert-mix-small__iomar__0__")
    assert json.loads((run_dir / "result.json").read_text()) == result
    assert list(run_dir.glob("events.out.tfevents.*"))
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    assert checkpoint["step"] == 20
    assert checkpoint["args"]["memory"] == (0 if obs == "all-observant" else 10)
    assert checkpoint["args"]["cql_alpha"] == 1.0
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
    with pytest.raises(iomar.envs.UserInputError, match="needs continuous actions"):
        iomar.main(iomar.Args(task="coordination"))


def test_search_finds_each_agents_best_action_or_keeps_the_policys():
    """Batched over agents, transitions and samples: each agent searches its own critic."""
    optimum = torch.tensor([0.3, -0.7])  # agent i's Q_i1(o, a) = -(a - optimum_i)^2, the same at every o
    calls = []

    def critics(features, actions, twin=True):
        assert not twin  # the search scores with Q_i1 only
        calls.append(actions.shape)
        return -(actions.squeeze(-1) - optimum[:, None, None]).square()

    args = iomar.Args()  # the paper's 2 iterations, mu 0, sigma 2, 20 samples, 5 elites
    b = 1000
    policy_actions = torch.full((2, b, 1), -1.0)
    policy_actions[:, : b // 2, 0] = optimum[:, None]  # half of the transitions: the policy is already optimal
    q_policy = critics(None, policy_actions.unsqueeze(2), twin=False).squeeze(-1)
    calls.clear()
    torch.manual_seed(0)
    a_hat = iomar.search_actions(critics, torch.zeros(2, b, 3), policy_actions, q_policy, args)
    assert calls == [(2, b, 20, 1)] * 2  # one batched call per iteration
    assert a_hat.shape == (2, b, 1)
    assert torch.equal(a_hat[:, : b // 2], policy_actions[:, : b // 2])  # the policy wins where it is best
    distance = (a_hat[:, b // 2 :, 0] - optimum[:, None]).abs()  # two iterations: a coarse search
    assert distance.median() < 0.05 and (distance < 0.5).float().mean() > 0.98  # around each agent's own optimum
    assert (critics(None, a_hat.unsqueeze(2), twin=False).squeeze(-1) >= q_policy).all()  # never worse than pi


def test_search_keeps_the_last_elites_in_the_running():
    """A second iteration that only samples worse actions cannot lose the first iteration's best."""
    args = iomar.Args(omar_samples=20, omar_elites=5, omar_iters=2)

    def critics(features, actions, twin=True):  # Q rises with a: the first draw, with sigma 2, often reaches 1
        return actions.squeeze(-1)

    torch.manual_seed(0)
    policy_actions = torch.full((1, 500, 1), -1.0)
    a_hat = iomar.search_actions(critics, None, policy_actions, policy_actions.squeeze(-1), args)
    # after one iteration the elites sit at 1 wherever a sample was clipped there (P = 1 - 0.69^20), so their
    # std is 0 and the second iteration's samples equal them: a_hat is 1 (nearly) everywhere
    assert (a_hat == 1.0).float().mean() > 0.99


def test_actor_loss_with_coefficient_one_is_a_pure_regression_onto_a_hat():
    q_policy = torch.tensor([[-2.0, -4.0], [1.0, 3.0]], requires_grad=True)  # [N, B]
    policy_actions = torch.tensor([[[0.5], [0.0]], [[0.0], [0.2]]], requires_grad=True)
    a_hat = torch.tensor([[[0.5], [1.0]], [[0.0], [0.2]]])  # agent 0: the search won on transition 1
    loss, rectification = iomar.omar_actor_loss(q_policy, policy_actions, a_hat, coef=1.0, action_penalty=1e-3)
    # agent 0: (0 + 1) / 2 + 1e-3 * 0.25 / 2; agent 1: 0 + 1e-3 * 0.04 / 2
    assert loss.item() == pytest.approx(0.5 + 1e-3 * 0.125 + 1e-3 * 0.02)
    assert rectification.item() == pytest.approx(0.25)
    loss.backward()
    assert torch.equal(q_policy.grad, torch.zeros(2, 2))  # Q enters only through the search
    assert torch.allclose(policy_actions.grad[0, :, 0], torch.tensor([1e-3 * 0.5, -1.0]))  # 2 (pi - a_hat) / 2

    # coefficient 0.5: half the regression, half -mean Q (not normalised)
    loss, _ = iomar.omar_actor_loss(q_policy, policy_actions, a_hat, coef=0.5, action_penalty=0.0)
    assert loss.item() == pytest.approx(0.5 * (3.0 - 2.0) + 0.5 * 0.5)


def test_memory_is_ibc_memory():
    torch.manual_seed(0)
    ours, reference = iomar.Memory(2, 6, 10, 16), ibc.Memory(2, 6, 10, 16)
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
    policy = iomar.Policies(env, 16, obs_mean, obs_std, memory=k, memory_dim=8)
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
