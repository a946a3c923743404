"""algos/iomar.py: its formulas (what it shares with the other TD3-based scripts: test_td3_family.py)."""

import pytest
import torch

from algos import iomar


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
