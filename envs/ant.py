"""Four-agent Ant (paper section 5.3, Figure 3c) on Gymnasium's Ant-v5.

The global state is Ant-v5's 27-dim observation without contact forces (qpos[2:] then
qvel), the same layout as the first 27 dims of D4RL's ant:

    0 torso z, 1-4 torso orientation (quaternion), 5-12 joint angles,
    13-15 torso velocity, 16-18 torso angular velocity, 19-26 joint velocities

Each agent drives one leg (hip and ankle) and observes that same leg's joint angles and
velocities. Agent 0 is the front-left leg (the paper's yellow agent): under partial
observability (`po`) it alone also sees the torso. The paper's released code pairs some
agents' observed leg with another leg's actuators; here each agent sees the leg it drives.
"""

from __future__ import annotations

import numpy as np

from envs.mujoco_team import MujocoTeam

QUATERNION, VELOCITY_XY = [1, 2, 3, 4], [13, 14]  # state components a turn about the vertical axis changes

TORSO = [0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 18]
LEGS = {  # leg -> (actuators, observed state components)
    "front_left": ([2, 3], [5, 6, 19, 20]),
    "front_right": ([4, 5], [7, 8, 21, 22]),
    "back_left": ([6, 7], [9, 10, 23, 24]),
    "back_right": ([0, 1], [11, 12, 25, 26]),
}


class FourAgentAnt(MujocoTeam):
    task = "ant"
    gym_id = "Ant-v5"
    gym_kwargs = {"include_cfrc_ext_in_observation": False}
    d4rl_state_prefix = True  # D4RL ant files hold 111-dim observations: data/ keeps the first 27
    actuators = np.array([acts for acts, _ in LEGS.values()])
    observation_settings = {
        "fo": [list(range(27))] * 4,
        "po": [TORSO + LEGS["front_left"][1]] + [obs for _, obs in list(LEGS.values())[1:]],
    }

    @property
    def terminal_bounds(self) -> dict[int, tuple[float, float]]:
        """Ant-v5 ends an episode when the torso height (state 0) leaves its healthy range, [0.2, 1]."""
        unwrapped = self.env.unwrapped
        return {0: tuple(unwrapped._healthy_z_range)} if unwrapped._terminate_when_unhealthy else {}

    @staticmethod
    def turn(states, angle):
        """Global states [..., S] turned by `angle` (rad, a float or [...], counter-clockwise seen from above) about
        the world's vertical axis, as torch tensors. Ant's dynamics do not depend on the heading, so a turned
        state has the same future, turned; its reward, the velocity along x, changes. The torso quaternion
        (w, x, y, z) is pre-multiplied by the turn's and the world-frame linear velocity turned; the angular
        velocity is in the torso's own frame and the joints are relative, so they stay."""
        import torch

        angle = torch.as_tensor(angle, dtype=states.dtype, device=states.device)
        c, s = torch.cos(angle / 2), torch.sin(angle / 2)
        w, x, y, z = states[..., QUATERNION].unbind(-1)
        vx, vy = states[..., VELOCITY_XY].unbind(-1)
        out = states.clone()
        out[..., QUATERNION] = torch.stack([c * w - s * z, c * x - s * y, c * y + s * x, c * z + s * w], -1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        out[..., VELOCITY_XY] = torch.stack([cos * vx - sin * vy, sin * vx + cos * vy], -1)
        return out

    @staticmethod
    def heading(states):
        """The torso's heading (yaw, rad) of global states [..., S] (torch), from its quaternion (w, x, y, z) at 1-4
        of any norm (Ant-v5's reset noise leaves the episode starts' quaternions unnormalised)."""
        import torch

        w, x, y, z = states[..., QUATERNION].unbind(-1)
        return torch.atan2(2 * (w * z + x * y), w * w + x * x - y * y - z * z)

    def _set_sim_state(self, state: np.ndarray) -> None:
        # the x-y position is not part of the state; the reward only uses its change
        qpos = np.concatenate([np.zeros(2), state[:13]])
        self.env.unwrapped.set_state(qpos, state[13:27])
