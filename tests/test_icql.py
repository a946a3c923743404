"""algos/icql.py: smoke runs on every reacher observation setting, determinism, and its formulas."""

import json
import math

import numpy as np
import pytest
import torch

from algos import ibc, icql

RESULT_FIELDS = {"task", "obs", "dataset", "algo", "seed", "normalized_score", "return", "eval_episodes", "total_steps"}


def run(dataset, runs_dir, obs="all-observant", **overrides) -> dict:
    args = icql.Args(
        task="reacher", obs=obs, dataset=dataset, total_steps=20, eval_episodes=2, runs_dir=str(runs_dir), hidden=32,
        **overrides,
    )  # fmt: skip
    return icql.main(args)


@pytest.mark.parametrize("obs", ["all-observant", "independent", "leader-only"])
def test_smoke_run_on_reacher(obs, small_reacher_dataset, tmp_path, capsys):
    result = run(small_reacher_dataset, tmp_path, obs)
    assert RESULT_FIELDS <= set(result)
    assert result["algo"] == "icql" and result["obs"] == obs and np.isfinite(result["normalized_score"])
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith(f"reacher-{obs}-expert-mix-small__icql__0__")
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
    with pytest.raises(icql.envs.UserInputError, match="needs continuous actions"):
        icql.main(icql.Args(task="coordination"))


def test_twin_critics_score_candidates_independently_per_agent_and_twin():
    torch.manual_seed(0)
    critics = icql.TwinCritics(n_agents=3, feature_dim=4, act_dim=2, hidden=8)
    features, actions = torch.randn(3, 5, 4), torch.rand(3, 5, 6, 2) * 2 - 1  # 6 candidates per transition
    q = critics(features, actions)
    assert q.shape == (2, 3, 5, 6)
    # the split first layer is the plain MLP on [features, action]
    x = torch.cat([features.unsqueeze(2).expand(-1, -1, 6, -1), actions], -1).flatten(1, 2)
    assert torch.allclose(q, critics.net(x.repeat(2, 1, 1)).view(2, 3, 5, 6), atol=1e-6)
    assert torch.allclose(critics(features, actions, twin=False), q[0], atol=1e-6)  # Q_i1 alone
    features[1] += 1.0  # only agent 1's two critics see it
    changed = (critics(features, actions) != q).flatten(2).any(-1)
    assert changed.tolist() == [[False, True, False], [False, True, False]]
    assert not torch.equal(q[0], q[1])  # the twins are initialised independently


def test_cql_regulariser_is_the_importance_weighted_logsumexp():
    """Record what the regulariser asks the critics to score and recompute the formula by hand."""
    n, b, s, a = 2, 3, 4, 1
    seen = []

    def critics(features, actions):  # Q(o, a) = 3 a + o, different for every agent and transition
        seen.append(actions)
        return (3 * actions.sum(-1) + features[..., :1]).expand(2, -1, -1, -1)

    args = icql.Args(cql_samples=s, cql_noise=0.1, cql_temperature=0.5)
    features = torch.randn(n, b, 1)
    q_data = torch.randn(2, n, b)
    policy_now, policy_next = torch.full((n, b, a), -0.4), torch.full((n, b, a), 0.4)  # 4 sigma from the bounds
    torch.manual_seed(0)
    out = icql.cql_regulariser(critics, features, q_data, policy_now, policy_next, args)
    assert out.shape == (2, n, b)

    (sampled,) = seen
    uniform, at_o, at_next = sampled.split(s, dim=2)  # three proposals of s actions each
    assert sampled.shape == (n, b, 3 * s, a) and uniform.abs().max() <= 1
    z_now, z_next = (at_o + 0.4) / 0.1, (at_next - 0.4) / 0.1  # the standardised noise of each sample
    log_gauss = lambda z: -0.5 * z**2 - math.log(0.1 * math.sqrt(2 * math.pi))  # noqa: E731
    log_p = torch.cat([torch.full((n, b, s, a), -math.log(2)), log_gauss(z_now), log_gauss(z_next)], 2).squeeze(-1)
    q = 3 * sampled.squeeze(-1) + features
    expected = 0.5 * torch.log(torch.exp((q - log_p) / 0.5).sum(-1)) - q_data
    assert torch.allclose(out, expected, atol=1e-4)


def test_memory_is_ibc_memory():
    torch.manual_seed(0)
    ours, reference = icql.Memory(2, 6, 10, 16), ibc.Memory(2, 6, 10, 16)
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
    policy = icql.Policies(env, 16, obs_mean, obs_std, memory=k, memory_dim=8)
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
