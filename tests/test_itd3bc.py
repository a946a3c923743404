"""algos/itd3bc.py: its formulas (what it shares with the other TD3-based scripts: test_td3_family.py)."""

import pytest
import torch

from algos import itd3bc


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
