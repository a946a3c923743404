"""Offline datasets of the Iterated Coordination Game (paper Table 1).

Each dataset is collected by two independent agents that go right with a fixed
probability. Every dataset contains both coordinated and uncoordinated rounds; what
changes is which behaviour dominates.
"""

from __future__ import annotations

import numpy as np

from envs.coordination import CoordinationGame

# dataset name -> (P(agent 0 goes right), P(agent 1 goes right)), paper Table 1
BEHAVIOUR = {
    "favorable": (0.75, 0.75),
    "neutral": (0.5, 0.5),
    "unfavorable": (0.25, 0.75),
}
# the datasets' average score (mean reward per round) reported in Table 1
PAPER_AVERAGE_SCORE = {"favorable": 0.623, "neutral": 0.502, "unfavorable": 0.375}


def build(name: str, episodes: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Play `episodes` episodes with the behaviour policies of `name`, in D4RL file layout."""
    p_right = np.asarray(BEHAVIOUR[name])
    rng = np.random.default_rng(seed)
    env = CoordinationGame()
    columns: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    for _ in range(episodes):
        env.reset()
        while env.agents:
            state = env.state()
            actions = (rng.random(env.n_agents) < p_right).astype(np.int64)
            _, rewards, terminations, _, _ = env.step(dict(zip(env.possible_agents, actions)))
            columns["observations"].append(state)
            columns["actions"].append(actions)
            columns["rewards"].append(rewards["agent_0"])
            columns["next_observations"].append(env.state())
            columns["terminals"].append(terminations["agent_0"])
            columns["timeouts"].append(False)
    return {
        "observations": np.array(columns["observations"], dtype=np.float32),
        "actions": np.array(columns["actions"], dtype=np.int64),
        "rewards": np.array(columns["rewards"], dtype=np.float32),
        "next_observations": np.array(columns["next_observations"], dtype=np.float32),
        "terminals": np.array(columns["terminals"], dtype=bool),
        "timeouts": np.array(columns["timeouts"], dtype=bool),
    }
