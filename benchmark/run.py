"""Run a grid of the paper's experiments and write its results table.

    python benchmark/run.py --table 3 --seeds 10     # Table 3: the Iterated Coordination Game
    python benchmark/run.py --table 4a --seeds 3 --total-steps 100000 --algos ibc maiql
                                                     # Table 4a: two-agent Reacher (a budget and subset)
    python benchmark/run.py --table 4b --seeds 3 --datasets medium --obs po
                                                     # Table 4b: four-agent Ant, one row
    python benchmark/run.py --table 4b --add runs/variants/ant-po-medium__moma_ppo__0__1795394592
                                                     # record a run made by hand (e.g. resumed over sessions)

Each run is one call of a script's main() inside a worker process (one worker per core,
one torch thread each), so the scripts' import time is paid once per worker. Every
finished run is appended at once to benchmark/results/table{N}.csv (one row per run):
an interrupted grid resumes where it stopped, skipping the rows already there, and each
run it left unfinished goes on from its last checkpoint (--overwrite starts over). The markdown table (mean ± standard error over seeds, the
paper's numbers beside ours) is written to benchmark/results/table{N}.md and into
README.md between the table's markers.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # envs/ and data/, without installing
import data  # noqa: E402
import envs  # noqa: E402

RESULTS = ROOT / "benchmark" / "results"
COLUMNS = ["algo", "task", "obs", "dataset", "seed", "normalized_score", "return", "wall_seconds", "device", "total_steps"]
CURVE_COLUMNS = ["algo", "task", "obs", "dataset", "seed", "total_steps", "step", "normalized_score"]

# table -> task, algorithms (script, column title), rows ((obs, dataset), row title), the paper's
# numbers per (algo, obs, dataset), the CSV the runs go to, and the algorithms that only run with
# full observability (centralized execution).
ALGOS_4A = [("iql_central", "IQL"), ("maiql", "MAIQL"), ("matd3bc", "MATD3+BC"), ("ibc", "IBC"), ("itd3bc", "ITD3+BC"),
            ("icql", "ICQL"), ("iomar", "IOMAR"), ("moma_ppo", "MOMA-PPO")]  # fmt: skip
ALGOS_4B = [("iql_central", "IQL"), ("maiql", "MAIQL"), ("maiql_ft", "MAIQL-ft"), ("ibc", "IBC"), ("itd3bc", "ITD3+BC"),
            ("icql", "ICQL"), ("iomar", "IOMAR"), ("moma_ppo", "MOMA-PPO")]  # fmt: skip


def paper_cells(rows: list[tuple[str, str]], algos: list[tuple[str, str]], text: str) -> dict:
    """The paper's numbers as a whitespace table: one line per row, one cell per algorithm ('' = none)."""
    cells = {}
    for (obs, dataset), line in zip(rows, text.strip().splitlines()):
        for (algo, _), cell in zip(algos, line.split("|")):
            if cell.strip():
                cells[algo, obs, dataset] = cell.strip()
    return cells


ROWS_4A = [("all-observant", "expert-mix"), ("independent", "expert-mix"), ("leader-only", "expert-mix")]
ROWS_4B = [(obs, d) for obs in ("fo", "po") for d in ("random", "medium", "full-replay", "expert")]
TABLES = {
    "3": dict(
        task="coordination", csv="table3.csv", fo_only=(),
        algos=[("iql_central", "IQL (centralized)"), ("maiql", "MAIQL"), ("ibc", "IBC"), ("moma_ppo", "MOMA-PPO")],
        rows=[(("fo", "favorable"), "fav."), (("fo", "neutral"), "neutral"), (("fo", "unfavorable"), "unfav.")],
        paper={  # paper Table 3: mean ± standard error over 10 seeds
            ("iql_central", "fo", "favorable"): "1.0 ± 0.0", ("iql_central", "fo", "neutral"): "1.0 ± 0.0", ("iql_central", "fo", "unfavorable"): "1.0 ± 0.0",
            ("maiql", "fo", "favorable"): "1.0 ± 0.0", ("maiql", "fo", "neutral"): "0.9 ± 0.1", ("maiql", "fo", "unfavorable"): "0.0 ± 0.0",
            ("ibc", "fo", "favorable"): "1.0 ± 0.0", ("ibc", "fo", "neutral"): "0.55 ± 0.11", ("ibc", "fo", "unfavorable"): "0.0 ± 0.0",
            ("moma_ppo", "fo", "favorable"): "1.0 ± 0.0", ("moma_ppo", "fo", "neutral"): "1.0 ± 0.0", ("moma_ppo", "fo", "unfavorable"): "1.0 ± 0.0",
        },  # fmt: skip
    ),
    "4a": dict(
        task="reacher", csv="table4.csv", fo_only=("iql_central",), algos=ALGOS_4A,
        rows=[(row, f"{'FO' if row[0] == 'all-observant' else 'PO'} {row[0]}") for row in ROWS_4A],
        paper=paper_cells(ROWS_4A, ALGOS_4A, """
            1.07 ± 0.01 | 0.96 ± 0.05 | 1.04 ± 0.01 | 1.02 ± 0.01 | 0.78 ± 0.00 | 0.48 ± 0.06 | 0.73 ± 0.01 | 1.07 ± 0.01
                        | 0.92 ± 0.04 | 0.59 ± 0.03 | 0.76 ± 0.04 | 0.30 ± 0.11 | 0.46 ± 0.04 | 0.45 ± 0.02 | 0.95 ± 0.06
                        | 0.80 ± 0.05 | 0.73 ± 0.02 | 0.84 ± 0.02 | 0.48 ± 0.04 | 0.31 ± 0.05 | 0.39 ± 0.02 | 1.00 ± 0.01
        """),  # paper Table 4a: mean ± standard error over 3 seeds
    ),
    "4b": dict(
        task="ant", csv="table4.csv", fo_only=("iql_central",), algos=ALGOS_4B,
        rows=[(row, f"{row[0].upper()} ant-{row[1]}") for row in ROWS_4B],
        paper=paper_cells(ROWS_4B, ALGOS_4B, """
            0.12 ± 0.00 | 0.28 ± 0.01 | 0.28 ± 0.03 | 0.31 ± 0.00 | 0.22 ± 0.02 | 0.08 ± 0.00 | 0.08 ± 0.00 | 0.52 ± 0.07
            0.97 ± 0.02 | 0.85 ± 0.02 | 0.81 ± 0.02 | 0.84 ± 0.01 | 1.04 ± 0.00 | 0.88 ± 0.12 | 1.10 ± 0.03 | 1.29 ± 0.06
            1.22 ± 0.02 | 0.77 ± 0.21 | 0.95 ± 0.13 | 1.20 ± 0.01 | 1.33 ± 0.01 | 1.21 ± 0.02 | 1.30 ± 0.00 | 1.42 ± 0.07
            1.26 ± 0.01 | 1.24 ± 0.00 | 1.06 ± 0.07 | 1.24 ± 0.00 | 1.25 ± 0.02 | 0.73 ± 0.15 | 1.16 ± 0.01 | 1.49 ± 0.01
                        | 0.31 ± 0.00 | 0.34 ± 0.04 | 0.31 ± 0.00 | 0.31 ± 0.00 | 0.17 ± 0.02 | 0.21 ± 0.02 | 0.42 ± 0.05
                        | 0.14 ± 0.02 | 0.11 ± 0.01 | 0.17 ± 0.01 | 0.22 ± 0.05 | 0.09 ± 0.02 | 0.06 ± 0.01 | 0.54 ± 0.19
                        | 0.18 ± 0.02 | -0.07 ± 0.10 | 0.21 ± 0.02 | 0.20 ± 0.01 | 0.09 ± 0.01 | 0.11 ± 0.02 | 0.46 ± 0.10
                        | -0.16 ± 0.01 | -0.23 ± 0.02 | 0.05 ± 0.04 | 0.16 ± 0.00 | 0.11 ± 0.03 | 0.10 ± 0.01 | 0.18 ± 0.00
        """),  # paper Table 4b: mean ± standard error over 3 seeds
    ),
}


# paper Table 2: normalized min, mean, median, max (%) of each dataset's episode returns
PAPER_TABLE2 = {
    ("reacher", "expert-mix"): (38.8, 100.0, 98.9, 152.3),
    ("ant", "random"): (-3.0, 6.4, 7.2, 10.3),
    ("ant", "medium"): (-4.8, 80.2, 95.1, 107.2),
    ("ant", "full-replay"): (-22.4, 72.0, 77.8, 134.3),
    ("ant", "expert"): (-32.8, 117.4, 129.4, 142.5),
}
PAPER_REFERENCES = {"reacher": (-11.145, -4.237), "ant": (-325.6, 3879.7)}  # (random, expert) returns


@dataclass
class Args:
    table: str = "3"
    """which table of the paper to make: 2 (dataset statistics), 3 (coordination game), 4a (reacher), 4b (ant)"""
    seeds: int = 10
    """seeds 0..seeds-1 for every cell"""
    workers: int = 2
    """runs in parallel (one torch thread each); this machine has 2 cores"""
    algos: tuple[str, ...] = ()
    """run only these algorithms (script names, e.g. moma_ppo); default: all of the table's"""
    obs: tuple[str, ...] = ()
    """run only these observation settings (e.g. po); default: all of the table's"""
    total_steps: int | None = None
    """training budget of every run (default: each script's own, the paper's); runs of another budget are kept
    apart: the table shows, per cell, the budget run with the most seeds (the largest of those); the curves show all"""
    eval_every: int | None = None
    """evaluate every this many steps during training (default: each script's own; 0: only at the end)"""
    cuda: bool = False
    """pass --cuda to every run (the GPU when there is one); the workers then share the GPU, so raise --workers"""
    overwrite: bool = False
    """discard the existing results of the runs asked for instead of resuming"""
    tables_only: bool = False
    """only rebuild the markdown table and README from the existing CSV"""
    datasets: tuple[str, ...] = ()
    """run only these datasets (table 2: "task/dataset", e.g. ant/medium, remeasured while the other rows are kept)"""
    add: tuple[str, ...] = ()
    """record runs made outside the grid instead of running any (e.g. a long one continued with --resume over
    several sessions): their run folders, whose result.json and learning curve are appended to the table's CSVs"""


_modules: dict = {}


def script_module(script: str):
    """algos/{script}.py as a module, imported once per process."""
    if script not in _modules:
        spec = importlib.util.spec_from_file_location(script, ROOT / "algos" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[script] = module
    return _modules[script]


def run_one(job: tuple[str, list[str]]) -> dict:
    """Worker: run one script's main() with command-line arguments, quietly. A failure is returned, not
    raised, so that one broken job does not stop a grid of many hours."""
    import torch

    torch.set_num_threads(1)
    script, argv = job
    try:
        module = script_module(script)
        with contextlib.redirect_stdout(io.StringIO()):
            result = module.main(tyro.cli(module.Args, args=argv))
    except (Exception, SystemExit) as error:  # SystemExit: tyro rejecting the arguments, or a stop request
        stopped = isinstance(error, data.Stopped)  # Ctrl-C / SIGTERM: the script saved a checkpoint first
        return {"error": str(error.code) if stopped else traceback.format_exc(), "stopped": stopped, "algo": script, "argv": argv}
    result["curve"] = learning_curve(Path(result["run_dir"]))
    return result


def stop_workers_on_sigterm() -> None:
    """`kill GRID_PID` stops the grid as Ctrl-C does: every running script gets the signal, saves its
    checkpoint and stops (SIGTERM to this process alone used to end the workers without one)."""

    def forward(signum, frame):
        for child in mp.active_children():
            os.kill(child.pid, signal.SIGTERM)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, forward)


def unfinished_run(script: str, argv: list[str]) -> Path | None:
    """The folder of an interrupted run of exactly this job, if there is one to go on from: same script,
    same settings (every flag the job sets, and the task defaults for those it leaves unset) and same
    budget, with a checkpoint (model.pt) and no result.json. The newest such folder wins."""
    import torch

    module = script_module(script)
    wanted = asdict(tyro.cli(module.Args, args=argv))
    defaults = getattr(module, "TASK_DEFAULTS", {}).get(wanted["task"], {})
    wanted = {key: defaults.get(key) if value is None else value for key, value in wanted.items()}
    for flag in ("bf16", "wm_bf16"):  # as the scripts settle them: off where bfloat16 is only emulated
        if wanted.get(flag):
            wanted[flag] = data.native_bf16(wanted["cuda"])
    del wanted["cuda"]  # the device is the resuming command's: a run begun on the CPU goes on under --cuda
    prefix = f"{wanted['task']}-{wanted['obs']}-{Path(wanted['dataset']).stem}__{script}__{wanted['seed']}__"
    for folder in sorted(Path(wanted["runs_dir"]).glob(f"{prefix}*"), reverse=True):
        if (folder / "result.json").exists() or not (folder / "model.pt").exists():
            continue
        saved = torch.load(folder / "model.pt", map_location="cpu", weights_only=False)["args"]
        if all(saved.get(key) == value for key, value in wanted.items() if value is not None):
            return folder
    return None


def learning_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, eval/normalized_score) pairs that a run logged to TensorBoard, read back from its folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("eval/normalized_score")]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def cell_budgets(rows: list[dict], algo: str, obs: str, dataset: str) -> dict[int, list[dict]]:
    """The runs of one cell, by training budget."""
    budgets = {}
    for r in rows:
        if (r["algo"], r.get("obs") or "fo", r["dataset"]) == (algo, obs, dataset):
            budgets.setdefault(int(r["total_steps"]), []).append(r)
    return budgets


def cell_runs(rows: list[dict], algo: str, obs: str, dataset: str) -> list[dict]:
    """The runs the table shows for one cell: the budget run with the most seeds, the largest of those.
    A longer budget started on one seed (to see where a curve goes) does not replace three seeds of a shorter one."""
    budgets = cell_budgets(rows, algo, obs, dataset)
    if not budgets:
        return []
    return budgets[max(budgets, key=lambda steps: (len({r["seed"] for r in budgets[steps]}), steps))]


def summary_table(table: str, rows: list[dict]) -> str:
    spec = TABLES[table]
    header = "| | " + " | ".join(title for _, title in spec["algos"]) + " |"
    lines = [header, "|" + "---|" * (len(spec["algos"]) + 1)]
    runs = {(algo, *row): cell_runs(rows, algo, *row) for row, _ in spec["rows"] for algo, _ in spec["algos"]}
    shown = [r for cell in runs.values() for r in cell]
    seeds = sorted({int(r["seed"]) for r in shown})
    for row, row_title in spec["rows"]:
        cells = []
        for algo, _ in spec["algos"]:
            scores = np.array([float(r["normalized_score"]) for r in runs[(algo, *row)]])
            if len(scores) == 0:
                ours = "–"
            else:
                if len(scores) == 1:
                    ours = f"**{scores[0]:.2f}** (1 seed)"
                else:
                    sem = scores.std(ddof=1) / np.sqrt(len(scores))
                    ours = f"**{scores.mean():.2f} ± {sem:.2f}**" + (f" ({len(scores)} seeds)" if len(scores) != len(seeds) else "")
            paper = spec["paper"].get((algo, *row))
            cells.append(f"{ours} ({paper})" if paper else ours)
        lines.append(f"| {row_title} | " + " | ".join(cells) + " |")
    seconds = sum(float(r["wall_seconds"]) for r in shown)
    on_gpu = sum(r.get("device", "cpu").startswith("cuda") for r in shown)
    runs = f"{len(shown)} runs, {seconds / 60:.1f} CPU-minutes" if not on_gpu else (
        f"{len(shown)} runs ({on_gpu} of them on a GPU), {seconds / 60:.1f} minutes")
    kind = lambda obs: "FO" if obs in ("fo", "all-observant") else "PO"  # noqa: E731
    # One budget per algorithm and FO/PO; where the rows within it differ, the rows of each budget are named.
    titles = dict(spec["rows"])
    steps_by_group = {}
    for r in shown:
        obs = r.get("obs") or "fo"
        group = steps_by_group.setdefault((r["algo"], kind(obs)), {})
        group.setdefault(int(r["total_steps"]), {}).setdefault(titles[obs, r["dataset"]], None)
    budget_parts = []
    for (algo, group), by_steps in sorted(steps_by_group.items()):
        if len(by_steps) == 1:
            budget_parts.append(f"{algo} {next(iter(by_steps)):,} ({group})")
        else:
            budget_parts += [f"{algo} {steps:,} ({', '.join(rows)})" for steps, rows in sorted(by_steps.items())]
    budgets = ", ".join(budget_parts)
    lines.append("")
    lines.append(
        f"Ours in bold: mean ± standard error over seeds {seeds[0]}–{seeds[-1]} ({len(seeds)} seeds) of the normalized "
        f"score, greedy policies, 100 evaluation episodes; the paper's in brackets. "
        f"{runs} in all (`python benchmark/run.py --table {table} --seeds {len(seeds)}`). Training steps: {budgets}."
        if seeds
        else "No results yet."
    )
    return "\n".join(lines) + "\n"


def curves_table(table: str, rows: list[dict]) -> str:
    """The learning curves behind the table's cells (mean normalized score over the seeds at each
    evaluation), to show whether the runs had flattened at the budget they were given."""
    spec = TABLES[table]
    path = RESULTS / f"{Path(spec['csv']).stem}_curves.csv"
    curves = [r for r in read_rows(path) if r["task"] == spec["task"]]
    lines = ["| algorithm | setting | steps | seeds | mean normalized score at each evaluation |", "|---|---|---|---|---|"]
    for row, row_title in spec["rows"]:
        for algo, algo_title in spec["algos"]:
            # Every budget of the cell, not only the one in the table: longer runs show where the curve goes.
            for budget, runs in sorted(cell_budgets(rows, algo, *row).items()):
                seeds = {r["seed"] for r in runs}
                points = [r for r in curves if (r["algo"], r["obs"], r["dataset"]) == (algo, *row)
                          and int(r["total_steps"]) == budget and r["seed"] in seeds]  # fmt: skip
                steps = sorted({int(r["step"]) for r in points})
                means = [np.mean([float(r["normalized_score"]) for r in points if int(r["step"]) == t]) for t in steps]
                text = ", ".join(f"{t:,}: {m:.2f}" for t, m in zip(steps, means)) or "not recorded"
                lines.append(f"| {algo_title} | {row_title} | {budget:,} | {len(seeds)} | {text} |")
    return "\n".join(lines) + "\n"


def write_tables(table: str, rows: list[dict]) -> str:
    text = summary_table(table, rows)
    write_readme_section(table, text)
    if table.startswith("4"):
        (RESULTS / f"table{table}_curves.md").write_text(curves_table(table, rows))
    return text


def write_readme_section(table: str, text: str) -> None:
    """Write a table to benchmark/results/table{N}.md and into README.md between its markers."""
    (RESULTS / f"table{table}.md").write_text(text)
    readme = ROOT / "README.md"
    start, end = f"<!-- table{table}:start -->", f"<!-- table{table}:end -->"
    if readme.exists() and start in readme.read_text():
        content = readme.read_text()
        before, rest = content.split(start, 1)
        after = rest.split(end, 1)[1]
        readme.write_text(f"{before}{start}\n{text}{end}{after}")


def table2(only: tuple[str, ...] = ()) -> None:
    """Dataset statistics (paper Table 2): builds the datasets it can, from the committed policies.

    `only` ("task/dataset", e.g. "ant/medium") remeasures those rows and keeps the others from the CSV.
    """
    csv_path = RESULTS / "table2.csv"
    rows = {(r["task"], r["dataset"]): r for r in read_rows(csv_path)} if only else {}
    unknown = set(only) - {f"{task}/{dataset}" for task, dataset in PAPER_TABLE2}
    if unknown:
        sys.exit(f"error: unknown dataset(s) {', '.join(sorted(unknown))}; choose from {', '.join(f'{t}/{d}' for t, d in PAPER_TABLE2)}")
    for task, dataset in PAPER_TABLE2:
        if only and f"{task}/{dataset}" not in only:
            continue
        if task not in data.REFERENCE_RETURNS:
            print(f"{task}: no reference returns yet (python -m data.mujoco_datasets --task {task}); skipping {dataset}")
            continue
        start = time.time()
        ds = data.load(envs.make(task), dataset)
        random_return, expert_return = data.REFERENCE_RETURNS[task]
        scores = 100 * (ds.episode_returns() - random_return) / (expert_return - random_return)
        row = dict(
            task=task, dataset=dataset, transitions=len(ds), episodes=len(scores),
            min=round(float(scores.min()), 1), mean=round(float(scores.mean()), 1), median=round(float(np.median(scores)), 1),
            max=round(float(scores.max()), 1), random_return=round(random_return, 3), expert_return=round(expert_return, 3),
        )  # fmt: skip
        rows[task, dataset] = row
        print(f"{task} {dataset}: {row} ({time.time() - start:.0f}s)")
        if task == "reacher":  # the elbow convention of each episode: the sign of its mean elbow angle
            elbow = np.arctan2(ds.states[:, 3], ds.states[:, 1])
            episode = np.cumsum(ds.episode_starts) - 1
            up = np.bincount(episode, weights=elbow) >= 0
            print(f"reacher expert-mix: elbow up (q1 >= 0) in {up.mean():.1%} of episodes, down in {1 - up.mean():.1%}")
    if not rows:
        return
    ordered = [rows[key] for key in PAPER_TABLE2 if key in rows]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ordered[0]))
        writer.writeheader()
        writer.writerows(ordered)
    lines = [
        f"| {row['task']} | {row['dataset']} | "
        + " | ".join(f"**{row[k]}** ({p})" for k, p in zip(("min", "mean", "median", "max"), PAPER_TABLE2[row["task"], row["dataset"]]))
        + f" | **{float(row['expert_return']):.1f}** ({PAPER_REFERENCES[row['task']][1]})"
        + f" | **{float(row['random_return']):.1f}** ({PAPER_REFERENCES[row['task']][0]}) |"
        for row in ordered
    ]
    text = "\n".join(
        ["| task | dataset | min (%) | mean (%) | median (%) | max (%) | expert return | random return |", "|---|---|---|---|---|---|---|---|"]
        + lines
        + ["", "Ours in bold, the paper's in brackets (its ant datasets are D4RL's, on ant-v2; ours are made here on Ant-v5)."]
    )
    write_readme_section("2", text + "\n")
    print(text)


@contextlib.contextmanager
def results_writer(csv_path: Path, rows: list[dict]):
    """A function that appends one finished run to the table's CSV, its learning curve to the
    curves CSV and its row to `rows`, each flushed at once so that an interrupted grid loses nothing."""
    curves_path = csv_path.with_name(f"{csv_path.stem}_curves.csv")  # one row per evaluation
    new_file, new_curves = not csv_path.exists(), not curves_path.exists()
    with csv_path.open("a", newline="") as f, curves_path.open("a", newline="") as curves_file:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        curves = csv.writer(curves_file)
        if new_file:
            writer.writeheader()
        if new_curves:
            curves.writerow(CURVE_COLUMNS)

        def record(result: dict) -> None:
            writer.writerow(result)
            f.flush()
            key = [result[c] for c in CURVE_COLUMNS[:6]]
            curves.writerows([*key, step, score] for step, score in result["curve"])
            curves_file.flush()
            rows.append({k: str(v) for k, v in result.items()})

        yield record


def run_key(row: dict) -> tuple[str, ...]:
    """What makes a run distinct in the CSV: algorithm, setting, seed and budget."""
    return tuple(str(row[c]) for c in ("algo", "obs", "dataset", "seed", "total_steps"))


def add_runs(run_dirs: tuple[str, ...], task: str, csv_path: Path, rows: list[dict]) -> None:
    """Append finished runs made outside the grid (their folders' result.json and curves), once each."""
    with results_writer(csv_path, rows) as record:
        for run_dir in map(Path, run_dirs):
            if not (run_dir / "result.json").is_file():
                sys.exit(f"error: {run_dir} has no result.json: the run has not finished (continue it with --resume)")
            result = json.loads((run_dir / "result.json").read_text())
            if result["task"] != task:
                sys.exit(f"error: {run_dir} ran task {result['task']}, not this table's task {task}")
            if any(run_key(r) == run_key(result) for r in rows):
                print(f"{run_dir}: already recorded (same algorithm, setting, seed and budget), skipped")
                continue
            result["curve"] = learning_curve(run_dir)
            record(result)
            print(f"{run_dir}: recorded, normalized score {result['normalized_score']:.3f}")


def grid_jobs(args: Args, task: str, cells: list[tuple[str, str, str]], rows: list[dict]) -> tuple[list, int]:
    """The runs still to make, as (script, command-line arguments), seed-major so that every cell gets its
    first seed early, and how many runs of this budget the CSV rows already hold."""
    done = {
        (r["algo"], r["obs"], r["dataset"], int(r["seed"]))
        for r in rows
        if args.total_steps is None or int(r["total_steps"]) == args.total_steps
    }
    flags = [] if args.total_steps is None else ["--total-steps", str(args.total_steps)]
    flags += [] if args.eval_every is None else ["--eval-every", str(args.eval_every)]
    flags += ["--cuda"] if args.cuda else []
    jobs = [
        (algo, ["--task", task, "--obs", obs, "--dataset", dataset, "--seed", str(seed), *flags])
        for seed in range(args.seeds)
        for algo, obs, dataset in cells
        if (algo, obs, dataset, seed) not in done
    ]
    return jobs, len(done)


def main(args: Args) -> None:
    if args.table == "2":
        RESULTS.mkdir(parents=True, exist_ok=True)
        return table2(args.datasets)
    if args.table not in TABLES:
        sys.exit(f"error: unknown table '{args.table}'; choose one of: {', '.join(TABLES)}")
    spec = TABLES[args.table]
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / spec["csv"]
    algos = [algo for algo, _ in spec["algos"] if not args.algos or algo in args.algos]
    cells = [
        (algo, obs, dataset)
        for (obs, dataset), _ in spec["rows"]
        for algo in algos
        if (not args.obs or obs in args.obs) and (not args.datasets or dataset in args.datasets)
        and (obs in ("fo", "all-observant") or algo not in spec["fo_only"])
    ]  # fmt: skip
    all_rows = read_rows(csv_path)  # table4.csv holds both 4a's and 4b's runs
    if args.overwrite:  # drop the runs of the cells asked for, keep the others
        all_rows = [r for r in all_rows if (r["algo"], r["obs"], r["dataset"]) not in cells or r["task"] != spec["task"]]
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(all_rows)
    rows = [r for r in all_rows if r["task"] == spec["task"]]
    if args.add:
        add_runs(args.add, spec["task"], csv_path, rows)
    elif not args.tables_only:
        jobs, done = grid_jobs(args, spec["task"], cells, rows)
        if done:
            print(f"resuming: {done} runs already in {csv_path.relative_to(ROOT)} (--overwrite to redo them)")
        # a run the last grid left unfinished (Ctrl-C, or the machine stopped) goes on from its checkpoint
        for i, (algo, argv) in enumerate(jobs):
            folder = None if args.overwrite else unfinished_run(algo, argv)
            if folder is not None:
                jobs[i] = (algo, ["--resume", str(folder), *(["--cuda"] if args.cuda else [])])
                print(f"{folder}: interrupted, goes on from its checkpoint")
        start = time.time()
        failed = stopped = 0
        # a fresh process per job: a grid spans hours, and a worker that kept the modules of its first job
        # would run the next jobs with that version of data/ and envs/ even after they were edited
        pool = mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1)
        stop_workers_on_sigterm()
        with results_writer(csv_path, rows) as record, pool:
            for i, result in enumerate(pool.imap_unordered(run_one, jobs), 1):
                if "error" in result:
                    stopped, failed = stopped + result["stopped"], failed + (not result["stopped"])
                    outcome = "stopped, its checkpoint kept" if result["stopped"] else "failed"
                    print(f"[{i}/{len(jobs)}] {result['algo']} {' '.join(result['argv'])}: {outcome}\n{result['error']}", flush=True)
                    continue
                record(result)
                print(
                    f"[{i}/{len(jobs)}] {result['algo']:<12} {result['obs']:<14} {result['dataset']:<12} seed {result['seed']}: "
                    f"{result['normalized_score']:.3f} ({result['wall_seconds']:.1f}s, {time.time() - start:.0f}s elapsed)",
                    flush=True,
                )
        if stopped:
            print(f"{stopped} of {len(jobs)} runs were stopped (above); the same command goes on from their checkpoints", flush=True)
        if failed:
            print(f"{failed} of {len(jobs)} runs failed (above); the others are recorded", flush=True)
    # read the CSV again: a grid running beside this one may have added rows since this one started
    rows = [r for r in read_rows(csv_path) if r["task"] == spec["task"]]
    print(write_tables(args.table, rows))


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM forwarded to the workers
        sys.exit("grid stopped: the runs in progress saved their checkpoints; the same command goes on from them")
