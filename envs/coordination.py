"""The Iterated Coordination Game (paper section 5.2, Figure 3a).

Two agents pick left (0) or right (1) at every round; both get reward 1 when they pick
the same direction and 0 otherwise. An episode lasts `horizon` rounds. The only thing
that changes between rounds is the round index, so the global state is the episode
progress t / horizon and each agent observes exactly that: there is nothing to
observe that would tell the agents which of the two equivalent conventions to follow.

The episode ends with a true terminal (the round index is part of the state, so the
last round leads to an absorbing state, not to a time-out).
"""

from __future__ import annotations

import functools

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from envs import gather_observations

LEFT, RIGHT = 0, 1


class CoordinationGame(ParallelEnv):
    metadata = {"name": "coordination_v0", "render_modes": []}

    # Layout shared by every task of the project (the scripts read these, never the spaces).
    n_agents = 2
    state_dim = 1
    obs_dims = (1, 1)
    obs_index = np.array([[0], [0]])  # both agents see the round index, and only it
    n_actions = 2  # categorical actions per agent; None for continuous tasks
    act_dim = 1  # an agent's action is one integer

    def __init__(self, horizon: int = 10):
        self.horizon = horizon
        self.possible_agents = [f"agent_{i}" for i in range(self.n_agents)]
        self.agents: list[str] = []
        self._round = 0

    @property
    def obs_dim(self) -> int:
        return max(self.obs_dims)

    @functools.lru_cache(maxsize=None)
    def observation_space(self, agent: str) -> spaces.Box:
        return spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)

    @functools.lru_cache(maxsize=None)
    def action_space(self, agent: str) -> spaces.Discrete:
        return spaces.Discrete(self.n_actions)

    # -- global state and observation function ------------------------------------------
    def state(self) -> np.ndarray:
        return np.array([self._round / self.horizon], dtype=np.float32)

    def set_state(self, state: np.ndarray) -> None:
        """Put the game at the round encoded by a global state (e.g. one from a dataset)."""
        self._round = int(round(float(np.asarray(state).reshape(-1)[0]) * self.horizon))
        self.agents = self.possible_agents[:] if self._round < self.horizon else []

    def observe(self, states):
        """Per-agent observations of a batch of global states: [..., S] -> [..., N, O]."""
        return gather_observations(states, self.obs_index)

    def split_actions(self, joint_actions: np.ndarray) -> np.ndarray:
        """Joint actions as stored in a dataset file [..., N] -> per-agent actions [..., N]."""
        return np.asarray(joint_actions).astype(np.int64)

    # -- PettingZoo Parallel API ---------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        # The game is deterministic; the seed is accepted for API compatibility.
        self._round = 0
        self.agents = self.possible_agents[:]
        return self._observations(), {a: {} for a in self.agents}

    def step(self, actions: dict[str, int]):
        if not self.agents:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        missing = set(self.agents) - set(actions)
        if missing:
            raise ValueError(f"no action given for {sorted(missing)}")
        a0, a1 = (int(actions[a]) for a in self.possible_agents)
        reward = float(a0 == a1)
        self._round += 1
        done = self._round >= self.horizon
        agents = self.agents
        obs = self._observations()
        rewards = {a: reward for a in agents}
        terminations = {a: done for a in agents}
        truncations = {a: False for a in agents}
        infos = {a: {} for a in agents}
        if done:
            self.agents = []
        return obs, rewards, terminations, truncations, infos

    def _observations(self) -> dict[str, np.ndarray]:
        per_agent = self.observe(self.state())  # [N, O]
        return {a: per_agent[i] for i, a in enumerate(self.possible_agents)}
