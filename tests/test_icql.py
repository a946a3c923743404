"""algos/icql.py: its formulas (what it shares with the other TD3-based scripts: test_td3_family.py)."""

import math

import torch

from algos import icql


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
