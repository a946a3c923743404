"""The memory used under partial observability: dataset histories, evaluation histories, and
every script's Memory module (masking at episode starts)."""

import copy
import importlib
import inspect
import os
import shutil

import numpy as np
import pytest
import torch

import data
import envs

SCRIPTS_WITH_MEMORY = [s for s in ("ibc", "maiql", "maiql_ft", "itd3bc", "matd3bc", "icql", "iomar", "moma_ppo")
                       if importlib.util.find_spec(f"algos.{s}") and hasattr(importlib.import_module(f"algos.{s}"), "Memory")]
# Each script has its own copy of the module; compiling the same source twice would test nothing new.
DISTINCT_MEMORIES = list({inspect.getsource(importlib.import_module(f"algos.{s}").Memory): s for s in SCRIPTS_WITH_MEMORY}.values())


def test_history_index_stays_inside_the_episode():
    starts = np.array([1, 0, 0, 0, 1, 0, 0], dtype=bool)
    dataset = data.Dataset(*[None] * 8, episode_starts=starts)
    first = dataset.episode_first()
    assert first.tolist() == [0, 0, 0, 0, 4, 4, 4]
    t = np.array([0, 2, 5, 6])
    index, mask = data.history_index(first[t], t, 3)
    assert mask.tolist() == [[False] * 3, [False, True, True], [False, False, True], [False, True, True]]
    assert index[mask].tolist() == [0, 1, 4, 4, 5]  # oldest first
    assert index.min() >= 0
    # the next state's history ends with the current transition, in the same episode
    index, mask = data.history_index(first[t], t + 1, 3)
    assert mask.tolist() == [[False, False, True], [True, True, True], [False, True, True], [True, True, True]]
    assert index[:, -1].tolist() == t.tolist()
    # torch tensors give the same answer
    tt = torch.as_tensor(t)
    index_t, mask_t = data.history_index(torch.as_tensor(first)[tt], tt + 1, 3)
    assert index_t.tolist() == index.tolist() and mask_t.tolist() == mask.tolist()


def test_evaluate_passes_each_agent_its_own_past():
    env = envs.make("reacher", "independent")
    seen = []

    def policy(obs, past_obs, past_actions, mask):  # [N, E, ...]: both episodes at once
        seen.append((obs.copy(), past_obs.copy(), past_actions.copy(), mask.copy()))
        return np.full((2, 2, 1), 0.1 * len(seen), dtype=np.float32) + np.array([0.0, 0.01])[None, :, None]

    envs.evaluate(env, policy, episodes=2, seed=0, memory=3)
    assert len(seen) == 50  # two 50-step episodes side by side
    assert seen[0][3].shape == (2, 3) and not seen[0][3].any()  # each episode starts with an empty past
    assert seen[1][3].tolist() == [[False, False, True]] * 2
    np.testing.assert_array_equal(seen[1][1][:, :, -1], seen[0][0])
    obs, past_obs, past_actions, mask = seen[4]
    assert mask.all()
    for k in range(3):  # oldest first: steps 1, 2, 3
        np.testing.assert_array_equal(past_obs[:, :, k], seen[1 + k][0])
        np.testing.assert_allclose(past_actions[:, :, k, 0], [[0.1 * (2 + k), 0.1 * (2 + k) + 0.01]] * 2, rtol=1e-6)
    assert not np.array_equal(seen[0][0][:, 0], seen[0][0][:, 1])  # episode e is reset with seed + e


@pytest.mark.parametrize("script", SCRIPTS_WITH_MEMORY)
def test_memory_ignores_masked_steps_and_is_zero_without_past(script):
    Memory = importlib.import_module(f"algos.{script}").Memory
    torch.manual_seed(0)
    n, b, k, d = 3, 5, 4, 6
    memory = Memory(n, d, k, 16)
    tokens = torch.randn(n, b, k, d)
    mask = torch.tensor([[True] * 4, [False, True, True, True], [False, False, False, True], [False] * 4, [True] * 4])
    out = memory(tokens, mask)
    assert out.shape == (n, b, 16) and torch.isfinite(out).all()
    # changing what lies before the episode's start changes nothing
    changed = tokens.clone()
    changed[:, ~mask] = 100.0
    torch.testing.assert_close(memory(changed, mask), out)
    assert torch.all(out[:, 3] == 0)  # no past at all: a zero summary
    # a visible step does matter, and each agent has its own weights
    changed = tokens.clone()
    changed[:, 2, 3] += 1.0
    assert not torch.allclose(memory(changed, mask)[:, 2], out[:, 2])
    same_tokens = tokens[:1].expand(n, -1, -1, -1)
    summaries = memory(same_tokens, mask)
    assert not torch.allclose(summaries[0], summaries[1])


def test_memory_defaults_follow_the_observation_setting():
    assert not envs.partially_observed(envs.make("coordination"))
    assert not envs.partially_observed(envs.make("reacher", "all-observant"))
    assert envs.partially_observed(envs.make("reacher", "independent"))
    assert envs.partially_observed(envs.make("reacher", "leader-only"))
    assert not envs.partially_observed(envs.make("ant", "fo"))
    assert envs.partially_observed(envs.make("ant", "po"))


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX") or "g++"), reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize("script", DISTINCT_MEMORIES)
def test_compiled_memory_matches_the_uncompiled_one(script):
    """--compile (on by default for MuJoCo tasks) changes the speed only: outputs, gradients and checkpoint keys."""
    torch.manual_seed(0)
    eager = importlib.import_module(f"algos.{script}").Memory(2, 5, 4, 8)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    tokens = torch.randn(2, 6, 4, 5)
    mask = torch.tensor([[True] * 4, [False] * 4, [False, True, True, True]] * 2)  # incl. an empty history
    outputs = [memory(tokens, mask) for memory in (eager, compiled)]
    torch.testing.assert_close(outputs[1], outputs[0])
    for out in outputs:
        out.square().sum().backward()
    for (name, p), (_, p_compiled) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(p_compiled.grad, p.grad, msg=name)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
