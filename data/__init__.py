"""Offline datasets: building, caching, loading, validating, and score normalisation (and the
folders runs write their results to, with the checkpoint and resume plumbing every script shares).

On disk a dataset uses D4RL's layout (so real D4RL files load the same way): a
single-agent view with `observations` (the global state), `actions` (the joint action),
`rewards`, `terminals`, `timeouts` and `next_observations`. In memory `load` turns it
into the multi-agent layout every script uses, `Dataset`, with the per-agent
observations produced by the environment's own observation function. One file thus
serves every observation setting of a task.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from envs import UserInputError

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
CACHE_DIR = Path(os.environ.get("MOMA_DATA_DIR", Path(__file__).parent / "cache"))

# task -> (random return, expert return): normalized score = (R - random) / (expert - random).
# Coordination game: the team score is the mean reward per round of a 10-round episode.
# MuJoCo tasks: measured with our own policies, in data/references.json (see mujoco_datasets.py).
REFERENCE_RETURNS = {"coordination": (0.0, 10.0)}
_REFERENCES_FILE = Path(__file__).parent / "references.json"
if _REFERENCES_FILE.exists():
    for _task, _ref in json.loads(_REFERENCES_FILE.read_text()).items():
        REFERENCE_RETURNS[_task] = (_ref["random"], _ref["expert"])


@dataclass
class Dataset:
    """Transitions in time order; T transitions, N agents, S state dims, O observation dims."""

    states: np.ndarray  # [T, S] global state s_t
    next_states: np.ndarray  # [T, S] global state s_{t+1}
    observations: np.ndarray  # [T, N, O] each agent's observation of s_t (zero-padded to O)
    next_observations: np.ndarray  # [T, N, O] each agent's observation of s_{t+1}
    actions: np.ndarray  # [T, N] int64 for categorical actions, [T, N, A] float32 otherwise
    rewards: np.ndarray  # [T] the shared team reward
    terminals: np.ndarray  # [T] bool, s_{t+1} is absorbing: do not bootstrap from it
    timeouts: np.ndarray  # [T] bool, the episode was cut after this step: s_{t+1} is not absorbing
    episode_starts: np.ndarray  # [T] bool, s_t is the first state of an episode

    def __len__(self) -> int:
        return len(self.rewards)

    def stats(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation over transitions of `field` (e.g. "states", "observations").

        Constant components (zero padding included) get a standard deviation of 1 so that
        normalising them is a plain shift.
        """
        x = getattr(self, field)
        mean, std = x.mean(0), x.std(0)
        return mean.astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32)

    def episode_first(self) -> np.ndarray:
        """[T] index of the first transition of each transition's episode (for histories)."""
        return np.maximum.accumulate(np.where(self.episode_starts, np.arange(len(self.episode_starts)), 0))

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode (a trailing unfinished episode included)."""
        episode_index = np.cumsum(self.episode_starts) - 1
        return np.bincount(episode_index, weights=self.rewards)


def _builders():
    """task -> (dataset names, build(task, name, size) -> D4RL-layout arrays)."""
    from data import coordination, mujoco_datasets as mujoco

    return {
        "coordination": (coordination.BEHAVIOUR, lambda task, name, size: coordination.build(name, episodes=(size or 10_000) // 10)),
        "reacher": (mujoco.DATASETS["reacher"], lambda task, name, size: mujoco.build(task, name, size or mujoco.DEFAULT_SIZE)),
        "ant": (mujoco.DATASETS["ant"], lambda task, name, size: mujoco.build(task, name, size or mujoco.DEFAULT_SIZE)),
    }


def dataset_names(task: str) -> tuple[str, ...]:
    return tuple(_builders().get(task, ({}, None))[0])


def load(env, dataset: str, size: int | None = None) -> Dataset:
    """Load dataset `dataset` of `env`'s task: a name the project builds, or a .npz / .hdf5 path.

    `size` (transitions) builds a smaller or larger version of a named dataset, e.g. for tests.
    """
    raw = read_file(dataset_path(env.task, dataset, size))
    return to_multi_agent(raw, env, source=dataset)


def dataset_path(task: str, dataset: str, size: int | None = None) -> Path:
    """The file of a named dataset (built and cached on first use), or the path given.

    A path is a .npz or D4RL .hdf5 file, or a local Minari dataset folder (with data/main_data.hdf5).
    """
    if dataset.endswith((".npz", ".hdf5", ".h5")) or "/" in dataset:
        path = Path(dataset).expanduser()
        if path.is_dir() and (path / "data" / "main_data.hdf5").exists():
            return path / "data" / "main_data.hdf5"
        if not path.is_file():
            raise UserInputError(
                f"dataset '{path}' does not exist; pass a dataset name, a .npz/.hdf5 file or a Minari dataset folder"
            )
        return path
    names = dataset_names(task)
    if dataset not in names:
        raise UserInputError(
            f"unknown dataset '{dataset}' for task '{task}'; choose one of: {', '.join(names)}, or pass a .npz/.hdf5 file"
        )
    path = CACHE_DIR / (f"{task}-{dataset}.npz" if size is None else f"{task}-{dataset}-{size}.npz")
    if not path.exists():
        build = _builders()[task][1]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")  # written whole, then renamed: a crash leaves no half file
        np.savez_compressed(tmp, **build(task, dataset, size))
        tmp.replace(path)
    return path


def read_file(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        import h5py  # only needed for D4RL files

        with h5py.File(path, "r") as f:
            if any(k.startswith("episode_") for k in f.keys()):
                return _minari_to_d4rl(f, path)
            return {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    except ImportError:
        raise UserInputError("reading .hdf5 datasets needs h5py: pip install h5py") from None
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read dataset file '{path}' ({e}); is it a .npz or D4RL .hdf5 file?") from None


def _minari_to_d4rl(f, path: Path) -> dict[str, np.ndarray]:
    """Minari stores episodes (observations one longer than actions); flatten them into D4RL's layout."""
    columns: dict[str, list] = {k: [] for k in REQUIRED_KEYS}
    episodes = sorted((k for k in f.keys() if k.startswith("episode_")), key=lambda k: int(k.split("_")[1]))
    for name in episodes:
        episode = f[name]
        if not all(k in episode and hasattr(episode[k], "shape") for k in ("observations", "actions")):
            raise UserInputError(f"{path}: {name} has dictionary observations or actions; only flat arrays are supported")
        observations = episode["observations"][()]
        columns["observations"].append(observations[:-1])
        columns["next_observations"].append(observations[1:])
        columns["actions"].append(episode["actions"][()])
        columns["rewards"].append(episode["rewards"][()])
        columns["terminals"].append(episode["terminations"][()])
        columns["timeouts"].append(episode["truncations"][()])
    if not episodes:
        raise UserInputError(f"{path} holds no episodes")
    return {k: np.concatenate(v) for k, v in columns.items()}


def to_multi_agent(raw: dict[str, np.ndarray], env, source: str = "dataset") -> Dataset:
    """Validate a D4RL-layout dict and split it into the agents' observations and actions."""
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise UserInputError(
            f"{source} is missing {', '.join(missing)}; a dataset needs the keys {', '.join(REQUIRED_KEYS)}"
        )
    lengths = {k: len(raw[k]) for k in REQUIRED_KEYS}
    if len(set(lengths.values())) != 1:
        raise UserInputError(f"{source} has arrays of different lengths {lengths}; every key needs one row per transition")
    if lengths["rewards"] == 0:
        raise UserInputError(f"{source} holds no transitions")
    for key in REQUIRED_KEYS:
        value = np.asarray(raw[key])
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).reshape(len(value), -1).any(1).sum())
            raise UserInputError(f"{source} has NaN or infinite values in '{key}' ({bad} rows); clean or regenerate it")
    states = np.asarray(raw["observations"], dtype=np.float32)
    next_states = np.asarray(raw["next_observations"], dtype=np.float32)
    if getattr(env, "d4rl_state_prefix", False) and states.ndim == 2 and states.shape[1] > env.state_dim:
        # D4RL's ant appends contact forces to the 27 dims our global state is made of
        states, next_states = states[:, : env.state_dim], next_states[:, : env.state_dim]
    if states.ndim != 2 or states.shape[1] != env.state_dim or next_states.shape != states.shape:
        raise UserInputError(
            f"{source} has observations of shape {states.shape} and next_observations of shape {next_states.shape}; "
            f"task '{env.task}' needs [T, {env.state_dim}] global states"
        )
    actions = np.asarray(raw["actions"])
    if env.n_actions is not None:  # categorical: one integer per agent
        ok = actions.ndim == 2 and actions.shape[1] == env.n_agents and np.all(actions == np.round(actions))
        ok = ok and actions.min() >= 0 and actions.max() < env.n_actions
        expected = f"[T, {env.n_agents}] integers in [0, {env.n_actions})"
    else:
        ok = actions.ndim == 2 and actions.shape[1] == env.n_agents * env.act_dim
        expected = f"[T, {env.n_agents * env.act_dim}] joint actions"
    if not ok:
        raise UserInputError(f"{source} has actions of shape {actions.shape}; task '{env.task}' needs {expected}")

    terminals = np.asarray(raw["terminals"]).astype(bool)
    timeouts = np.asarray(raw["timeouts"]).astype(bool)
    episode_starts = np.ones_like(terminals)
    episode_starts[1:] = (terminals | timeouts)[:-1]
    return Dataset(
        states=states,
        next_states=next_states,
        observations=env.observe(states),
        next_observations=env.observe(next_states),
        actions=env.split_actions(actions),
        rewards=np.asarray(raw["rewards"], dtype=np.float32).reshape(-1),
        terminals=terminals,
        timeouts=timeouts,
        episode_starts=episode_starts,
    )


def history_index(first, t, length: int):
    """The `length` transitions before time steps `t` [B] within their episodes, for memory.

    `first` [B] is the index of the first transition of each one's episode (`episode_first()`
    at the transition; for the history of s_{t+1} pass t + 1 with the first of t's episode).
    Returns indices [B, length], oldest first, and a mask [B, length], False before the
    episode's start (those indices are clamped to valid rows; their content is meaningless).
    Works on numpy arrays and torch tensors alike.
    """
    offsets = np.arange(-length, 0)
    if not isinstance(t, np.ndarray):
        import torch

        offsets = torch.as_tensor(offsets, device=t.device)
    steps = t[:, None] + offsets
    return steps.clip(0, None), steps >= first[:, None]


def normalized_score(task: str, returns) -> float:
    """(R - random) / (expert - random) for the mean of `returns`."""
    if task not in REFERENCE_RETURNS:
        raise UserInputError(
            f"no reference returns for task '{task}' yet; measure them with: python -m data.mujoco_datasets --task {task}"
        )
    random_return, expert_return = REFERENCE_RETURNS[task]
    return float((np.mean(returns) - random_return) / (expert_return - random_return))


def new_run_dir(runs_dir: str | Path, name: str) -> Path:
    """Create and return the folder runs_dir/name for a run's logs, model and result.json. Run names
    end with the start second, so two runs of one setting started together (a sweep in a shell
    loop) would share a folder and overwrite each other: the later ones get name-2, name-3, ..."""
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = Path(runs_dir) / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            path.mkdir()  # atomic: of two processes asking for one name, exactly one gets it
            return path
        except FileExistsError:
            continue
    raise UserInputError(f"999 run folders named {name} already exist in {runs_dir}")


@contextlib.contextmanager
def stop_requests():
    """A list that gets an entry on Ctrl-C or SIGTERM, so that a training loop can save a checkpoint
    and stop cleanly after its current step (signal handlers only exist in the main thread)."""
    requests, previous = [], {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda number, frame: requests.append(number))
    try:
        yield requests
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Stopped(SystemExit):
    """A run that stopped on request (Ctrl-C or SIGTERM) after saving its checkpoint. It exits like
    sys.exit with its message (which says how to go on); benchmark/run.py tells it from a failure by its type."""


class Diverged(UserInputError):
    """Training produced a NaN or infinite loss: the settings do not suit the data. Like a bad input, the
    scripts print its message, which says what to try, on one line."""


class Progress:
    """Between evaluations (which can be an hour apart on ant), one line at most every `seconds` saying
    where a run stands: the step, the speed, the time left, and the numbers it is given. Every call
    reads those numbers (a GPU sync: call it every 100 steps or so) and stops a run whose numbers are
    no longer finite with `Diverged`, rather than let it train on NaN for hours."""

    def __init__(self, total_steps: int, start_step: int = 0, seconds: float = 60.0):
        self.total, self.seconds = total_steps, seconds
        self.start_step, self.start = start_step, time.time()
        self.last = self.start

    def __call__(self, step: int, **values) -> None:
        # .item(): a loss that still requires grad reads without a warning
        values = {name: value.item() if hasattr(value, "item") else value for name, value in values.items()}
        for name, value in values.items():
            if not math.isfinite(value):
                raise Diverged(f"{name} became {value} by step {step:,}: training diverged; try a smaller --learning-rate")
        now = time.time()
        if now - self.last < self.seconds or step <= self.start_step:
            return
        self.last = now
        rate = (step - self.start_step) / max(now - self.start, 1e-9)
        left = (self.total - step) / rate
        left = f"{left / 3600:.1f} h" if left >= 5400 else f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
        numbers = "".join(f", {name} {value:.4g}" for name, value in values.items())
        print(f"step {step:,}/{self.total:,}: {rate:.3g} steps/s, {left} left{numbers}", flush=True)


def native_bf16(cuda: bool) -> bool:
    """Whether this machine multiplies bfloat16 matrices natively: the GPU (with --cuda, when there is one)
    if it supports bfloat16, otherwise the CPU if it has AMX or AVX512-BF16."""
    import torch

    if cuda and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def bf16_if_native(requested: bool, cuda: bool, flag: str = "--bf16") -> bool:
    """`requested`, unless this machine lacks native bfloat16 matmuls: then torch emulates them and
    bfloat16 autocast is slower than float32 (5x for a batched matmul on a 2-core AVX-512 Xeon without
    AMX), so say so and run in float32."""
    import torch

    if requested and not native_bf16(cuda):
        where = "this GPU" if cuda and torch.cuda.is_available() else "this CPU (neither AMX nor AVX512-BF16)"
        print(f"{flag}: {where} has no native bfloat16 matmuls, where bfloat16 autocast is slower than float32; "
              "running in float32", flush=True)  # fmt: skip
        return False
    return requested


def compile_in_place(*modules, device) -> None:
    """torch.compile the modules in place (their state dicts keep their keys), or say why not: on CPU,
    torch's compiler needs a C++ compiler (g++ or $CXX)."""
    if getattr(device, "type", device) == "cpu" and not shutil.which(os.environ.get("CXX") or "g++"):
        print("no C++ compiler (g++ or $CXX): the memory module runs uncompiled, about 1.5x slower", flush=True)
        return
    for module in modules:
        module.compile()


def resume(args):
    """For `--resume RUN`: the settings RUN was started with (keeping a newly given --total-steps, and
    --cuda as given now: where to run is this command's choice, so a CPU run can go on on a GPU and back),
    its folder and its checkpoint. RUN is a run folder or its model.pt. Saved settings that a later
    version of the script no longer has are dropped, and printed."""
    import torch

    path = Path(args.resume)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserInputError(f"nothing to resume at '{args.resume}'; pass a run folder holding a model.pt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    known = {f.name for f in fields(type(args))}
    dropped = {k: v for k, v in checkpoint["args"].items() if k not in known}
    if dropped:
        print(f"ignoring saved settings this version does not have: {dropped}")
    saved = type(args)(**{k: v for k, v in checkpoint["args"].items() if k in known})
    saved.total_steps, saved.resume = args.total_steps or saved.total_steps, args.resume
    if hasattr(saved, "cuda"):
        saved.cuda = args.cuda
    return saved, path.parent, checkpoint


def restore(checkpoint: dict, run_dir: Path, **stateful) -> tuple[int, float]:
    """Load each named object (a module or optimiser) from the checkpoint's entry of that name and
    torch's generators from its "rng"; returns the step to go on from and the run's seconds so far."""
    for name, target in stateful.items():
        target.load_state_dict(checkpoint[name])
    set_rng_state(checkpoint["rng"])
    print(f"resuming {run_dir} at step {checkpoint['step']}", flush=True)
    return checkpoint["step"], checkpoint.get("wall_seconds", 0.0)


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write `state` to run_dir/model.pt atomically: an interrupted write leaves the previous one intact."""
    import torch

    torch.save(state, run_dir / "model.pt.tmp")
    (run_dir / "model.pt.tmp").replace(run_dir / "model.pt")


def rng_state() -> dict:
    """torch's global generators (CPU and every GPU): all that the training loops draw from."""
    import torch

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
