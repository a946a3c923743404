"""Multi-agent environments, one entry point: `envs.make(task, obs=...)`.

Every environment follows the PettingZoo Parallel API (one dict entry per agent) and
also exposes the layout the training scripts need, as plain attributes:

    n_agents, state_dim, obs_dims (per agent), obs_dim (the widest), n_actions
    (categorical actions per agent, or None for continuous actions), act_dim,
    state(), set_state(state), obs_index and observe(states) -> per-agent observations.

`Simulators` steps a batch of copies of a task's simulator from given global states: the
ground-truth counterpart of a learned world model (MOMA-PPO-gt, MAIQL-ft's rollouts).

In every task an agent's observation is a selection of global-state components, so one
index table describes the observation function: `obs_index[i, j]` is the state component
that agent i sees in slot j, -1 for padding. Agents with fewer components than `obs_dim`
are zero-padded, so that all agents' networks can be one batched network.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


class UserInputError(ValueError):
    """A problem with what the user asked for (unknown task, malformed dataset...).

    Scripts print its message on one line and exit non-zero; the message says what to do.
    """


# task name -> (observation settings, default setting, constructor)
def _coordination(obs: str):
    from envs.coordination import CoordinationGame

    return CoordinationGame()


def _reacher(obs: str):
    from envs.reacher import TwoAgentReacher

    return TwoAgentReacher(obs)


def _ant(obs: str):
    from envs.ant import FourAgentAnt

    return FourAgentAnt(obs)


TASKS: dict[str, tuple[tuple[str, ...], str, Callable]] = {
    "coordination": (("fo",), "fo", _coordination),
    "reacher": (("all-observant", "independent", "leader-only"), "all-observant", _reacher),
    "ant": (("fo", "po"), "fo", _ant),
}


def make(task: str, obs: str | None = None):
    """Build the environment of `task` with observation setting `obs` (None: the task's default)."""
    if task not in TASKS:
        raise UserInputError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    settings, default, build = TASKS[task]
    obs = default if obs is None else obs
    if obs not in settings:
        raise UserInputError(
            f"unknown observation setting '{obs}' for task '{task}'; choose one of: {', '.join(settings)}"
        )
    env = build(obs)
    env.task, env.obs_setting = task, obs
    return env


def gather_observations(states, obs_index: np.ndarray):
    """Per-agent observations [..., N, O] of global states [..., S], for numpy arrays or torch tensors."""
    index = np.maximum(obs_index, 0)
    mask = (obs_index >= 0).astype(np.float32)
    if not isinstance(states, np.ndarray):  # a torch tensor: keep it on its device
        import torch

        index = torch.as_tensor(index, device=states.device)
        mask = torch.as_tensor(mask, device=states.device)
    return states[..., index] * mask


def stack_observations(env, obs: dict[str, np.ndarray]) -> np.ndarray:
    """A PettingZoo observation dict -> one zero-padded array [N, obs_dim]."""
    out = np.zeros((env.n_agents, env.obs_dim), dtype=np.float32)
    for i, agent in enumerate(env.possible_agents):
        out[i, : env.obs_dims[i]] = obs[agent]
    return out


def partially_observed(env) -> bool:
    """Whether some agent misses part of the global state (then the agents need memory)."""
    return any(not set(range(env.state_dim)) <= set(row) for row in env.obs_index.tolist())


def evaluate(env, policy: Callable[..., np.ndarray], episodes: int, seed: int, memory: int = 0,
             global_state: bool = False) -> np.ndarray:
    """Run `episodes` episodes of a team's policy side by side and return each team return.

    Episode e runs in its own copy of `env`, reset with seed `seed + e`, and the policy is called
    once per time step on the E episodes still running (batched, in the training scripts' layout):
    policy(obs [N, E, obs_dim]) -> actions [N, E] (categorical) or [N, E, act_dim].
    With `memory` K > 0 it also gets each agent's last K observations [N, E, K, obs_dim] and
    actions [N, E, K, ...] (oldest first) and mask [E, K], False for the steps before the
    episode started. With `global_state` (centralized execution) it gets the global states
    [E, state_dim] instead of the observations.
    """
    copies = _evaluation_copies(env, episodes)
    obs = [stack_observations(copy, copy.reset(seed=seed + e)[0]) for e, copy in enumerate(copies)]
    returns = np.zeros(episodes)
    if memory:
        action_shape = () if env.n_actions is not None else (env.act_dim,)
        past_obs = np.zeros((env.n_agents, episodes, memory, env.obs_dim), dtype=np.float32)
        past_actions = np.zeros((env.n_agents, episodes, memory, *action_shape), dtype=np.float32)
        mask = np.zeros((episodes, memory), dtype=bool)
    running = np.arange(episodes)
    while len(running):
        stacked = np.stack([obs[e] for e in running], 1)  # [N, E, O]
        if global_state:
            actions = policy(np.stack([copies[e].state() for e in running]))
        elif memory:
            actions = policy(stacked, past_obs[:, running], past_actions[:, running], mask[running])
            # shift each window by one step and append this one (oldest first)
            past_obs[:, running] = np.concatenate([past_obs[:, running, 1:], stacked[:, :, None]], 2)
            past_actions[:, running] = np.concatenate([past_actions[:, running, 1:], actions[:, :, None]], 2)
            mask[running] = np.concatenate([mask[running, 1:], np.ones((len(running), 1), dtype=bool)], 1)
        else:
            actions = policy(stacked)
        for j, e in enumerate(running):
            step_obs, rewards, _, _, _ = copies[e].step({a: actions[i, j] for i, a in enumerate(env.possible_agents)})
            returns[e] += rewards[env.possible_agents[0]]  # the reward is shared
            if copies[e].agents:
                obs[e] = stack_observations(env, step_obs)
        running = np.array([e for e in running if copies[e].agents], dtype=np.int64)
    return returns


def _evaluation_copies(env, count: int) -> list:
    """`env` and count - 1 more environments of its task and observation setting, made once and kept on `env`."""
    copies = env.__dict__.setdefault("_evaluation_copies", [env])
    while len(copies) < count:
        copies.append(make(env.task, env.obs_setting))
    return copies[:count]


class Simulators:
    """`count` copies of a task's simulator, stepped from given global states.

    `step(states, actions)` puts copy j in states[j], applies the agents' actions[j] and
    returns the next global states, rewards and terminal flags: the same interface as a
    world model's step, so that a script can swap one for the other. The dynamics of our
    tasks are deterministic given the global state: next states match an uninterrupted
    episode's to 1e-5; Ant's rewards to about 0.03 (its contact-force cost depends on the
    solver's warm start, which the state does not hold).
    Time limits are ignored: a rollout decides itself when to stop.
    """

    def __init__(self, task: str, count: int, seed: int = 0):
        self.envs = [make(task) for _ in range(count)]
        for j, env in enumerate(self.envs):
            env.reset(seed=seed + j)  # the simulators refuse to step before a first reset
        self.agents = self.envs[0].possible_agents

    def step(self, states: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global states [B, S] and per-agent actions [B, N] or [B, N, A] (B <= count) ->
        next states [B, S], rewards [B], terminals [B]."""
        if len(states) > len(self.envs):
            raise ValueError(f"{len(states)} states for {len(self.envs)} simulators")
        next_states = np.empty((len(states), self.envs[0].state_dim), dtype=np.float32)
        rewards = np.empty(len(states), dtype=np.float32)
        terminals = np.empty(len(states), dtype=bool)
        for j, (env, state, action) in enumerate(zip(self.envs, states, actions)):
            env.set_state(state)
            _, reward, terminated, _, _ = env.step({agent: action[i] for i, agent in enumerate(self.agents)})
            next_states[j], rewards[j], terminals[j] = env.state(), reward[self.agents[0]], terminated[self.agents[0]]
        return next_states, rewards, terminals
