"""MAIQL on continuous actions (reacher, with and without memory) and its formulas (Appendix A, eq. 1-7)."""

import math

import numpy as np
import pytest
import torch

import envs
from algos import maiql

RESULT_FIELDS = {"task", "obs", "dataset", "algo", "seed", "normalized_score", "return", "wall_seconds"}


def run(dataset: str, runs_dir, obs: str = "all-observant", **overrides) -> tuple[dict, dict]:
    # uncompiled memory: compiling takes longer than these runs (compiled: the ant PO smoke run)
    args = maiql.Args(task="reacher", obs=obs, dataset=dataset, total_steps=20, eval_episodes=2, runs_dir=str(runs_dir),
                      hidden=32, compile=False, **overrides)  # fmt: skip
    result = maiql.main(args)
    (run_dir,) = runs_dir.iterdir()
    return result, torch.load(run_dir / "model.pt", weights_only=False)


@pytest.mark.parametrize("obs", ["all-observant", "independent", "leader-only"])
def test_smoke_run_on_reacher(obs, small_reacher_dataset, tmp_path, capsys):
    result, checkpoint = run(small_reacher_dataset, tmp_path, obs)
    assert RESULT_FIELDS <= set(result)
    assert result["algo"] == "maiql" and result["task"] == "reacher" and result["obs"] == obs
    assert np.isfinite(result["normalized_score"])
    assert checkpoint["step"] == 20
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"normalized_score: {result['normalized_score']:.4f}"
    assert checkpoint["policy"]["head.log_std"].shape == (2, 1, 1)  # per agent and action dimension
    assert checkpoint["qf"]["agents.4.weight"].shape == (2, 32, 1)  # Q_i(h_i, a_i): one output
    env = envs.make("reacher", obs)
    if envs.partially_observed(env):  # memory by default, with a target copy that trails it
        assert checkpoint["args"]["memory"] == 10
        assert checkpoint["qf"]["agents.0.weight"].shape == (2, env.obs_dim + 128 + 1, 32)
        online, target = checkpoint["memory"], checkpoint["memory_target"]
        assert not torch.equal(online["embed.weight"], target["embed.weight"])
        assert torch.allclose(online["embed.weight"], target["embed.weight"], atol=1e-2)
    else:
        assert checkpoint["memory"] is None and checkpoint["qf"]["agents.0.weight"].shape == (2, env.obs_dim + 1, 32)


def test_same_seed_same_weights_on_reacher(small_reacher_dataset, tmp_path):
    checkpoints = [
        run(small_reacher_dataset, tmp_path / str(i), "independent", seed=seed, batch_size=64)[1]  # with memory
        for i, seed in enumerate([3, 3, 4])
    ]
    for part in ["policy", "qf", "vf", "memory", "memory_target"]:
        a, b, c = (checkpoint[part] for checkpoint in checkpoints)
        assert all(torch.equal(a[k], b[k]) for k in a), part
        assert not all(torch.equal(a[k], c[k]) for k in a if k.endswith("weight")), part


def test_memory_on_the_coordination_game_is_a_clear_error():
    with pytest.raises(envs.UserInputError, match="--memory needs continuous actions"):
        maiql.main(maiql.Args(memory=3, total_steps=1))


def test_expectile_loss_hand_case():
    # diff = Q - V: a positive error weighs e = 0.7, a negative one 1 - e = 0.3
    diff = torch.tensor([2.0, -1.0, 0.0])
    assert maiql.expectile_loss(diff, 0.7).item() == pytest.approx((0.7 * 4 + 0.3 * 1) / 3)
    assert maiql.expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (diff**2).mean().item())  # SARSA


def test_mixer_is_monotonic_in_every_agent_value():
    torch.manual_seed(0)
    mixer = maiql.Mixer(state_dim=3, n_agents=4, hidden=16)
    states, values = torch.randn(32, 3), torch.randn(4, 32, requires_grad=True)
    total = mixer(states, values)
    (grad,) = torch.autograd.grad(total.sum(), values)
    out = mixer.net(states)
    torch.testing.assert_close(grad, out[:, :-1].abs().T)  # d Q_tot / d Q_i = w^i(s) = |MLP(s)_i| >= 0
    torch.testing.assert_close(total, (out[:, :-1].abs().T * values).sum(0) + out[:, -1])
    assert (grad >= 0).all()


def test_gaussian_head_matches_torch_normal_and_clamps_log_std():
    torch.manual_seed(0)
    head = maiql.GaussianHead(n_agents=2, n=3)
    with torch.no_grad():
        head.log_std.copy_(torch.tensor([[[-7.0, 0.0, 0.5]], [[1.0, 3.0, -1.0]]]))  # -7 and 3 are clamped
    params, actions = torch.randn(2, 5, 3), torch.rand(2, 5, 3) * 2 - 1
    std = head.log_std.clamp(-5, 2).exp()
    expected = torch.distributions.Normal(torch.tanh(params), std).log_prob(actions).sum(-1)
    torch.testing.assert_close(head.log_prob(params, actions), expected)
    torch.testing.assert_close(head.greedy(params), torch.tanh(params))
    assert head.log_prob(params, actions).shape == (2, 5) and math.isfinite(head.log_prob(params, actions).sum().item())
