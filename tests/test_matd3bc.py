"""algos/matd3bc.py: its formulas (what it shares with the other TD3-based scripts: test_td3_family.py)."""

import numpy as np
import pytest
import torch

from algos import matd3bc


def test_td3_target_takes_the_smaller_team_twin_and_stops_at_terminals():
    q_next = torch.tensor([[1.0, 5.0, -2.0], [3.0, 4.0, -1.0]])  # [2 twins, 3 transitions]
    target = matd3bc.td3_target(q_next, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 0.0, 1.0]), gamma=0.9)
    assert torch.allclose(target, torch.tensor([0.5 + 0.9 * 1.0, 0.5, 0.5 + 0.9 * -2.0]))


def test_critics_see_the_state_and_the_joint_action():
    """Each twin is a function of (state, a_1, ..., a_N): changing one agent's action changes both twins,
    and the agents' actions enter in order (swapping them changes the value)."""
    torch.manual_seed(0)
    critics = matd3bc.TwinCritics(n_agents=2, feature_dim=6, act_dim=3, state_dim=4, hidden=8)
    states, actions = torch.randn(5, 4), torch.randn(2, 5, 3)
    q = critics(states, None, actions)
    assert q.shape == (2, 5)
    moved = actions.clone()
    moved[1, :, 0] += 1.0  # agent 1's first action component
    assert (critics(states, None, moved) != q).all()
    assert not torch.allclose(critics(states, None, actions.flip(0)), q)
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


def test_qmix_critics_give_each_agent_a_gradient_from_its_own_inputs_only():
    """Q_k = sum_i w_k^i(s) Q_ik(f_i, a_i) + b_k(s) with w >= 0: for a fixed state, agent 0's action
    gradient does not move when agent 1's features or action change, and raising one agent's utility
    never lowers the team value."""
    torch.manual_seed(0)
    critics = matd3bc.MixedTwinCritics(n_agents=2, feature_dim=5, act_dim=3, state_dim=4, hidden=8)
    states, features = torch.randn(6, 4), torch.randn(2, 6, 5)

    def grad_of_agent_0(features, actions):
        actions = actions.clone().requires_grad_(True)
        critics(states, features, actions).sum().backward()
        return actions.grad[0]

    actions = torch.randn(2, 6, 3)
    other = features.clone(), actions.clone()
    other[0][1] += torch.randn(6, 5)
    other[1][1] += torch.randn(6, 3)
    assert torch.allclose(grad_of_agent_0(features, actions), grad_of_agent_0(*other))
    assert critics(states, features, actions).shape == (2, 6)
    mixer_out = critics.mixers(states.expand(2, -1, -1))
    q = critics.utilities(torch.cat([features, actions], -1).repeat(2, 1, 1)).view(2, 2, 6)
    by_hand = (mixer_out[..., :2].abs() * q.transpose(1, 2)).sum(-1) + mixer_out[..., 2]
    assert torch.allclose(critics(states, features, actions), by_hand)


@pytest.mark.parametrize("memory", [0, 3])
def test_actor_gradient_reaches_every_agent_and_its_memory_through_the_central_critic(memory):
    """The central critic reads the state, so under partial observability only the actor loss trains the memory."""
    import envs

    torch.manual_seed(0)
    env = envs.make("reacher", "independent" if memory else "all-observant")
    ones = np.ones((2, env.obs_dim))
    policy = matd3bc.Policies(env, 16, 0 * ones, ones, memory=memory, memory_dim=8)
    critics = matd3bc.TwinCritics(2, policy.feature_dim, env.act_dim, env.state_dim, 16)
    obs = torch.randn(2, 7, env.obs_dim)
    past = (torch.randn(2, 7, memory, env.obs_dim), torch.randn(2, 7, memory, env.act_dim), torch.ones(7, memory, dtype=torch.bool))
    pi = policy(policy.features(obs, *past) if memory else policy.features(obs))
    matd3bc.td3bc_actor_loss(critics(torch.randn(7, env.state_dim), None, pi)[0], pi, pi.detach(), 2.5).backward()
    for layer in [policy.net[0]] + ([policy.memory.embed] if memory else []):  # [N, in, out]: one slice per agent
        assert (layer.weight.grad.flatten(1).abs().sum(1) > 0).all()


def test_critic_defaults_to_qmix_under_partial_observability_and_either_can_be_chosen(small_reacher_dataset, tmp_path):
    import envs

    def run(obs, **overrides):
        args = matd3bc.Args(task="reacher", obs=obs, dataset=small_reacher_dataset, total_steps=4, eval_episodes=1,
                            hidden=16, memory_dim=8, runs_dir=str(tmp_path / f"{obs}{overrides}"), compile=False,
                            **overrides)  # fmt: skip
        assert np.isfinite(matd3bc.main(args)["normalized_score"])
        (run_dir,) = (tmp_path / f"{obs}{overrides}").iterdir()
        return torch.load(run_dir / "model.pt", weights_only=True)

    assert run("all-observant")["args"]["critic"] == "central"
    qmix = run("independent")
    assert qmix["args"]["critic"] == "qmix" and any(k.startswith("utilities.") for k in qmix["critics"])
    # with QMIX the memory is the critics' (their optimiser holds it), with the central critic the actors'
    memory_tensors = sum(k.startswith("memory.") and k != "memory.position" for k in qmix["policy"])  # a buffer
    count = lambda opt: sum(len(g["params"]) for g in opt["param_groups"])  # noqa: E731
    central = run("independent", critic="central")
    assert central["args"]["critic"] == "central" and memory_tensors > 0
    assert count(qmix["critic_optimizer"]) == len(qmix["critics"]) + memory_tensors
    assert count(central["critic_optimizer"]) == len(central["critics"])
    assert count(central["actor_optimizer"]) == count(qmix["actor_optimizer"]) + memory_tensors
    with pytest.raises(envs.UserInputError, match="central or qmix"):
        run("independent", critic="vdn")
