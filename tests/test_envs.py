import numpy as np
import pytest
import torch
from pettingzoo.test import parallel_api_test

import envs


@pytest.mark.parametrize("task", list(envs.TASKS))
def test_parallel_api(task):
    for obs in envs.TASKS[task][0]:
        parallel_api_test(envs.make(task, obs), num_cycles=100)


def test_coordination_rewards_and_episode_length():
    env = envs.make("coordination")
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"agent_0", "agent_1"}
    rewards, steps = [], 0
    joint = [(0, 0), (0, 1), (1, 0), (1, 1)]
    while env.agents:
        a0, a1 = joint[steps % 4]
        _, r, term, trunc, _ = env.step({"agent_0": a0, "agent_1": a1})
        assert r["agent_0"] == r["agent_1"]
        rewards.append(r["agent_0"])
        steps += 1
    assert steps == env.horizon == 10
    assert rewards[:4] == [1.0, 0.0, 0.0, 1.0]
    assert term["agent_0"] and not trunc["agent_0"]


def test_coordination_observation_is_the_round_index():
    env = envs.make("coordination")
    obs, _ = env.reset()
    for t in range(3):
        np.testing.assert_allclose(obs["agent_0"], [t / 10])
        np.testing.assert_allclose(obs["agent_1"], [t / 10])
        np.testing.assert_allclose(envs.stack_observations(env, obs), env.observe(env.state()))
        obs, *_ = env.step({"agent_0": 0, "agent_1": 1})


def test_set_state_resumes_from_a_dataset_state():
    env = envs.make("coordination")
    env.reset()
    env.set_state(np.array([0.8], dtype=np.float32))
    steps = 0
    while env.agents:
        env.step({"agent_0": 1, "agent_1": 1})
        steps += 1
    assert steps == 2


def test_observe_is_the_same_for_numpy_and_torch():
    env = envs.make("coordination")
    states = np.random.default_rng(0).random((5, 7, env.state_dim), dtype=np.float32)
    expected = env.observe(states)
    assert expected.shape == (5, 7, env.n_agents, env.obs_dim)
    np.testing.assert_array_equal(env.observe(torch.as_tensor(states)).numpy(), expected)


def test_gather_observations_pads_with_zeros():
    states = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    obs = envs.gather_observations(states, np.array([[2, 0], [1, -1]]))
    np.testing.assert_array_equal(obs, [[[3.0, 1.0], [2.0, 0.0]]])


def test_unknown_task_and_setting():
    with pytest.raises(envs.UserInputError, match="unknown task 'nope'"):
        envs.make("nope")
    with pytest.raises(envs.UserInputError, match="unknown observation setting"):
        envs.make("coordination", "po")


def test_evaluate_returns_team_returns():
    env = envs.make("coordination")
    always_right = lambda obs: np.ones(obs.shape[:2], dtype=np.int64)  # noqa: E731, obs [N, E, O] -> [N, E]
    opposite = lambda obs: np.arange(env.n_agents)[:, None].repeat(obs.shape[1], 1)  # noqa: E731
    np.testing.assert_array_equal(envs.evaluate(env, always_right, 3, seed=0), [10, 10, 10])
    np.testing.assert_array_equal(envs.evaluate(env, opposite, 2, seed=0), [0, 0])


class Countdown:
    """A one-agent task whose episode reset with seed s lasts s % 3 + 1 steps, rewarding each action."""

    n_agents, obs_dim, n_actions, act_dim = 1, 1, 2, 1
    possible_agents = ["agent_0"]
    obs_dims = (1,)

    def reset(self, seed=None, options=None):
        self.left, self.agents = seed % 3 + 1, ["agent_0"]
        return {"agent_0": np.array([self.left], dtype=np.float32)}, {}

    def step(self, actions):
        self.left -= 1
        if not self.left:
            self.agents = []
        return {"agent_0": np.array([self.left], dtype=np.float32)}, {"agent_0": float(actions["agent_0"])}, {}, {}, {}


def test_evaluate_runs_episodes_of_different_lengths_side_by_side(monkeypatch):
    monkeypatch.setitem(envs.TASKS, "countdown", (("fo",), "fo", lambda obs: Countdown()))
    env = envs.make("countdown")
    batches = []

    def policy(obs, past_obs, past_actions, mask):
        batches.append(obs[0, :, 0].tolist())  # steps left in each running episode
        return np.ones(obs.shape[:2], dtype=np.int64) * (1 + np.arange(obs.shape[1]))  # a different action per slot

    returns = envs.evaluate(env, policy, episodes=5, seed=0, memory=2)  # lengths 1, 2, 3, 1, 2
    assert batches == [[1, 2, 3, 1, 2], [1, 2, 1], [1]]  # finished episodes leave the batch
    np.testing.assert_array_equal(returns, [1, 2 + 1, 3 + 2 + 1, 4, 5 + 3])
