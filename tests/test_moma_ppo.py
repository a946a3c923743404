"""Formulas of MOMA-PPO (paper section 3 and appendix A) against hand or numpy computations."""

import copy
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import envs
from algos import moma_ppo


def test_timeout_aware_gae_hand_computed():
    # gamma 0.9, lambda 0.5; columns are two rollout slots, rows the k = 3 steps.
    # Slot A: a time-out at t = 1 (the slot restarts at t = 2), a time-out at t = 2 (k reached).
    # Slot B: a terminal at t = 0 (the slot restarts at t = 1), a time-out at t = 2.
    t = lambda *rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    rewards = t([1.0, 1.0], [2.0, 0.0], [3.0, 1.0])
    values = t([0.5, 0.2], [0.6, 0.3], [0.7, 0.4])
    next_values = t([0.6, 5.0], [0.8, 0.5], [0.9, 0.6])
    masks = t([1.0, 0.0], [1.0, 1.0], [1.0, 1.0])  # 1 - terminal
    timeout_masks = t([1.0, 1.0], [0.0, 1.0], [0.0, 0.0])  # zeta
    returns, advantages = moma_ppo.timeout_aware_gae(rewards, values, next_values, masks, timeout_masks, 0.9, 0.5)
    # Slot A, t = 2: 3 + 0.9 * 0.9; t = 1: time-out, bootstrap 2 + 0.9 * 0.8 and no accumulation;
    # t = 0: 1 + 0.9 * R_1. Advantages: delta_2; delta_1 (accumulation cut); delta_0 + 0.45 A_1.
    # Slot B, t = 2: 1 + 0.9 * 0.6; t = 1: 0 + 0.9 * R_2; t = 0: terminal, no bootstrap from V' = 5.
    expected_returns = t([3.448, 1.0], [2.72, 1.386], [3.81, 1.54])
    expected_advantages = t([1.04 + 0.45 * 2.12, 0.8], [2.12, 0.15 + 0.45 * 1.14], [3.11, 1.14])
    torch.testing.assert_close(returns, expected_returns)
    torch.testing.assert_close(advantages, expected_advantages)


def test_gae_without_time_outs_is_standard_gae():
    g = torch.Generator().manual_seed(0)
    k, gamma, lam = 6, 0.99, 0.95
    rewards, values, next_values = (torch.randn(k, 3, generator=g, dtype=torch.float64) for _ in range(3))
    next_values[:-1] = values[1:]  # one uninterrupted trajectory per slot
    ones, zeta = torch.ones(k, 3, dtype=torch.float64), torch.ones(k, 3, dtype=torch.float64)
    zeta[-1] = 0
    _, advantages = moma_ppo.timeout_aware_gae(rewards, values, next_values, ones, zeta, gamma, lam)
    deltas = rewards + gamma * next_values - values
    expected = torch.stack([sum((gamma * lam) ** j * deltas[i + j] for j in range(k - i)) for i in range(k)])
    torch.testing.assert_close(advantages, expected)


def test_epistemic_uncertainty_matches_numpy():
    rng = np.random.default_rng(0)
    E, B, S = 5, 4, 3
    next_states, rewards = rng.normal(size=(E, B, S)), rng.normal(size=(E, B))
    eps_r, eps_g = moma_ppo.epistemic_uncertainty(torch.as_tensor(next_states), torch.as_tensor(rewards))
    for b in range(B):
        x = np.concatenate([next_states[:, b], rewards[:, b, None]], 1)  # [E, S + 1]
        assert eps_r[b].item() == pytest.approx(np.var(rewards[:, b], ddof=1))
        assert eps_g[b].item() == pytest.approx(np.linalg.norm(np.cov(x, rowvar=False, ddof=1), "fro"))


def test_epistemic_uncertainty_is_zero_when_members_agree():
    next_states = torch.ones(5, 2, 3)
    eps_r, eps_g = moma_ppo.epistemic_uncertainty(next_states, torch.zeros(5, 2))
    assert torch.all(eps_r == 0) and torch.all(eps_g == 0)


def _tiny_model(members=5):
    stats = dict(
        state_mean=np.zeros(2), state_std=np.ones(2), target_mean=np.zeros(3), target_std=np.ones(3),
        state_low=np.array([-1.0, -1.0]), state_high=np.array([1.0, 1.0]), reward_low=0.0, reward_high=1.0,
    )  # fmt: skip
    return moma_ppo.WorldModel(members, state_dim=2, action_dim=1, hidden=8, layers=1, stats=stats)


def test_world_model_step_votes_averages_and_clips(monkeypatch):
    model = _tiny_model()
    B = 3
    # member m predicts a state change of m / 10 in both dims, reward m (mean 2, clipped to 1)
    change = torch.arange(5.0).view(5, 1, 1).expand(5, B, 2) / 10
    reward = torch.arange(5.0).view(5, 1, 1).expand(5, B, 1)
    log_std = torch.full((5, B, 3), -30.0)  # no aleatoric noise
    logits = torch.tensor([[1.0] * B, [1.0] * B, [1.0] * B, [-1.0] * B, [-1.0] * B])  # 3 of 5 vote terminal
    logits[:, 0] *= -1  # slot 0: only 2 of 5 vote terminal
    monkeypatch.setattr(model, "forward", lambda s, a: (torch.cat([change, reward], -1), log_std, logits))
    states = torch.tensor([[0.0, 0.0], [0.9, 0.9], [-0.5, 0.2]])
    next_states, rewards, terminals, eps_r, eps_g, aleatoric = model.step(states, torch.zeros(B, 1))
    assert terminals.tolist() == [False, True, True]
    torch.testing.assert_close(rewards, torch.ones(B))  # mean 2, clipped to the dataset's max reward 1
    # the sampled next state is one member's prediction, clipped to the dataset's bounding box
    members = torch.round((next_states[0] - states[0])[0] * 10)
    assert 0 <= members <= 4
    assert torch.all(next_states <= 1.0) and torch.all(next_states >= -1.0)
    assert torch.all(next_states[1] <= 1.0)
    torch.testing.assert_close(eps_r, torch.full((B,), 2.5))  # var(0..4, ddof=1)
    assert torch.all(aleatoric < 1e-10)


def test_state_noise_scales_the_draw_around_the_chosen_members_mean(monkeypatch):
    model = _tiny_model()
    B = 400
    change = torch.arange(5.0).view(5, 1, 1).expand(5, B, 2) / 10  # member m: a state change of m / 10
    log_std = torch.full((5, B, 3), math.log(0.01))  # small enough that the bounding box never clips
    monkeypatch.setattr(model, "forward", lambda s, a: (torch.cat([change, torch.zeros(5, B, 1)], -1), log_std, torch.zeros(5, B)))
    states = torch.zeros(B, 2)

    def step(noise):
        return model.step(states, torch.zeros(B, 1), torch.Generator().manual_seed(0), noise)[0]

    exact = step(0.0)
    members = exact[:, 0] * 10
    torch.testing.assert_close(members, members.round())  # exactly one member's mean, no noise
    torch.testing.assert_close(exact[:, 0], exact[:, 1])
    assert len(members.unique()) == 5  # the member is still drawn uniformly per slot
    # the same member and standard-normal draw, scaled: the default 1 samples the member's Gaussian
    once, twice = step(1.0), step(2.0)
    assert 0.005 < (once - exact).std() < 0.02
    torch.testing.assert_close(twice - exact, 2 * (once - exact))


def test_rule_terminal_tests_the_sampled_next_state_before_the_clip(monkeypatch):
    """--terminal rule: a slot ends where the given test says of the state it moves to, not by the members'
    vote, and the test sees the state before the bounding box clips it back inside."""
    model = _tiny_model()
    B = 4
    change = torch.tensor([0.0, 0.5, 1.5, -1.5]).view(1, B, 1).expand(5, B, 2)  # the same for every member
    log_std = torch.full((5, B, 3), -30.0)
    votes = torch.ones(5, B)  # every member's head says terminal
    monkeypatch.setattr(model, "forward", lambda s, a: (torch.cat([change, torch.zeros(5, B, 1)], -1), log_std, votes))
    states, actions = torch.zeros(B, 2), torch.zeros(B, 1)
    assert model.step(states, actions)[2].all()
    next_states, _, terminals, *_ = model.step(states, actions, is_terminal=lambda s: s[:, 0].abs() > 1)
    assert terminals.tolist() == [False, False, True, True]
    assert next_states.abs().max() <= 1.0  # clipped all the same
    with pytest.raises(envs.UserInputError, match="--terminal rule needs a MuJoCo task"):
        moma_ppo.main(moma_ppo.Args(terminal="rule", **TINY_COORDINATION))


def test_learned_terminals_end_nothing_where_the_dataset_has_none(monkeypatch):
    """--terminal learned: the members' vote decides, unless the dataset holds no terminal transition (reacher's),
    where the heads could only invent terminals off the data; rule is the simulator's test either way."""
    model = _tiny_model()
    B = 4
    outputs = (torch.zeros(5, B, 3), torch.full((5, B, 3), -30.0), torch.ones(5, B))  # every head votes terminal
    monkeypatch.setattr(model, "forward", lambda s, a: outputs)
    states, actions = torch.zeros(B, 2), torch.zeros(B, 1)
    reacher = envs.make("reacher", "independent")
    with_terminals, without = np.array([0.0, 1.0, 0.0]), np.zeros(3)
    assert moma_ppo.terminal_test("learned", reacher, with_terminals) is None
    assert model.step(states, actions, is_terminal=moma_ppo.terminal_test("learned", reacher, with_terminals))[2].all()
    assert not model.step(states, actions, is_terminal=moma_ppo.terminal_test("learned", reacher, without))[2].any()
    assert moma_ppo.terminal_test("rule", reacher, with_terminals) == reacher.is_terminal


def test_aleatoric_uncertainty_is_the_largest_member_std_norm(monkeypatch):
    model = _tiny_model()
    # member m predicts a standard deviation of (m + 1) / 10 in each of the 3 outputs
    log_std = torch.log(torch.arange(1.0, 6.0) / 10).view(5, 1, 1).expand(5, 2, 3)
    monkeypatch.setattr(model, "forward", lambda s, a: (torch.zeros(5, 2, 3), log_std, torch.zeros(5, 2)))
    *_, aleatoric = model.step(torch.zeros(2, 2), torch.zeros(2, 1))
    torch.testing.assert_close(aleatoric, torch.full((2,), 0.5 * 3**0.5))


def test_penalty_is_capped_but_the_timeout_fires_from_the_threshold_on():
    from types import SimpleNamespace

    args = SimpleNamespace(lambda_r=2.0, lambda_g=1.0, l_eps=1.0, penalty="epistemic")
    eps_g = torch.tensor([0.5, 0.999, 1.0, 1.001, 7.0])
    eps_r = torch.full_like(eps_g, 0.25)
    assert moma_ppo.adaptive_timeout(eps_g, args.l_eps).tolist() == [False, False, True, True, True]
    assert not moma_ppo.adaptive_timeout(eps_g, float("inf")).any()  # l_eps = inf disables adaptive rollouts
    penalty = moma_ppo.uncertainty_penalty(eps_r, eps_g, None, args)
    torch.testing.assert_close(penalty, 0.5 + torch.tensor([0.5, 0.999, 1.0, 1.0, 1.0]))
    aleatoric = torch.tensor([0.1, 3.0, 0.0, 0.0, 0.0])
    args.penalty = "aleatoric"
    torch.testing.assert_close(moma_ppo.uncertainty_penalty(eps_r, eps_g, aleatoric, args), aleatoric)


def test_world_model_keep_selects_members():
    model = _tiny_model(members=7)
    weight = model.net[0].weight.detach().clone()
    model.keep(torch.tensor([6, 2]))
    torch.testing.assert_close(model.net[0].weight.detach(), weight[[6, 2]])
    mean, log_std, logit = model(torch.zeros(2, 4, 2), torch.zeros(2, 4, 1))
    assert mean.shape == log_std.shape == (2, 4, 3) and logit.shape == (2, 4)


def test_mixed_value_weights_are_non_negative():
    value = moma_ppo.MixedValue(3, 4, 5, 16, np.zeros(5), np.ones(5))
    obs, states = torch.randn(3, 10, 4), torch.randn(10, 5)
    mix = value.mixer(states)
    agent_values = value.agent_values(obs).squeeze(-1)
    expected = (mix[:, :3].abs() * agent_values.T).sum(-1) + mix[:, 3]
    torch.testing.assert_close(value(obs, states), expected)



def test_gaussian_policies_start_from_log_std_init():
    env = envs.make("reacher", "all-observant")
    n, o = env.n_agents, env.obs_dim
    for log_std_init in (-2.0, 0.0):
        policies = moma_ppo.GaussianPolicies(env, 16, np.zeros((n, o)), np.ones((n, o)), log_std_init=log_std_init)
        for layer in policies.net[-1:]:  # a zero last layer: the raw outputs are exactly 0
            torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)
        dist = policies.distribution(policies.features(torch.randn(n, 5, o)))
        torch.testing.assert_close(dist.stddev.log(), torch.full((n, 5, env.act_dim), log_std_init))
    with pytest.raises(envs.UserInputError, match="log-std-init"):
        moma_ppo.GaussianPolicies(env, 16, np.zeros((n, o)), np.ones((n, o)), log_std_init=1.5)

def test_rollout_histories_extend_and_restart():
    n, b, k, o = 2, 3, 4, 5
    past_obs, past_actions = torch.randn(n, b, k, o), torch.randn(n, b, k, 1)
    mask = torch.tensor([[False, False, True, True], [True] * 4, [False] * 4])
    obs, actions = torch.randn(n, b, o), torch.randn(n, b, 1)
    new_obs, new_actions, new_mask = moma_ppo.extend_history((past_obs, past_actions, mask), obs, actions)
    torch.testing.assert_close(new_obs[:, :, :-1], past_obs[:, :, 1:])
    torch.testing.assert_close(new_obs[:, :, -1], obs)
    torch.testing.assert_close(new_actions[:, :, -1], actions)
    assert new_mask.tolist() == [[False, True, True, True], [True] * 4, [False, False, False, True]]
    fresh = (torch.zeros(n, b, k, o), torch.zeros(n, b, k, 1), torch.zeros(b, k, dtype=torch.bool))
    ended = torch.tensor([False, True, False])
    kept_obs, _, kept_mask = moma_ppo.restart_history(ended, fresh, (new_obs, new_actions, new_mask))
    assert torch.all(kept_obs[:, 1] == 0) and not kept_mask[1].any()
    torch.testing.assert_close(kept_obs[:, [0, 2]], new_obs[:, [0, 2]])
    assert moma_ppo.extend_history((), obs, actions) == ()


def test_episode_start_fraction_draws_that_share_of_rollouts_from_episode_starts():
    first_rows = torch.arange(0, 50_000, 50)  # 1,000 episodes of 50 steps
    uniform = moma_ppo.draw_start_rows(20_000, 50_000, first_rows, 0.0, torch.Generator().manual_seed(0))
    # the paper's setting draws exactly as before the flag existed: one uniform draw
    torch.testing.assert_close(uniform, torch.randint(50_000, (20_000,), generator=torch.Generator().manual_seed(0)))
    assert abs((uniform % 50 == 0).float().mean().item() - 1 / 50) < 0.005
    mixed = moma_ppo.draw_start_rows(20_000, 50_000, first_rows, 0.3, torch.Generator().manual_seed(0))
    # 30% chosen among the starts, plus the 1/50 of the other 70% that are starts by chance
    assert abs((mixed % 50 == 0).float().mean().item() - (0.3 + 0.7 / 50)) < 0.01
    assert (moma_ppo.draw_start_rows(1_000, 50_000, first_rows, 1.0, None) % 50 == 0).all()


@pytest.mark.parametrize("task", list(moma_ppo.TASK_DEFAULTS))
def test_every_task_rolls_out_the_papers_2000_transitions_per_learning_step(task):
    # appendix A.2: 2,000 transitions between PPO updates; reacher's longer rollouts come with fewer of them
    defaults = moma_ppo.TASK_DEFAULTS[task]
    assert defaults["rollout_batch"] * defaults["rollout_length"] == 2000
    assert 0 <= defaults["episode_start_fraction"] <= 1


@pytest.mark.parametrize("value_memory, input_init", [("shared", "joint"), ("separate", "split")])
def test_partially_observed_run_uses_memory_and_reaches_the_value(tmp_path, value_memory, input_init):
    """Under PO the policies read a memory summary; the value network reads the same features
    (with --value-memory separate, from a memory of its own, trained at the memory's rate).
    --input-init split starts the observation's first-layer weights beyond the joint bound."""
    from data import mujoco_datasets

    path = tmp_path / "tiny.npz"
    np.savez(path, **mujoco_datasets.build("reacher", "expert-mix", size=200))
    args = moma_ppo.Args(
        task="reacher", obs="independent", dataset=str(path), total_steps=2, wm_max_steps=20, wm_eval_every=10,
        rollout_batch=8, minibatch_size=40, hidden=16, wm_hidden=16, wm_layers=1, memory_dim=8, eval_episodes=1,
        runs_dir=str(tmp_path / "runs"), compile=False, value_memory=value_memory, input_init=input_init,
    )  # fmt: skip
    moma_ppo.main(args)
    (run_dir,) = (tmp_path / "runs").glob("*__*")
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
    assert checkpoint["args"]["memory"] == 10
    assert checkpoint["policies"]["memory.soft_query"].shape == (2, 8, 1)
    assert checkpoint["value"]["agent_values.0.weight"].shape == (2, 5 + 8, 16)  # observation + memory summary
    assert ("memory.soft_query" in checkpoint["value"]) == (value_memory == "separate")
    joint_bound = 1 / math.sqrt(5 + 8)  # two learning steps move a weight by far less than the margin
    for weight in (checkpoint["policies"]["net.0.weight"], checkpoint["value"]["agent_values.0.weight"]):
        assert (weight[:, :5].abs().max() > joint_bound + 0.05) == (input_init == "split")
    groups = checkpoint["optimizer"]["param_groups"]
    assert sorted(group["lr"] for group in groups) == sorted([moma_ppo.TASK_DEFAULTS["reacher"]["learning_rate"], args.memory_learning_rate])
    memory_group = min(groups, key=lambda group: group["lr"])  # the memory learns at 1e-4, the rest at 3e-4
    assert len(memory_group["params"]) == 8 * (2 if value_memory == "separate" else 1)  # embed, qkv, norm, soft: 2 each


@pytest.mark.parametrize("mode", ["shared", "detached", "separate"])
def test_value_memory_routes_the_value_loss_gradient(mode):
    """--value-memory: the value loss trains the policies' memory only when shared; separate reads its own."""
    torch.manual_seed(0)
    env = envs.make("reacher", "independent")
    n, o, k, b = env.n_agents, env.obs_dim, 4, 6
    policies = moma_ppo.GaussianPolicies(env, 16, np.zeros((n, o)), np.ones((n, o)), memory=k, memory_dim=8)
    own = moma_ppo.Memory(n, o + env.act_dim, k, 8) if mode == "separate" else None
    value = moma_ppo.MixedValue(n, policies.feature_dim, env.state_dim, 16, np.zeros(env.state_dim), np.ones(env.state_dim), own)
    obs, states = torch.randn(n, b, o), torch.randn(b, env.state_dim)
    past = (torch.randn(n, b, k, o), torch.randn(n, b, k, env.act_dim), torch.ones(b, k, dtype=torch.bool))
    features = policies.features(obs, *past)
    value_features = moma_ppo.value_features(policies, value, mode, obs, past, features)
    torch.testing.assert_close(value_features[..., :o], features[..., :o])  # the observation part is the same
    assert torch.equal(value_features, features) == (mode != "separate")  # the summary too, unless the value's own
    value(value_features, states).square().sum().backward()
    policy_memory_grad = policies.memory.soft_query.grad
    assert (policy_memory_grad is not None and policy_memory_grad.abs().sum() > 0) == (mode == "shared")
    assert value.agent_values[0].weight.grad.abs().sum() > 0
    if mode == "separate":
        assert value.memory.soft_query.grad.abs().sum() > 0
    # without memory every mode is the plain observation features
    plain = moma_ppo.GaussianPolicies(env, 16, np.zeros((n, o)), np.ones((n, o)))
    torch.testing.assert_close(moma_ppo.value_features(plain, moma_ppo.MixedValue(n, o, env.state_dim, 16, np.zeros(env.state_dim), np.ones(env.state_dim)), mode, obs, ()), plain.features(obs))


def test_split_input_init_bounds_each_input_group_by_its_own_fan_in():
    """--input-init split: the observation's rows start as they would without memory, the summary's rows
    as a layer of their own; nn.Linear's joint bound is 1/sqrt(obs + summary) for both."""
    torch.manual_seed(0)
    layer = moma_ppo.BatchedLinear(2, 5 + 128, 256)
    joint = layer.weight.detach().clone()
    moma_ppo.split_input_init(layer, obs_dim=5)
    for rows, fan_in in ((layer.weight[:, :5], 5), (layer.weight[:, 5:], 128)):
        bound = 1 / math.sqrt(fan_in)
        assert rows.abs().max() <= bound and rows.abs().max() > 0.95 * bound  # uniform up to the bound
    assert joint.abs().max() <= 1 / math.sqrt(133) < layer.weight[:, :5].abs().max() / 4  # 5x smaller before


def test_memory_projects_the_embedded_tokens():
    """The q/k/v projection runs on the tokens through the product of both weights; it must equal
    the appendix's order: embed, add the positional encoding, then project."""
    torch.manual_seed(0)
    memory = moma_ppo.Memory(n_agents=3, token_dim=5, length=4, dim=8)
    tokens = torch.randn(3, 6, 4, 5)
    x, q, key, v = memory.project(tokens)
    embedded = memory.embed(tokens.flatten(1, 2)) + memory.position.repeat(6, 1)  # [N, B * K, E]
    torch.testing.assert_close(x, embedded.view(3, 6, 4, 8))
    torch.testing.assert_close(torch.cat([q, key, v], -1), memory.qkv(embedded).view(3, 6, 4, 24))


def test_world_model_is_cached_and_reused_with_the_same_result(tmp_path, capsys):
    args = dict(dataset="unfavorable", total_steps=2, wm_max_steps=50, wm_eval_every=25, rollout_batch=20,
                minibatch_size=100, eval_episodes=2, runs_dir=str(tmp_path))  # fmt: skip
    first = moma_ppo.main(moma_ppo.Args(**args))
    (cached,) = (tmp_path / "world_models").iterdir()
    assert "world model: saved" in capsys.readouterr().out
    time.sleep(1.1)  # run folders are named to the second
    second = moma_ppo.main(moma_ppo.Args(**args))
    assert f"world model: loaded {cached}" in capsys.readouterr().out
    assert second["return"] == first["return"]
    runs = sorted(p for p in tmp_path.iterdir() if p.name != "world_models")
    weights = [torch.load(run / "model.pt", weights_only=False)["policies"] for run in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # an explicit --world-model of the wrong task is one clear error
    from data import mujoco_datasets

    np.savez(tmp_path / "reacher.npz", **mujoco_datasets.build("reacher", "expert-mix", size=100))
    with pytest.raises(envs.UserInputError, match="maps 1-dim states"):
        moma_ppo.main(moma_ppo.Args(**{**args, "task": "reacher", "dataset": str(tmp_path / "reacher.npz"), "world_model": str(cached)}))


def test_a_run_in_another_runs_dir_reuses_the_model_cached_under_the_default_one(tmp_path, monkeypatch):
    import data

    monkeypatch.chdir(tmp_path)  # the default --runs-dir, "runs", is relative to the working directory
    args = moma_ppo.Args(task="coordination", dataset="unfavorable", runs_dir="elsewhere")
    dataset = data.load(envs.make("coordination"), "unfavorable")
    own = moma_ppo.cached_world_model_path(args, dataset)
    assert own.parent.as_posix() == "elsewhere/world_models"  # nothing cached anywhere: train into its own
    default = Path("runs", "world_models", own.name)
    default.parent.mkdir(parents=True)
    default.touch()
    assert moma_ppo.cached_world_model_path(args, dataset) == default
    own.parent.mkdir(parents=True)
    own.touch()
    assert moma_ppo.cached_world_model_path(args, dataset) == own  # its own cache comes first
    own.unlink()
    monkeypatch.setattr(moma_ppo, "SHARED_WORLD_MODELS", None)  # as benchmark/speed.py --retrain sets it
    assert moma_ppo.cached_world_model_path(args, dataset) == own


TINY_COORDINATION = dict(dataset="unfavorable", wm_max_steps=50, wm_eval_every=25, rollout_batch=20, minibatch_size=100,
                         eval_episodes=2)  # fmt: skip


def test_start_turn_turns_each_start_state_and_its_history_by_one_angle(tmp_path, monkeypatch):
    """--start-turn (ant): a rollout starts from a dataset state turned about the vertical axis by an angle within
    the bound, and the torso agent's history (observations of the states before it) is turned by the same angle."""
    from data import mujoco_datasets

    path = tmp_path / "tiny.npz"
    np.savez(path, **mujoco_datasets.build("ant", "random", size=200))

    class Stop(Exception):
        pass

    captured = {}

    def capture_starts(env, policies, model_step, sample_starts, args):
        captured["sample_starts"] = sample_starts
        raise Stop

    monkeypatch.setattr(moma_ppo, "synthetic_rollouts", capture_starts)
    args = moma_ppo.Args(
        task="ant", obs="po", dataset=str(path), start_turn=1.0, total_steps=1, wm_max_steps=10, wm_eval_every=10,
        hidden=16, wm_hidden=16, wm_layers=1, memory_dim=8, eval_episodes=1, runs_dir=str(tmp_path / "runs"), compile=False,
    )  # fmt: skip
    with pytest.raises(Stop):
        moma_ppo.main(args)
    states, (past_obs, _, mask) = captured["sample_starts"](300)
    dataset = data.load(envs.make("ant", "po"), str(path))
    rows_states = torch.as_tensor(dataset.states)
    # the joint angles (5-12) do not turn: they tell which dataset row each start was drawn from
    rows = (states[:, None, 5:13] == rows_states[None, :, 5:13]).all(-1).float().argmax(1)
    assert torch.equal(states[:, 5:13], rows_states[rows, 5:13])
    heading = envs.make("ant", "po").heading
    angle = (heading(states) - heading(rows_states[rows]) + math.pi) % (2 * math.pi) - math.pi
    assert angle.abs().max() <= 1.0 + 1e-5 and angle.min() < -0.8 and angle.max() > 0.8
    torch.testing.assert_close(states, envs.make("ant", "po").turn(rows_states[rows], angle), atol=1e-5, rtol=0)
    past_rows, expected_mask = data.history_index(torch.as_tensor(dataset.episode_first())[rows], rows, 10)
    assert torch.equal(mask, expected_mask) and mask.any()
    # agent 0 sees the torso: its observed orientation is the dataset's turned by the start's angle
    past_turn = heading(past_obs[0]) - heading(rows_states[past_rows]) - angle[:, None]  # agent 0 sees the quaternion at 1-4
    assert ((past_turn[mask] + math.pi) % (2 * math.pi) - math.pi).abs().max() < 1e-4
    for agent in (1, 2, 3):  # the others see their legs only, which no turn changes
        assert torch.equal(past_obs[agent][mask], torch.as_tensor(dataset.observations)[past_rows][mask][:, agent])


def test_start_turn_is_refused_where_the_heading_matters(tmp_path):
    args = moma_ppo.Args(total_steps=1, start_turn=0.5, runs_dir=str(tmp_path), **TINY_COORDINATION)
    with pytest.raises(envs.UserInputError, match="--start-turn"):
        moma_ppo.main(args)


def test_resume_continues_where_it_stopped(tmp_path, capsys):
    """Two steps, then two more after --resume: the same weights as four steps in one go."""
    moma_ppo.main(moma_ppo.Args(total_steps=4, runs_dir=str(tmp_path / "whole"), **TINY_COORDINATION))
    moma_ppo.main(moma_ppo.Args(total_steps=2, runs_dir=str(tmp_path / "split"), **TINY_COORDINATION))
    (split_dir,) = (tmp_path / "split").glob("*__*")
    checkpoint = torch.load(split_dir / "model.pt", weights_only=False)
    assert checkpoint["step"] == 2
    checkpoint["args"]["retired_flag"] = False  # as saved by another version of the script
    torch.save(checkpoint, split_dir / "model.pt")
    capsys.readouterr()
    result = moma_ppo.main(moma_ppo.Args(resume=str(split_dir), total_steps=4))
    printed = capsys.readouterr().out
    assert "ignoring saved settings this version does not have: {'retired_flag': False}" in printed
    assert printed.count(split_dir.name) >= 1  # the resumed run names the folder it continues
    assert result["total_steps"] == 4
    (whole_dir,) = (tmp_path / "whole").glob("*__*")
    whole, split = (torch.load(d / "model.pt", weights_only=False) for d in (whole_dir, split_dir))
    assert split["step"] == 4
    for key in ("policies", "value"):
        assert all(torch.equal(whole[key][name], split[key][name]) for name in whole[key])
    torch.testing.assert_close(whole["entropy_alpha"], split["entropy_alpha"])
    with pytest.raises(envs.UserInputError, match="nothing to resume"):
        moma_ppo.main(moma_ppo.Args(resume=str(tmp_path / "nowhere")))


def test_resume_on_another_device_reseeds_the_rollout_generator(tmp_path, capsys):
    """A checkpoint whose rollout generator state is another device's (a CUDA Philox state is 16 bytes, a
    CPU Mersenne Twister's 5,056) still resumes: the generator is reseeded, and the run says so."""
    moma_ppo.main(moma_ppo.Args(total_steps=2, runs_dir=str(tmp_path), **TINY_COORDINATION))
    (run_dir,) = tmp_path.glob("*__*")
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
    checkpoint["rng"]["generator"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(checkpoint, run_dir / "model.pt")
    result = moma_ppo.main(moma_ppo.Args(resume=str(run_dir), total_steps=3))
    assert "the saved rollout generator is another device's" in capsys.readouterr().out
    assert result["total_steps"] == 3 and torch.load(run_dir / "model.pt", weights_only=False)["step"] == 3


def test_a_diverging_world_model_stops_the_run_and_is_not_cached(tmp_path):
    args = moma_ppo.Args(total_steps=2, wm_learning_rate=1e30, runs_dir=str(tmp_path), **TINY_COORDINATION)
    with pytest.raises(data.Diverged, match="world model.*--wm-learning-rate"):
        moma_ppo.main(args)
    assert not list(tmp_path.glob("world_models/*.pt"))


def test_ground_truth_model_rolls_out_in_the_simulator(tmp_path, capsys):
    args = moma_ppo.Args(total_steps=2, ground_truth_model=True, runs_dir=str(tmp_path), **TINY_COORDINATION)
    result = moma_ppo.main(args)
    assert "real simulator" in capsys.readouterr().out
    assert result["world_model"] == "ground truth"
    assert not (tmp_path / "world_models").exists()  # no model trained
    # the coordination game's true reward is 1 when the agents agree: a team that always goes right
    # earns exactly 1 per step in the simulator's rollouts
    sims = envs.Simulators("coordination", 4)
    _, rewards, _ = sims.step(np.zeros((4, 1), dtype=np.float32), np.ones((4, 2), dtype=np.int64))
    assert rewards.tolist() == [1.0] * 4


def test_value_range_is_what_the_penalised_rewards_allow():
    rewards = np.array([-1.0, 0.5, 2.0])
    args = moma_ppo.Args(gamma=0.99, lambda_r=1.0, lambda_g=0.5, l_eps=2.0)
    low, high = moma_ppo.value_range(rewards, args)  # each penalty is capped at l_eps: at most 3 per step
    assert low == pytest.approx((-1.0 - 3.0) * 100) and high == pytest.approx(2.0 * 100)
    args.penalty = "aleatoric"  # uncapped
    assert moma_ppo.value_range(rewards, args) == (-math.inf, pytest.approx(200.0))
    args.ground_truth_model = True  # no penalty at all
    assert moma_ppo.value_range(rewards, args) == (pytest.approx(-100.0), pytest.approx(200.0))
    # the ablations without a penalty or without a cap (--l-eps inf): never NaN
    args = moma_ppo.Args(gamma=0.99, lambda_r=0.0, lambda_g=0.0, l_eps=math.inf)
    assert moma_ppo.value_range(rewards, args) == (pytest.approx(-100.0), pytest.approx(200.0))
    args.lambda_g = 1.0  # an uncapped penalty
    assert moma_ppo.value_range(rewards, args) == (-math.inf, pytest.approx(200.0))
    args.penalty, args.lambda_g = "aleatoric", 0.0
    assert moma_ppo.value_range(rewards, args) == (pytest.approx(-100.0), pytest.approx(200.0))


def test_ablation_without_penalty_or_time_out_trains(tmp_path):
    """--lambda-r 0 --lambda-g 0 --l-eps inf (Figure 8's ablations together) once made the value range NaN."""
    args = moma_ppo.Args(total_steps=3, lambda_r=0.0, lambda_g=0.0, l_eps=math.inf, runs_dir=str(tmp_path),
                         **TINY_COORDINATION)  # fmt: skip
    result = moma_ppo.main(args)
    checkpoint = torch.load(Path(result["run_dir"]) / "model.pt", weights_only=False)
    assert all(torch.isfinite(w).all() for w in checkpoint["value"].values())
    assert all(torch.isfinite(w).all() for w in checkpoint["policies"].values())


def test_anneal_lr_decays_every_learning_rate_linearly(tmp_path):
    moma_ppo.main(moma_ppo.Args(total_steps=4, anneal_lr=True, runs_dir=str(tmp_path), **TINY_COORDINATION))
    (run_dir,) = tmp_path.glob("*__*")
    (group,) = torch.load(run_dir / "model.pt", weights_only=False)["optimizer"]["param_groups"]
    assert group["lr"] == pytest.approx(moma_ppo.TASK_DEFAULTS["coordination"]["learning_rate"] / 4)  # last step: 1 - 3/4


def _one_agent(module: torch.nn.Module, agent: int, n_agents: int) -> torch.nn.Module:
    """A copy of a batched per-agent module that holds only `agent`'s weights (leading axis of length 1)."""
    copied = copy.deepcopy(module)
    for tensor in [*copied.parameters(), *copied.buffers()]:
        if tensor.dim() and tensor.shape[0] == n_agents:
            tensor.data = tensor.data[agent : agent + 1].clone()
    return copied


def test_batched_rollouts_equal_a_step_by_step_reference(tmp_path):
    """synthetic_rollouts steps all slots, agents and ensemble members at once; here every slot is replayed one
    step, one agent and one member at a time (members' weights sliced out, numpy covariance) and must agree:
    log-probabilities, penalised rewards, terminal votes, time-outs, restarts and histories."""
    from types import SimpleNamespace

    import data
    from data import mujoco_datasets

    torch.manual_seed(0)
    env = envs.make("reacher", "independent")
    path = tmp_path / "tiny.npz"
    np.savez(path, **mujoco_datasets.build("reacher", "expert-mix", size=200))
    dataset = data.load(env, str(path))
    n, members, memory, k, b = env.n_agents, 5, 3, 5, 6
    state_mean, state_std = dataset.stats("states")
    stats = dict(
        state_mean=state_mean, state_std=state_std, target_mean=np.zeros(env.state_dim + 1),
        target_std=np.full(env.state_dim + 1, 0.1), state_low=dataset.states.min(0), state_high=dataset.states.max(0),
        reward_low=dataset.rewards.min(), reward_high=dataset.rewards.max(),
    )  # fmt: skip
    model = moma_ppo.WorldModel(members, env.state_dim, n * env.act_dim, 16, 1, stats)
    with torch.no_grad():  # (almost) no aleatoric noise: a sampled next state is one member's mean
        q = env.state_dim + 1
        model.net[-1].weight[:, :, q : 2 * q] = 0.0
        model.net[-1].bias[:, :, q : 2 * q] = -30.0
    obs_mean, obs_std = dataset.stats("observations")
    policies = moma_ppo.GaussianPolicies(env, 16, obs_mean, obs_std, memory=memory, memory_dim=8)

    states_table = torch.as_tensor(dataset.states)
    episode_first = torch.as_tensor(dataset.episode_first())
    dataset_obs = torch.as_tensor(dataset.observations).transpose(0, 1)
    dataset_actions = torch.as_tensor(dataset.actions).transpose(0, 1)

    def history(idx):
        past, mask = data.history_index(episode_first[idx], idx, memory)
        return dataset_obs[:, past], dataset_actions[:, past], mask

    draws = []  # the dataset rows of every call: the first starts, then the fresh ones after each step

    def sample_starts(count):
        idx = torch.randint(len(states_table), (count,))
        draws.append(idx)
        return states_table[idx], history(idx)

    def model_step(states, actions):
        return model.step(states, policies.encode(actions.transpose(0, 1)))

    # a threshold in the middle of the model's uncertainties, so that some rollouts time out early and some do not
    probe = torch.randint(len(states_table), (200,))
    *_, probe_eps_g, _ = model.step(states_table[probe], torch.rand(200, n * env.act_dim) * 2 - 1)
    args = SimpleNamespace(
        rollout_length=k, rollout_batch=b, l_eps=probe_eps_g.median().item(), lambda_r=0.5, lambda_g=1.0,
        penalty="epistemic", bf16=False,
    )  # fmt: skip
    rollout, past, next_past = moma_ppo.synthetic_rollouts(env, policies, model_step, sample_starts, args)
    assert rollout["states"].shape == (k, b, env.state_dim) and rollout["actions"].shape == (k, n, b, env.act_dim)
    assert past[0].shape == (n, k * b, memory, env.obs_dim) and past[2].shape == (k * b, memory)

    agents = [_one_agent(policies, j, n) for j in range(n)]
    single_members = []
    for m in range(members):
        single = copy.deepcopy(model)
        single.keep(torch.tensor([m]))
        single_members.append(single)
    early_timeouts = continued = 0
    for i in range(b):
        for t in range(k):
            row, s, a = t * b + i, rollout["states"][t, i], rollout["actions"][t, :, i]  # a: [N, A]
            # where the slot stands: its first start, a fresh start after it ended, or the previous next state
            ended_before = t > 0 and (rollout["masks"][t - 1, i] == 0 or rollout["timeout_masks"][t - 1, i] == 0)
            if t == 0 or ended_before:
                start = draws[t][i : i + 1]
                torch.testing.assert_close(s, states_table[start][0])
                expected_past = history(start)
            else:
                torch.testing.assert_close(s, rollout["next_states"][t - 1, i])
                expected_past = tuple(x[:, row - b] if x.dim() > 2 else x[row - b] for x in next_past)
                expected_past = tuple(x.unsqueeze(-3 if x.dim() > 2 else 0) for x in expected_past)
            for got, expected in zip(past, expected_past):
                torch.testing.assert_close(got[:, row : row + 1] if got.dim() > 2 else got[row : row + 1], expected)
            # the history before the next state: this one's, shifted by the step just taken
            obs = env.observe(s[None]).transpose(0, 1)  # [N, 1, O]
            torch.testing.assert_close(next_past[0][:, row, -1], obs[:, 0])
            torch.testing.assert_close(next_past[0][:, row, :-1], past[0][:, row, 1:])
            torch.testing.assert_close(next_past[1][:, row, -1], a)
            assert next_past[2][row, -1] and torch.equal(next_past[2][row, :-1], past[2][row, 1:])
            # each agent alone: its own weights, its own observation and history
            for j, agent in enumerate(agents):
                agent_past = (past[0][j : j + 1, row : row + 1], past[1][j : j + 1, row : row + 1], past[2][row : row + 1])
                dist = agent.distribution(agent.features(obs[j : j + 1], *agent_past))
                torch.testing.assert_close(dist.log_prob(a[j]).view(-1), rollout["log_probs"][t, j, i], rtol=1e-4, atol=1e-4)
            # each member alone, then the ensemble statistics of section 3.1 by numpy
            encoded = a.clamp(-1, 1).reshape(1, 1, -1)
            predictions, votes = [], []
            for single in single_members:
                mean, _, logit = single(s.view(1, 1, -1), encoded)
                predictions.append((mean * model.target_std + model.target_mean)[0, 0].detach().double().numpy())
                votes.append(logit.item() > 0)
            predictions = np.stack(predictions)  # [members, S + 1]: next-state change and reward
            x = np.concatenate([s.double().numpy() + predictions[:, :-1], predictions[:, -1:]], 1)
            eps_r, eps_g = np.var(x[:, -1], ddof=1), np.linalg.norm(np.cov(x, rowvar=False, ddof=1), "fro")
            reward = np.clip(x[:, -1].mean(), stats["reward_low"], stats["reward_high"])
            penalty = args.lambda_r * min(eps_r, args.l_eps) + args.lambda_g * min(eps_g, args.l_eps)
            assert rollout["rewards"][t, i].item() == pytest.approx(reward - penalty, rel=1e-4, abs=1e-4)
            assert rollout["masks"][t, i].item() == (0.0 if sum(votes) > members / 2 else 1.0)
            timed_out = eps_g >= args.l_eps or t == k - 1
            assert rollout["timeout_masks"][t, i].item() == (0.0 if timed_out else 1.0)
            early_timeouts += eps_g >= args.l_eps and t < k - 1
            continued += not timed_out
            # the next state is one member's prediction (up to noise of std 0.1 e^-5 < 1e-3), clipped to the dataset's
            # bounding box
            clipped = np.clip(x[:, :-1], stats["state_low"], stats["state_high"])
            distances = np.abs(clipped - rollout["next_states"][t, i].double().numpy()).max(1)
            assert distances.min() < 5e-3
    assert early_timeouts and continued  # both branches of the adaptive time-out were exercised


@pytest.mark.parametrize("memory", [0, 4])
def test_separate_gradient_clipping_keeps_the_value_from_shrinking_the_policies_step(memory):
    """--clip-grad: both modes clip every parameter exactly once; with separate groups a large value gradient
    leaves the policies' gradient as it was, where joint clipping scales it down with the value's."""
    torch.manual_seed(0)
    env = envs.make("reacher", "independent")
    n, o = env.n_agents, env.obs_dim
    policies = moma_ppo.GaussianPolicies(env, 16, np.zeros((n, o)), np.ones((n, o)), memory=memory, memory_dim=8)
    value = moma_ppo.MixedValue(n, policies.feature_dim, env.state_dim, 16, np.zeros(env.state_dim), np.ones(env.state_dim))
    everything = {id(p) for p in [*policies.parameters(), *value.parameters()]}
    for mode in ("joint", "separate"):
        groups = moma_ppo.gradient_clip_groups(policies, value, [policies.memory] if memory else [], mode)
        clipped = [id(p) for group in groups for p in group]
        assert len(clipped) == len(everything) and set(clipped) == everything
        assert len(groups) == (1 if mode == "joint" else 2 + (memory > 0))
        for p in [*policies.parameters(), *value.parameters()]:
            p.grad = torch.full_like(p, 1e-4)
        for p in value.parameters():
            p.grad.fill_(10.0)  # the value's gradient norm far above 1, the policies' below it
        for group in groups:
            torch.nn.utils.clip_grad_norm_(group, 1.0)
        head_grad = policies.net[0].weight.grad
        if mode == "separate":
            torch.testing.assert_close(head_grad, torch.full_like(head_grad, 1e-4))
        else:
            assert head_grad.abs().max() < 1e-6
