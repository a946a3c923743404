"""algos/matd3bc.py: smoke runs on every reacher observation setting, determinism, and its formulas."""

import json

import numpy as np
import pytest
import torch

from algos import ibc, matd3bc

RESULT_FIELDS = {"task", "obs", "dataset", "algo", "seed", "normalized_score", "return", "eval_episodes", "total_steps"}


def run(dataset, runs_dir, obs="all-observant", **overrides) -> dict:
    args = matd3bc.Args(
        task="reacher", obs=obs, dataset=dataset, total_steps=20, eval_episodes=2, runs_dir=str(runs_dir), hidden=32,
        **overrides,
    )  # fmt: skip
    return matd3bc.main(args)


@pytest.mark.parametrize("obs", ["all-observant", "independent", "leader-only"])
def test_smoke_run_on_reacher(obs, small_reacher_dataset, tmp_path, capsys):
    result = run(small_reacher_dataset, tmp_path, obs)
    assert RESULT_FIELDS <= set(result)
    assert result["algo"] == "matd3bc" and result["obs"] == obs and np.isfinite(result["normalized_score"])
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith(f"reacher-{obs}-expert-mix-small__matd3bc__0__")
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
    with pytest.raises(matd3bc.envs.UserInputError, match="needs continuous actions"):
        matd3bc.main(matd3bc.Args(task="coordination"))


def test_td3_target_takes_the_smaller_team_twin_and_stops_at_terminals():
    q_next = torch.tensor([[1.0, 5.0, -2.0], [3.0, 4.0, -1.0]])  # [2 twins, 3 transitions]
    target = matd3bc.td3_target(q_next, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 0.0, 1.0]), gamma=0.9)
    assert torch.allclose(target, torch.tensor([0.5 + 0.9 * 1.0, 0.5, 0.5 + 0.9 * -2.0]))


def test_critics_see_the_state_and_the_joint_action():
    """Each twin is a function of (state, a_1, ..., a_N): changing one agent's action changes both twins,
    and the agents' actions enter in order (swapping them changes the value)."""
    torch.manual_seed(0)
    critics = matd3bc.TwinCritics(state_dim=4, joint_dim=2 * 3, hidden=8)
    states, actions = torch.randn(5, 4), torch.randn(2, 5, 3)
    q = critics(states, actions)
    assert q.shape == (2, 5)
    moved = actions.clone()
    moved[1, :, 0] += 1.0  # agent 1's first action component
    assert (critics(states, moved) != q).all()
    assert not torch.allclose(critics(states, actions.flip(0)), q)
    x = torch.cat([states, actions[0], actions[1]], -1)  # the joint input [B, S + N * A], agent-major
    by_hand = torch.stack([critics.net(x.unsqueeze(0).expand(2, -1, -1))[k, :, 0] for k in range(2)])
    assert torch.allclose(q, by_hand)


def test_actor_loss_is_td3bc_on_the_joint_action():
    q1 = torch.tensor([-2.0, -4.0], requires_grad=True)  # team Q_1 of 2 transitions, mean |Q_1| = 3
    pi = torch.tensor([[[0.5], [0.0]], [[0.0], [0.0]]])  # 2 agents, 2 transitions, 1 action dimension
    a = torch.tensor([[[0.0], [0.0]], [[1.0], [-1.0]]])
    loss = matd3bc.td3bc_actor_loss(q1, pi, a, alpha=2.5)
    assert loss.item() == pytest.approx(-(2.5 / 3) * -3.0 + 0.25 / 2 + (1.0 + 1.0) / 2)  # BC: agent 0 + agent 1
    loss.backward()
    assert torch.allclose(q1.grad, torch.full((2,), -2.5 / 3 / 2))  # lambda is a constant


@pytest.mark.parametrize("memory", [0, 3])
def test_actor_gradient_reaches_every_agent_and_its_memory_through_the_team_critic(memory):
    """The critic reads the state, so under partial observability only the actor loss trains the memory."""
    import envs

    torch.manual_seed(0)
    env = envs.make("reacher", "independent" if memory else "all-observant")
    ones = np.ones((2, env.obs_dim))
    policy = matd3bc.Policies(env, 16, 0 * ones, ones, memory=memory, memory_dim=8)
    critics = matd3bc.TwinCritics(env.state_dim, 2 * env.act_dim, 16)
    obs = torch.randn(2, 7, env.obs_dim)
    past = (torch.randn(2, 7, memory, env.obs_dim), torch.randn(2, 7, memory, env.act_dim), torch.ones(7, memory, dtype=torch.bool))
    pi = policy(policy.features(obs, *past) if memory else policy.features(obs))
    matd3bc.td3bc_actor_loss(critics(torch.randn(7, env.state_dim), pi)[0], pi, pi.detach(), 2.5).backward()
    for layer in [policy.net[0]] + ([policy.memory.embed] if memory else []):  # [N, in, out]: one slice per agent
        assert (layer.weight.grad.flatten(1).abs().sum(1) > 0).all()


def test_memory_is_ibc_memory():
    torch.manual_seed(0)
    ours, reference = matd3bc.Memory(2, 6, 10, 16), ibc.Memory(2, 6, 10, 16)
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
    policy = matd3bc.Policies(env, 16, obs_mean, obs_std, memory=k, memory_dim=8)
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
