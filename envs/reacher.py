"""Two-agent Reacher (paper section 5.3, Figure 3b) on Gymnasium's Reacher-v5.

Agent 0 drives the shoulder (actuator 0), agent 1 the elbow (actuator 1); episodes last
50 steps. The global state is Reacher-v5's 10-dim observation:

    0 cos q0, 1 cos q1, 2 sin q0, 3 sin q1, 4 target x, 5 target y,
    6 dq0, 7 dq1, 8 tip-target x, 9 tip-target y

Under partial observability no agent sees the tip-to-target vector.
"""

from __future__ import annotations

import numpy as np

from envs.mujoco_team import MujocoTeam


class TwoAgentReacher(MujocoTeam):
    task = "reacher"
    gym_id = "Reacher-v5"
    actuators = np.array([[0], [1]])
    observation_settings = {
        "all-observant": [list(range(10)), list(range(10))],
        # each agent: its own joint (cos, sin, velocity) and the target
        "independent": [[0, 2, 6, 4, 5], [1, 3, 7, 4, 5]],
        # both agents see both joints; only agent 0 (the leader) sees the target
        "leader-only": [[0, 1, 2, 3, 6, 7, 4, 5], [0, 1, 2, 3, 6, 7]],
    }

    def _set_sim_state(self, state: np.ndarray) -> None:
        sim = self.env.unwrapped
        angles = np.arctan2(state[2:4], state[0:2])
        qpos = np.concatenate([angles, state[4:6]])
        qvel = np.concatenate([state[6:8], np.zeros(2)])  # the target does not move
        sim.set_state(qpos, qvel)
