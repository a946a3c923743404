"""A Gymnasium MuJoCo robot split into agents that each drive some of its actuators.

The global state is the single-agent Gymnasium observation. Each agent observes a
selection of its components (`obs_index`, one row per agent, -1 for padding) and
sends the actions of its own actuators (`actuators`, one row per agent). Subclasses
(envs/reacher.py, envs/ant.py) give the Gymnasium id, the tables and `_set_sim_state`.
The module is not named mujoco.py, which would shadow the mujoco package.
"""

from __future__ import annotations

import ctypes.util
import functools
import os

if "DISPLAY" not in os.environ and "MUJOCO_GL" not in os.environ:
    # headless: render offscreen with EGL. Without libEGL, `import mujoco` itself fails under
    # MUJOCO_GL=egl (seen on a GPU server), so rendering is switched off there; training never renders.
    os.environ["MUJOCO_GL"] = "egl" if ctypes.util.find_library("EGL") else "disable"

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402
from pettingzoo import ParallelEnv  # noqa: E402

from envs import UserInputError, gather_observations  # noqa: E402


class MujocoTeam(ParallelEnv):
    gym_id: str
    gym_kwargs: dict = {}
    actuators: np.ndarray  # [N, A] actuator indices of each agent
    observation_settings: dict[str, list[list[int]]]  # setting -> per-agent state components
    n_actions = None  # continuous actions

    def __init__(self, obs: str, render_mode: str | None = None):
        if obs not in self.observation_settings:
            raise UserInputError(f"unknown observation setting '{obs}'; choose one of: {', '.join(self.observation_settings)}")
        self.env = gym.make(self.gym_id, render_mode=render_mode, **self.gym_kwargs)
        self.render_mode = render_mode
        self.metadata = {"name": self.gym_id, "render_modes": ["rgb_array"]}
        rows = self.observation_settings[obs]
        self.obs_dims = tuple(len(r) for r in rows)
        self.obs_index = np.array([r + [-1] * (max(self.obs_dims) - len(r)) for r in rows])
        self.n_agents, self.act_dim = self.actuators.shape
        self.state_dim = self.env.observation_space.shape[0]
        self.possible_agents = [f"agent_{i}" for i in range(self.n_agents)]
        self.agents: list[str] = []
        self._state = np.zeros(self.state_dim, dtype=np.float32)

    @property
    def obs_dim(self) -> int:
        return max(self.obs_dims)

    @functools.lru_cache(maxsize=None)
    def observation_space(self, agent: str) -> spaces.Box:
        return spaces.Box(-np.inf, np.inf, shape=(self.obs_dims[self.possible_agents.index(agent)],), dtype=np.float32)

    @functools.lru_cache(maxsize=None)
    def action_space(self, agent: str) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, shape=(self.act_dim,), dtype=np.float32)

    # -- global state, observation function and action assembly --------------------------
    def state(self) -> np.ndarray:
        return self._state.copy()

    def set_state(self, state: np.ndarray) -> None:
        """Put the simulator in a global state (e.g. one from a dataset); the episode goes on from there."""
        self._set_sim_state(np.asarray(state, dtype=np.float64))
        self._state = np.asarray(self.env.unwrapped._get_obs(), dtype=np.float32)
        self.agents = self.possible_agents[:]

    def _set_sim_state(self, state: np.ndarray) -> None:
        raise NotImplementedError

    @property
    def terminal_bounds(self) -> dict[int, tuple[float, float]]:
        """The simulator's termination test as ranges of global state components: an episode ends at a
        state with a component outside its range (or any component not finite). Empty: it never ends."""
        return {}

    def is_terminal(self, states):
        """Whether the simulator would end an episode at these global states [..., S] (numpy or torch)."""
        ended = ~(abs(states) < float("inf")).all(-1)  # NaN or infinite
        for i, (low, high) in self.terminal_bounds.items():
            ended = ended | (states[..., i] < low) | (states[..., i] > high)
        return ended

    def observe(self, states):
        """Per-agent observations of a batch of global states: [..., S] -> [..., N, O]."""
        return gather_observations(states, self.obs_index)

    def join_actions(self, actions: np.ndarray) -> np.ndarray:
        """Per-agent actions [..., N, A] -> the simulator's action vector [..., N * A]."""
        actions = np.asarray(actions)
        joint = np.zeros((*actions.shape[:-2], self.actuators.size), dtype=actions.dtype)
        joint[..., self.actuators.reshape(-1)] = actions.reshape(*actions.shape[:-2], -1)
        return joint

    def split_actions(self, joint_actions: np.ndarray) -> np.ndarray:
        """The simulator's action vectors [..., N * A] -> per-agent actions [..., N, A]."""
        return np.asarray(joint_actions, dtype=np.float32)[..., self.actuators]

    # -- PettingZoo Parallel API ---------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        state, _ = self.env.reset(seed=seed)
        self._state = np.asarray(state, dtype=np.float32)
        self.agents = self.possible_agents[:]
        return self._observations(), {a: {} for a in self.agents}

    def step(self, actions: dict[str, np.ndarray]):
        if not self.agents:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        per_agent = np.stack([np.asarray(actions[a], dtype=np.float32).reshape(self.act_dim) for a in self.possible_agents])
        state, reward, terminated, truncated, _ = self.env.step(self.join_actions(per_agent))
        self._state = np.asarray(state, dtype=np.float32)
        agents = self.agents
        if terminated or truncated:
            self.agents = []
        return (
            self._observations(),
            {a: float(reward) for a in agents},
            {a: bool(terminated) for a in agents},
            {a: bool(truncated) for a in agents},
            {a: {} for a in agents},
        )

    def render(self):
        return self.env.render()

    def close(self):
        self.env.close()

    def _observations(self) -> dict[str, np.ndarray]:
        per_agent = self.observe(self._state)
        return {a: per_agent[i, : self.obs_dims[i]] for i, a in enumerate(self.possible_agents)}
