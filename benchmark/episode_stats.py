"""What a finished run's team does in its evaluation episodes: how long it stays up, and on ant where it goes.

    python benchmark/episode_stats.py runs/ant-po-medium__icql__1__<time>

Any script's run: its folder is copied to a temporary one and resumed there, and a finished run goes
straight to its final evaluation (the same episodes, seeds and greedy actions as the one that made
its score, so the score is printed again as a check). Each evaluation episode's length and return
are recorded and, on ant, the torso's displacement in the plane, since ant's reward is the velocity
along x plus 1 per step upright: a team that stands for 1,000 steps scores about 0.3 normalized.
On reacher, where the return is minus the fingertip's distance to the target summed over 50 steps
(and the actions' cost), each episode's final distance and the side its elbow ends bent to, and how
the two agents' final joint angles compare with the two inverse-kinematics solutions for the target
(elbow bent + or -): a team whose agents end nearest different solutions disagrees on the bend
convention and misses by far, one that agrees but ends off its solution is imprecise.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import envs  # noqa: E402


@dataclass
class Args:
    run: tyro.conf.Positional[str]
    """a finished run folder (with model.pt and result.json), of any script in algos/"""


class Recorder:
    """Wraps an environment copy's reset and step to note each episode's length and return, and how it
    ended: on ant the torso's displacement, on reacher the fingertip's distance and the elbow's side."""

    def __init__(self, copy, episodes: list):
        self.copy, self.episodes = copy, episodes

    def position(self) -> np.ndarray | None:
        """The torso's (x, y) on ant; None elsewhere."""
        return self.copy.env.unwrapped.data.qpos[:2].copy() if self.copy.task == "ant" else None

    def reset(self, **kwargs):
        out = self.copy.reset(**kwargs)
        self.current = {"length": 0, "return": 0.0, "start": self.position()}
        return out

    def step(self, actions):
        out = self.copy.step(actions)
        self.current["length"] += 1
        self.current["return"] += next(iter(out[1].values()))
        if not self.copy.agents:  # the episode ended
            if self.current["start"] is not None:
                self.current["displacement"] = self.position() - self.current.pop("start")
            if self.copy.task == "reacher":
                sim = self.copy.env.unwrapped
                tip_to_target = sim.get_body_com("fingertip")[:2] - sim.get_body_com("target")[:2]
                self.current["tip_distance"] = float(np.linalg.norm(tip_to_target))
                self.current["elbow"] = int(np.sign(sim.data.qpos[1]))  # +1 or -1: the bend convention
                self.current["target"] = sim.get_body_com("target")[:2].copy()  # relative to the shoulder at (0, 0)
                self.current["joints"] = sim.data.qpos[:2].copy()  # agent 0's shoulder, agent 1's elbow
                self.current["links"] = reacher_links(sim.model)
            self.episodes.append(self.current)
        return out

    def __getattr__(self, name):  # everything else is the copy's own
        return getattr(self.copy, name)


def wrap(angle: np.ndarray) -> np.ndarray:
    """Angles to [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def reacher_links(model) -> tuple[float, float]:
    """The lengths of Reacher's two links (shoulder to elbow, elbow to fingertip) from its MuJoCo model."""
    return tuple(float(np.linalg.norm(model.body(name).pos[:2])) for name in ("body1", "fingertip"))


def reacher_ik(target: np.ndarray, links: tuple[float, float]) -> np.ndarray:
    """The two joint-angle solutions [2, E, 2] (elbow bent +, then -) that put a two-link arm's
    fingertip on each target [E, 2]; a target out of reach gets the arm's nearest pose, stretched."""
    l1, l2 = links
    radius = np.linalg.norm(target, axis=1)
    cos_elbow = np.clip((radius**2 - l1**2 - l2**2) / (2 * l1 * l2), -1.0, 1.0)
    solutions = []
    for sign in (1.0, -1.0):
        elbow = sign * np.arccos(cos_elbow)
        shoulder = np.arctan2(target[:, 1], target[:, 0]) - np.arctan2(l2 * np.sin(elbow), l1 + l2 * np.cos(elbow))
        solutions.append(np.stack([wrap(shoulder), elbow], axis=1))
    return np.stack(solutions)


def convention_report(target: np.ndarray, joints: np.ndarray, links: tuple[float, float]) -> dict:
    """Which inverse-kinematics solution each agent's final joint angle is nearest (+1: elbow bent +),
    whether the two agree, and each episode's joint error from the solution the shoulder chose.
    The agents drive different joints, so ending on one solution is the coordination asked of them."""
    error = np.abs(wrap(joints[None] - reacher_ik(target, links)))  # [2 solutions, E, 2 agents]
    nearest = np.where(error[0] <= error[1], 1, -1)  # [E, 2]: per agent
    agree = nearest[:, 0] == nearest[:, 1]
    chosen = error[np.where(nearest[:, 0] > 0, 0, 1), np.arange(len(joints))]  # [E, 2]: from the shoulder's solution
    return {"nearest": nearest, "agree": agree, "joint_error": chosen.max(axis=1)}


def main(args: Args) -> dict:
    run = Path(args.run)
    result = json.loads((run / "result.json").read_text()) if (run / "result.json").exists() else None
    if result is None or not (run / "model.pt").exists():
        raise envs.UserInputError(f"'{run}' is not a finished run: it needs model.pt and result.json")
    module = importlib.import_module(f"algos.{result['algo']}")

    episodes: list[dict] = []
    make_copies = envs._evaluation_copies
    envs._evaluation_copies = lambda env, count: [Recorder(c, episodes) for c in make_copies(env, count)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / run.name
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("events.out.tfevents.*"))
            with contextlib.redirect_stdout(io.StringIO()):
                again = module.main(tyro.cli(module.Args, args=["--resume", str(copy)]))
    finally:
        envs._evaluation_copies = make_copies

    lengths = np.array([e["length"] for e in episodes])
    returns = np.array([e["return"] for e in episodes])
    print(f"{run.name}: {len(episodes)} episodes, normalized score {again['normalized_score']:.4f} "
          f"(result.json: {result['normalized_score']:.4f})")  # fmt: skip
    print(f"  length: mean {lengths.mean():.0f}, min {lengths.min()}, {np.mean(lengths == lengths.max()):.0%} "
          f"reach {lengths.max()}; return: mean {returns.mean():.1f}, min {returns.min():.1f}, max {returns.max():.1f}")  # fmt: skip
    stats = {"score": again["normalized_score"], "lengths": lengths.tolist(), "returns": returns.tolist()}
    if episodes and "displacement" in episodes[0]:
        moved = np.array([e["displacement"] for e in episodes])  # [E, 2]
        x, distance = moved[:, 0], np.linalg.norm(moved, axis=1)
        print(f"  torso moved: along x mean {x.mean():.1f} m (min {x.min():.1f}, max {x.max():.1f}), "
              f"distance mean {distance.mean():.1f} m; return per step {returns.sum() / lengths.sum():.2f}")  # fmt: skip
        stats["displacement"] = moved.tolist()
    if episodes and "tip_distance" in episodes[0]:
        distance = np.array([e["tip_distance"] for e in episodes])
        elbow = np.array([e["elbow"] for e in episodes])
        print(f"  fingertip to target at the end: mean {100 * distance.mean():.1f} cm, median "
              f"{100 * np.median(distance):.1f}, 90th percentile {100 * np.quantile(distance, 0.9):.1f}, "
              f"max {100 * distance.max():.1f}; elbow ends bent + in {np.mean(elbow > 0):.0%} of episodes")  # fmt: skip
        stats["tip_distance"], stats["elbow"] = distance.tolist(), elbow.tolist()
        report = convention_report(np.array([e["target"] for e in episodes]), np.array([e["joints"] for e in episodes]),
                                   episodes[0]["links"])  # fmt: skip
        agree = report["agree"]
        missed = (f"{100 * distance[agree].mean():.1f} cm" if agree.any() else "-",
                  f"{100 * distance[~agree].mean():.1f} cm" if (~agree).any() else "-")  # fmt: skip
        print(f"  agents end nearest the same inverse-kinematics solution in {agree.mean():.0%} of episodes "
              f"(final distance mean {missed[0]}; the others {missed[1]}); median joint error from the "
              f"shoulder's solution {np.median(report['joint_error']):.2f} rad")  # fmt: skip
        stats["agree"], stats["joint_error"] = agree.tolist(), report["joint_error"].tolist()
    return stats


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.UserInputError as error:
        sys.exit(f"error: {error}")
