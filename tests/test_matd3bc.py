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
