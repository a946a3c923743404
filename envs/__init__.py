"""Multi-agent environments, one entry point: `envs.make(task, obs=...)`.

Every environment follows the PettingZoo Parallel API (one dict entry per agent) and
also exposes the layout the training scripts need, as plain attributes:

    n_agents, state_dim, obs_dims (per agent), obs_dim (the widest), n_actions
    (categorical actions per agent, or None for continuous actions), act_dim,
    state(), set_state(state), obs_index and observe(states) -> per-agent observations.

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


def evaluate(env, policy: Callable[..., np.ndarray], episodes: int, seed: int, memory: int = 0) -> np.ndarray:
    """Run `episodes` episodes with a decentralised policy and return each team return.

    `policy` maps the agents' observations [N, obs_dim] to their actions ([N] integers for
    categorical tasks, [N, act_dim] otherwise). Episode e is reset with seed `seed + e`.
    With `memory` K > 0 it is called as policy(obs, past_obs, past_actions, mask) with each
    agent's last K observations [N, K, obs_dim] and actions [N, K, ...] (oldest first) and
    mask [K], False for the steps before the episode started.
    """
    returns = np.zeros(episodes)
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        if memory:
            action_shape = () if env.n_actions is not None else (env.act_dim,)
            past_obs = np.zeros((env.n_agents, memory, env.obs_dim), dtype=np.float32)
            past_actions = np.zeros((env.n_agents, memory, *action_shape), dtype=np.float32)
            mask = np.zeros(memory, dtype=bool)
        while env.agents:
            stacked = stack_observations(env, obs)
            if memory:
                actions = policy(stacked, past_obs, past_actions, mask)
                # shift the window by one step and append this step (oldest first)
                past_obs, past_actions, mask = np.roll(past_obs, -1, 1), np.roll(past_actions, -1, 1), np.roll(mask, -1)
                past_obs[:, -1], past_actions[:, -1], mask[-1] = stacked, actions, True
            else:
                actions = policy(stacked)
            obs, rewards, _, _, _ = env.step({a: actions[i] for i, a in enumerate(env.possible_agents)})
            returns[episode] += rewards[env.possible_agents[0]]  # the reward is shared
    return returns
