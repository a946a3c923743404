"""Two-agent Reacher and four-agent Ant: observation functions, action assembly, state setting."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import envs

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = [(task, obs) for task in ("reacher", "ant") for obs in envs.TASKS[task][0]]

# the components each agent must see (issue #3 and paper section 5.3)
EXPECTED = {
    ("reacher", "all-observant"): [set(range(10))] * 2,
    ("reacher", "independent"): [{0, 2, 6, 4, 5}, {1, 3, 7, 4, 5}],
    ("reacher", "leader-only"): [{0, 1, 2, 3, 6, 7, 4, 5}, {0, 1, 2, 3, 6, 7}],
    ("ant", "fo"): [set(range(27))] * 4,
    ("ant", "po"): [{0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 18, 5, 6, 19, 20}, {7, 8, 21, 22}, {9, 10, 23, 24}, {11, 12, 25, 26}],
}


@pytest.mark.parametrize("task, obs", SETTINGS)
def test_each_agent_sees_exactly_its_components(task, obs):
    env = envs.make(task, obs)
    rng = np.random.default_rng(0)
    state = rng.normal(size=env.state_dim).astype(np.float32)
    base = env.observe(state)
    for agent, seen in enumerate(EXPECTED[(task, obs)]):
        assert env.obs_dims[agent] == len(seen)
        for component in range(env.state_dim):
            perturbed = state.copy()
            perturbed[component] += 1.0
            changed = not np.array_equal(env.observe(perturbed)[agent], base[agent])
            assert changed == (component in seen), (agent, component)
        assert np.all(base[agent, len(seen) :] == 0)  # padding


@pytest.mark.parametrize("task, legs", [("reacher", [[0], [1]]), ("ant", [[2, 3], [4, 5], [6, 7], [0, 1]])])
def test_actions_assemble_into_the_simulator_vector_and_back(task, legs):
    env = envs.make(task)
    per_agent = np.random.default_rng(1).uniform(-1, 1, size=(5, env.n_agents, env.act_dim)).astype(np.float32)
    joint = env.join_actions(per_agent)
    for agent, actuators in enumerate(legs):
        np.testing.assert_array_equal(joint[:, actuators], per_agent[:, agent])
    np.testing.assert_array_equal(env.split_actions(joint), per_agent)


@pytest.mark.parametrize("task", ["reacher", "ant"])
def test_set_state_and_replay_reproduces_the_next_state(task):
    env = envs.make(task)
    rng = np.random.default_rng(2)
    env.reset(seed=0)
    recorded = []
    for _ in range(20):
        state = env.state()
        actions = rng.uniform(-1, 1, size=(env.n_agents, env.act_dim)).astype(np.float32)
        env.step({a: actions[i] for i, a in enumerate(env.possible_agents)})
        recorded.append((state, actions, env.state()))
    replay = envs.make(task)
    replay.reset(seed=123)
    for state, actions, next_state in recorded[5:]:
        replay.set_state(state)
        np.testing.assert_allclose(replay.state(), state, atol=1e-5)
        replay.step({a: actions[i] for i, a in enumerate(replay.possible_agents)})
        np.testing.assert_allclose(replay.state(), next_state, atol=1e-4)


@pytest.mark.parametrize("task", ["reacher", "ant"])
def test_rgb_array_rendering(task):
    # in a subprocess: without a usable OpenGL, MuJoCo aborts the whole process
    code = (
        "import envs; env = envs.make('%s'); import numpy as np\n"
        "from envs.%s import *\n"
        "env = type(env)(env.obs_setting, render_mode='rgb_array'); env.reset(seed=0); f = env.render()\n"
        "assert f.ndim == 3 and f.shape[2] == 3 and f.std() > 0, f.shape\n"
    ) % (task, task)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if out.returncode != 0 and ("OpenGL" in out.stderr or "opengl" in out.stderr or "EGL" in out.stderr):
        pytest.skip("no OpenGL for offscreen rendering here (set MUJOCO_GL)")
    assert out.returncode == 0, out.stderr[-2000:]



def test_headless_machines_without_egl_still_import_and_step():
    # MUJOCO_GL=egl without libEGL makes `import mujoco` itself fail; pretend libEGL is missing
    code = (
        "import ctypes.util; ctypes.util.find_library = lambda name: None\n"
        "import os; os.environ.pop('DISPLAY', None); os.environ.pop('MUJOCO_GL', None)\n"
        "import envs; env = envs.make('ant'); env.reset(seed=0)\n"
        "assert os.environ['MUJOCO_GL'] == 'disable', os.environ['MUJOCO_GL']\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MUJOCO_GL")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]

@pytest.mark.parametrize("task", ["coordination", "reacher", "ant"])
def test_simulators_step_from_given_states_like_an_episode(task):
    env = envs.make(task)
    rng = np.random.default_rng(3)
    env.reset(seed=0)
    states, actions, rewards, next_states, terminals = [], [], [], [], []
    while env.agents and len(states) < 30:
        states.append(env.state())
        if env.n_actions is not None:
            actions.append(rng.integers(0, env.n_actions, size=env.n_agents))
        else:
            actions.append(rng.uniform(-1, 1, size=(env.n_agents, env.act_dim)).astype(np.float32))
        _, reward, terminated, _, _ = env.step({a: actions[-1][i] for i, a in enumerate(env.possible_agents)})
        rewards.append(reward["agent_0"])
        next_states.append(env.state())
        terminals.append(terminated["agent_0"])
    # shuffled: each copy must start from the state it is given, not from its own past
    order = rng.permutation(len(states))
    sims = envs.Simulators(task, count=len(states) + 2)
    out_states, out_rewards, out_terminals = sims.step(np.array(states)[order], np.array(actions)[order])
    np.testing.assert_allclose(out_states, np.array(next_states)[order], atol=1e-4)
    np.testing.assert_allclose(out_rewards, np.array(rewards)[order], atol=0.05)
    np.testing.assert_array_equal(out_terminals, np.array(terminals)[order])


@pytest.mark.parametrize("task", ["reacher", "ant"])
def test_terminal_bounds_are_the_simulators_termination_test(task):
    """`is_terminal` (MOMA-PPO's --terminal rule) ends exactly the steps the simulator ends, here from
    states whose first component is pushed across Ant's torso-height limits, for numpy and torch alike."""
    env = envs.make(task)
    env.reset(seed=0)
    state = env.state()
    states = np.repeat(state[None], 7, axis=0)
    states[:, 0] += np.array([-0.6, -0.45, -0.2, 0.0, 0.1, 0.3, 0.5], dtype=np.float32)  # ant: z from 0.15 to 1.25
    actions = np.zeros((len(states), env.n_agents, env.act_dim), dtype=np.float32)
    next_states, _, terminals = envs.Simulators(task, count=len(states)).step(states, actions)
    np.testing.assert_array_equal(env.is_terminal(next_states), terminals)
    np.testing.assert_array_equal(env.is_terminal(torch.as_tensor(next_states)).numpy(), terminals)
    assert terminals.any() == (task == "ant") and not terminals.all()
    next_states[3, 5] = np.nan
    assert env.is_terminal(next_states)[3]


def test_a_turned_ant_state_has_the_turned_future():
    """Ant's dynamics do not depend on the heading, so stepping a turned state must give the turned next state;
    tilted torsos check that the turn is about the world's vertical axis, not the torso's own."""
    from data import mujoco_datasets

    env = envs.make("ant", "po")
    batch = mujoco_datasets.build("ant", "random", size=40)
    states = torch.as_tensor(batch["observations"][::4], dtype=torch.float64)
    states[:, 1:5] /= states[:, 1:5].norm(dim=1, keepdim=True)  # Ant-v5's reset noise leaves episode starts' unnormalised
    actions = np.random.default_rng(0).uniform(-1, 1, (len(states), 4, 2))
    c, s = np.cos(0.2), np.sin(0.2)  # tilt every torso by 0.4 rad about its own x axis: q (x) (c, s, 0, 0)
    w, x, y, z = (states[:, i].clone() for i in range(1, 5))
    states[:, 1], states[:, 2], states[:, 3], states[:, 4] = c * w - s * x, c * x + s * w, c * y + s * z, c * z - s * y
    simulators = envs.Simulators("ant", len(states))
    next_states, _, _ = simulators.step(states.numpy(), actions)
    for angle in (0.7, -2.0):
        turned = env.turn(states, angle)
        assert torch.allclose(turned[:, 1:5].norm(dim=1), torch.ones(len(states), dtype=torch.float64))
        heading_change = (env.heading(turned) - env.heading(states) - angle + np.pi) % (2 * np.pi) - np.pi
        assert heading_change.abs().max() < 1e-6
        turned_next, _, _ = simulators.step(turned.numpy(), actions)
        assert np.allclose(turned_next, env.turn(torch.as_tensor(next_states), angle).numpy(), atol=1e-5)
    angles = torch.tensor([0.7, -2.0], dtype=torch.float64)  # one angle per state, broadcast over the state's components
    assert torch.equal(env.turn(states[:2], angles), torch.stack([env.turn(states[i], angles[i]) for i in range(2)]))
