"""Performance benchmarks, measured: how far a cell is from its physical floor (the networks' own time), and how
fast today's code is against another revision on the same machine.

    python -m bench.perf                                # sampler, cells, grid, toy_grid -> perf.json, perf.md
    python -m bench.perf --against 7b17867              # ours / theirs on the same toy cells (~15-20 min)
    python -m bench.perf --quick --sections sampler     # 1 repeat, small batches: a smoke run
    python -m bench.perf cell --method ddpo             # one profiled toy cell, in this process
    python -m bench.perf readme                         # README's performance section from perf.json

Figures are medians (min–max) over repeats, beside the machine and its load at start and end. Sections:
``sampler``: our recording sampler against the pipeline's ``__call__`` (same model, batch, S, kernel), interleaved.
``cells``: a small toy cell per method in a fresh, warmed-up process under `bench.perf_profile.SpanProfiler`
(floor versus ours per phase, NFE/s, peak RSS, MLflow share; projected to a toy-grid cell). ``grid``: the smoke
grid on 1 and 2 joblib workers, also at toy sizes. ``toy_grid``: `nox -s bench`'s wall time, estimated from the
cells. ``against`` (``--against REV``): REV checked out in a temporary `git worktree`,
the same toy cells for ours and theirs (each a fresh process with its own tree on PYTHONPATH, same venv),
alternating; per repeat the ratios ours / theirs of train NFE/s, eval images/s, cell wall time and peak RSS.
GPU-hours of the real grids: `python -m bench.plan -m grid=<name>`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SECTIONS = ("sampler", "cells", "grid", "toy_grid", "against")
TARGETS = {"sampler_ratio": 1.10, "harness_overhead": 0.05, "peak_rss_mb": 2048.0, "grid_speedup": 1.6,
           "train_nfe_s_ratio": 1.8, "eval_images_s_ratio": 1.5}
TOY_SIZED_SMOKE = ("recipe=toy", "budget.nfe=2560", "eval.n=64", "eval.batch_size=64")
"""Overrides that turn the smoke grid's 5 cells into toy-sized ones (toy recipe, a few epochs, eval n 64)."""
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
REPO = Path(__file__).resolve().parents[1]
RATIOS = {"train_nfe_s": "train NFE/s", "eval_images_s": "eval images/s", "cell_s": "cell wall s",
          "peak_rss_mb": "peak RSS MB"}
"""What `--against` compares (ours / theirs per repeat): higher is better for the rates, lower for the rest."""


def stats(values: Sequence[float]) -> dict[str, Any]:
    """{"median", "min", "max", "n", "values"} of a list of numbers (median of an even count: the mean of the two)."""
    values = [float(v) for v in values]
    nan = float("nan")
    return {"median": statistics.median(values) if values else nan, "min": min(values, default=nan),
            "max": max(values, default=nan), "n": len(values), "values": values}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu_model": next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
                              platform.processor()), "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0),
            "load_average_start": list(os.getloadavg()), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def method_names() -> list[str]:
    import methods  # every registered method: one added there is measured with no edit here

    return methods.names()


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, **CHILD_ENV, **(env or {})}, capture_output=True,
                          text=True, **kwargs)


def _log(message: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _sampler_setup(model: str):
    """(pipeline call, sampler call), each (prompts, S, generator) -> images, for one model. Both encode the prompts,
    draw x_T from the generator, make S denoiser calls with the same stochastic kernel (DDIM eta 1 on the toy,
    Euler-ancestral on SDXL) and decode; ours also records every latent, x0-prediction and log-prob."""
    from methods import sampling
    from methods.policy import Policy
    from tasks import models as zoo

    if model == "toy-turbo":
        pipe = zoo.load_pipeline("toy-turbo")
        policy = Policy(pipe, zoo.get("toy-turbo"), full_finetune=True)  # the toy recipe trains every weight
        kwargs: dict[str, Any] = {"eta": 1.0}
    elif model == "tiny-sdxl":
        from tasks.tiny import build_tiny_sdxl

        pipe = build_tiny_sdxl()
        policy = Policy(pipe, zoo.get("sdxl-turbo"))  # LoRA adapters injected into pipe.unet: the same network
        kwargs = {"height": policy.resolution, "width": policy.resolution}
    else:
        raise ValueError(f"unknown sampler benchmark model {model!r}; use toy-turbo or tiny-sdxl")

    def run_pipe(prompts, steps, gen):
        return pipe(prompts, num_inference_steps=steps, guidance_scale=0.0, generator=gen, output_type="pt",
                    **kwargs).images

    def run_ours(prompts, steps, gen):
        return sampling.sample(policy, prompts, steps, generator=gen, eta=1.0, record=True).images

    return run_pipe, run_ours


def bench_sampler(model: str, steps: Sequence[int], batch: int, repeats: int) -> list[dict[str, Any]]:
    """Per S: wall and CPU seconds of the pipeline and of our recording sampler (interleaved repeats, alternating
    order), their per-repeat ratios, and the CPU share of each call outside the networks (last repeat profiled)."""
    import contextlib

    import torch

    from bench.perf_profile import SpanProfiler
    from tasks.toy.world import all_prompts

    runners = dict(zip(("pipeline", "sampler"), _sampler_setup(model)))
    pool = all_prompts("test")
    prompts = [pool[i % len(pool)] for i in range(batch)]

    def timed(which: str, num_steps: int, profiler: SpanProfiler | None = None) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(1234)
        wall, cpu = time.perf_counter(), time.thread_time()
        with torch.no_grad(), (profiler.instrument() if profiler else contextlib.nullcontext()):
            runners[which](prompts, num_steps, gen)
        return time.perf_counter() - wall, time.thread_time() - cpu

    rows = []
    for num_steps in steps:
        timed("pipeline", num_steps), timed("sampler", num_steps)  # warm-up (allocator, lazy imports)
        got: list[dict[str, tuple[float, float]]] = []
        profilers = {w: SpanProfiler() for w in runners}
        for r in range(repeats):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            got.append({w: timed(w, num_steps, profilers[w] if r == repeats - 1 else None) for w in order})
        row: dict[str, Any] = {"model": model, "S": num_steps, "batch": batch}
        for i, kind in enumerate(("wall", "cpu")):
            row[kind] = {"pipeline_s": stats([g["pipeline"][i] for g in got]),
                         "sampler_s": stats([g["sampler"][i] for g in got]),
                         "ratio": stats([g["sampler"][i] / g["pipeline"][i] for g in got])}
        for w, prof in profilers.items():
            row[f"{w}_outside_networks"] = prof.summary()["cpu"]["total"]["overhead"]
        rows.append(row)
        _log(f"sampler {model} S={num_steps}: ratio {row['cpu']['ratio']['median']:.3f} CPU, "
             f"{row['wall']['ratio']['median']:.3f} wall")
    return rows



def cell_overrides(method: str, *, budget: int, eval_n: int, train_steps: int, store: Path,
                   system_metrics: bool = True, eval_batch_size: int = 256) -> list[str]:
    """The toy cell perf runs: the toy grid's recipe and settings, except a small budget and eval n at S = 1, 2, 4, 8
    (the steps every revision since 7b17867 evaluates)."""
    return [f"method={method}", f"train_steps={train_steps}", f"budget.nfe={budget}", f"eval.n={eval_n}",
            "eval.steps=[1,2,4,8]",
            f"eval.batch_size={min(eval_batch_size, eval_n)}", "with_base=false", "progress=false",
            f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"tracking.system_metrics={str(system_metrics).lower()}"]


def measure_cell(overrides: list[str], *, profile: bool = True, tree: str | None = None,
                 grid: str = "perf") -> dict[str, Any]:
    """One warmed-up cell in this process: train (method.train) and eval (bench.evaluate.evaluate) timed on two
    clocks; train NFEs, eval images, peak RSS; with `profile`, the span profile (phases train, eval, other).
    Unprofiled, it runs other revisions' code (--against; `tree` must be the `bench` imported) through what every
    revision since 7b17867 has: methods.load, bench.evaluate.evaluate, bench.cell.run_cell. A revision that
    evaluates several splits by default evaluates test only, so both sides do the same work."""
    import contextlib

    import bench
    import methods
    from bench import cell as cells
    from bench import evaluate as ev
    from bench import grid as grids

    if tree and not Path(bench.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise RuntimeError(f"bench imported from {bench.__file__}, not from the tree under test {tree}")
    cfg = grids._plain(grids.compose(overrides))
    if not profile and len(cfg["eval"].get("splits", ["test"])) > 1:
        cfg = grids._plain(grids.compose([*overrides, "eval.splits=[test]"]))
    startup = warm_process(cfg, grid)
    profiler = None
    if profile:
        from bench.perf_profile import SpanProfiler

        profiler = SpanProfiler()
    seen: dict[str, Any] = {"evals": [], "train": [0.0, 0.0], "eval": [0.0, 0.0]}

    @contextlib.contextmanager
    def phase(name: str):
        start = time.perf_counter(), time.thread_time()
        with profiler.phase(name) if profiler else contextlib.nullcontext():
            yield
        seen[name] = [seen[name][0] + time.perf_counter() - start[0], seen[name][1] + time.thread_time() - start[1]]

    def load(name, *args, **kwargs):
        method = original_load(name, *args, **kwargs)
        train = method.train

        def timed_train(policy, task, budget, tracker):
            seen["budget"] = budget
            with phase("train"):
                return train(policy, task, budget, tracker)

        method.train = timed_train
        return method

    def evaluate(*args, **kwargs):
        with phase("eval"):
            seen["evals"].append(original_evaluate(*args, **kwargs))
        return seen["evals"][-1]

    original_load, original_evaluate = methods.load, ev.evaluate
    methods.load, ev.evaluate = load, evaluate
    tic = time.perf_counter()
    try:
        with profiler.instrument() if profiler else contextlib.nullcontext():
            status = cells.run_cell(cfg, grid)
    finally:
        methods.load, ev.evaluate = original_load, original_evaluate
    budget, (train_s, train_cpu), (eval_s, _) = seen.get("budget"), seen["train"], seen["eval"]
    nfe = {k: getattr(budget, k, 0) for k in ("total_nfe", "sample_nfe", "grad_nfe")}
    images = len(seen["evals"]) * int(cfg["eval"]["n"]) * len(cfg["eval"]["steps"])
    record = {
        "method": cfg["method"]["name"], "status": status, "overrides": overrides, "bench": bench.__file__,
        "train_steps": cfg["train_steps"], "budget_nfe": cfg["budget"]["nfe"], "eval_n": cfg["eval"]["n"],
        "eval_steps": list(cfg["eval"]["steps"]), "cell_s": time.perf_counter() - tic, "train_s": train_s,
        "eval_s": eval_s, "train_nfe": nfe["total_nfe"], "sample_nfe": nfe["sample_nfe"], "grad_nfe": nfe["grad_nfe"],
        "train_nfe_per_s": {k: nfe["total_nfe"] / t if nfe["total_nfe"] and t > 0 else None
                            for k, t in (("wall", train_s), ("cpu", train_cpu))},
        "eval_images": images, "eval_images_s": images / eval_s if eval_s > 0 else None,
        "eval_nfe": sum(sum(r.nfe.values()) for r in seen["evals"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "startup_s": startup}
    record["train_nfe_s"] = record["train_nfe_per_s"]["wall"]
    if profiler:
        record["profile"] = summary = profiler.summary()
        record["wall"], record["cpu"] = summary["wall"]["total"]["elapsed"], summary["cpu"]["total"]["elapsed"]
    return record


def warm_process(cfg: dict, grid: str) -> dict[str, float]:
    """A worker's one-time costs, paid before the measured cell as every cell but a worker's first finds them paid:
    the imports a cell makes, then the SQL store and the grid's experiment in it. Their seconds."""
    tic = time.perf_counter()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (bench.evaluate.save_training_curve)
    import peft  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    from PIL import ImageDraw, ImageFont  # noqa: F401

    import methods
    import tasks.models as zoo
    import tasks.rewards as rewards
    from methods import sampling  # noqa: F401

    zoo._pipeline_class(zoo.get(cfg["model"]["name"]))
    methods.method_class(cfg["method"]["name"])
    for name in {cfg["reward"]["name"], *cfg["eval"]["rewards"]}:
        rewards.REWARDS.get(name)
    imports = time.perf_counter() - tic
    from bench import tracking

    tic = time.perf_counter()
    tracking.Store(cfg["tracking"]["uri"]).experiment_id(grid)
    return {"imports": imports, "store": time.perf_counter() - tic}


def run_cells(trees: dict[str, Path], methods: Sequence[str], repeats: int, workdir: Path, *, budget: int,
              eval_n: int, train_steps: int, eval_batch_size: int = 256, plain: bool = False) -> dict[str, Any]:
    """Each method's toy cell for each tree ({who: checkout}, run with its own code on PYTHONPATH), each in a fresh
    process (clean peak memory, nothing shared), repeated; within a repeat methods interleave and the trees
    alternate (their order flips every repeat). {method: {who: [cell records]}}."""
    boot = (f"import runpy, sys; sys.argv = ['bench.perf', *sys.argv[1:]]; "
            f"runpy.run_path({str(REPO / 'bench' / 'perf.py')!r}, run_name='__main__')")  # our perf, their code
    runs: dict[str, dict[str, list]] = {m: {who: [] for who in trees} for m in methods}
    for r in range(repeats):
        for method in methods:
            for who in (list(trees) if r % 2 == 0 else list(reversed(trees))):
                store = workdir / f"cell-{who}-{method}-{r}"
                store.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-c", boot, "cell", "--methods", method, "--budget", str(budget), "--eval-n",
                       str(eval_n), "--eval-batch-size", str(eval_batch_size), "--train-steps", str(train_steps),
                       "--store", str(store), "--json", str(store / "cell.json")]
                cmd += ["--plain", "--tree", str(trees[who]), "--no-system-metrics"] if plain else []
                tic = time.perf_counter()
                proc = _run(cmd, trees[who], {"PYTHONPATH": str(trees[who])})
                if proc.returncode != 0 or not (store / "cell.json").is_file():
                    _log(f"{who} {method} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                    runs[method][who].append({"method": method, "status": "error", "error": proc.stderr[-4000:]})
                    continue
                rec = {**json.loads((store / "cell.json").read_text()), "process_seconds": time.perf_counter() - tic}
                runs[method][who].append(rec)
                _log(f"{who} {method} [{r + 1}/{repeats}] {rec['status']}: {rec['cell_s']:.1f} s, train "
                     f"{rec['train_nfe_s'] or 0:.0f} NFE/s, eval {rec['eval_images_s'] or 0:.0f} img/s, "
                     f"{rec['peak_rss_mb']:.0f} MB" + (f", overhead {rec['profile']['cpu']['total']['overhead']:.1%} "
                                                       "(CPU)" if "profile" in rec else ""))
    return runs


def summarize_cells(runs: dict[str, list[dict[str, Any]]], target: dict[str, int] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Per method and clock ("wall", "cpu"): medians/min/max over repeats of the cell time, floor, overhead of the
    cell and of its train and eval phases, MLflow share, NFE/s, and a projection to a toy-grid cell (`target`:
    {"nfe", "eval_n"}, default the toy grid's) from the phase rates; plus peak RSS and the NFE counts."""
    target = target or toy_grid()
    out: dict[str, dict[str, Any]] = {}
    for method, records in runs.items():
        ok = [r for r in records if r.get("status") == "finished"]
        if not ok:
            out[method] = {"status": records[0].get("status", "error") if records else "not run"}
            continue
        entry: dict[str, Any] = {"status": "finished", "repeats": len(ok), "peak_rss_mb": stats([r["peak_rss_mb"]
                                                                                               for r in ok])}
        entry |= {key: ok[0][key] for key in ("train_nfe", "sample_nfe", "grad_nfe", "eval_nfe")}
        for kind in ("wall", "cpu"):
            profiles = [r["profile"][kind] for r in ok]
            total = [p["total"] for p in profiles]
            phase = lambda p, name, key="elapsed": p["phases"].get(name, {}).get(key, 0.0)  # noqa: E731
            projected = [_project(r, kind, target["nfe"], target["eval_n"]) for r in ok]
            entry[kind] = {
                "cell_s": stats([t["elapsed"] for t in total]), "floor_s": stats([t["floor"] for t in total]),
                "overhead": stats([t["overhead"] for t in total]),
                "train_overhead": stats([phase(p, "train", "overhead") for p, r in zip(profiles, ok) if r["train_nfe"]]),
                "eval_overhead": stats([phase(p, "eval", "overhead") for p in profiles]),
                "tracking_fraction": stats([t["seconds"].get("tracking", 0.0) / t["elapsed"] for t in total]),
                "nfe_per_s": stats([r["train_nfe_per_s"][kind] for r in ok if r["train_nfe_per_s"][kind]]),
                "seconds_by_category": {c: stats([t["seconds"].get(c, 0.0) for t in total]) for c in total[0]["seconds"]},
                "projected_toy_cell_s": stats([x["elapsed"] for x in projected]),
                "projected_toy_cell_overhead": stats([x["overhead"] for x in projected]),
            }
        out[method] = entry
    return out


def _project(record: dict[str, Any], kind: str, nfe: int, eval_n: int) -> dict[str, float]:
    """A cell of `nfe` training NFEs and `eval_n` evaluation samples per S from one measured small cell on one
    clock: train time scales with NFEs, eval time with n, the rest (setup, MLflow, artifacts) is fixed. An estimate
    (a method's one-off costs, e.g. SPO's preference-model fit, are scaled too, so its overhead is overstated)."""
    phases = record["profile"][kind]["phases"]
    train, evals, other = (phases.get(p, {"elapsed": 0.0, "floor": 0.0}) for p in ("train", "eval", "other"))
    train_scale = nfe / record["train_nfe"] if record["train_nfe"] else 0.0
    eval_scale = eval_n / record["eval_n"]
    elapsed, floor = ((train[k] * train_scale + evals[k] * eval_scale + other[k]) for k in ("elapsed", "floor"))
    return {"elapsed": elapsed, "floor": floor, "overhead": (elapsed - floor) / elapsed if elapsed > 0 else 0.0}



def _grid_run(grid: str, workers: int, run_dir: Path, extra: Sequence[str] = ()) -> tuple[float, float, int]:
    """`python -m bench.run -m grid=<grid>` on `workers` joblib workers into a fresh store: (wall s, CPU s of its
    processes, exit code)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.run", "-m", f"grid={grid}", "hydra/launcher=joblib",
           f"hydra.launcher.n_jobs={workers}", f"tracking.uri=sqlite:///{run_dir / 'mlflow.db'}",
           f"hydra.sweep.dir={run_dir / 'multirun'}", "progress=false", *extra]
    before, tic = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = _run(cmd, run_dir)
    wall, after = time.perf_counter() - tic, resource.getrusage(resource.RUSAGE_CHILDREN)
    (run_dir / "stdout.txt").write_text(proc.stdout)
    (run_dir / "stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        _log(f"grid {grid} with {workers} worker(s) exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    _log(f"grid {grid} with {workers} worker(s): {wall:.1f} s wall, {cpu:.1f} CPU s (load {os.getloadavg()[0]:.1f})")
    return wall, cpu, proc.returncode


def bench_grid(repeats: int, workers: Sequence[int], workdir: Path, grid: str = "smoke",
               extra: Sequence[str] = ()) -> dict[str, Any]:
    """Wall and CPU seconds of the grid per worker count (worker counts alternate order across repeats); CPU s /
    wall s says how many cores the box actually gave the run."""
    got: dict[int, list[tuple[float, float, int]]] = {w: [] for w in workers}
    for r in range(repeats):
        for w in (workers if r % 2 == 0 else list(reversed(workers))):
            got[w].append(_grid_run(grid, w, workdir / f"grid-{grid}{'-overridden' if extra else ''}-w{w}-{r}", extra))
    result: dict[str, Any] = {"grid": grid, "overrides": list(extra), "workers": {
        str(w): {"wall_s": stats([g[0] for g in got[w]]), "cpu_s": stats([g[1] for g in got[w]]),
                 "cores_used": stats([g[1] / g[0] for g in got[w]])} for w in workers}}
    if len(workers) >= 2:
        result["speedup"] = stats([a[0] / b[0] for a, b in zip(got[workers[0]], got[workers[1]])])
    return result


@functools.cache
def toy_grid() -> dict[str, Any]:
    """What `nox -s bench` runs (bench/conf/grid/toy.yaml): its distinct cells as (method, K), training budget,
    eval n and eval batch size."""
    from bench import grid as grids

    composed = grids.grid_cells(["grid=toy"])
    cfg = next(c for c in composed if not grids.is_base(c))
    cells = [(c["method"]["name"], 0 if grids.is_base(c) else grids.resolved_train_steps(c)) for c in composed]
    return dict(cells=cells, nfe=int(cfg["budget"]["nfe"]), eval_n=int(cfg["eval"]["n"]),
                eval_batch_size=int(cfg["eval"]["batch_size"]))


def estimate_toy_grid(cells_summary: dict[str, dict[str, Any]], speedup: float | None) -> dict[str, Any]:
    """Serial sum of the projected toy-grid cell times (K = 4's rates for any other K), divided by the measured
    2-worker speedup of the toy-sized grid (or 2 if none). An estimate; `time nox -s bench` measures it."""
    grid = toy_grid()
    cells = grid["cells"]
    missing = sorted({m for m, _ in cells if cells_summary.get(m, {}).get("status") != "finished"})
    serial, serial_cpu = (sum(cells_summary[m][kind]["projected_toy_cell_s"]["median"] for m, _ in cells
                              if m not in missing) for kind in ("wall", "cpu"))
    factor = speedup if speedup and speedup > 0 else 2.0
    return {"kind": "estimate", "cells": len(cells), "serial_s": serial, "speedup_used": factor,
            "wall_s": serial / factor, "serial_cpu_s": serial_cpu, "wall_s_if_2_free_cores": serial_cpu / factor,
            "methods_missing": missing,
            "how": f"sum over the toy grid's cells of the projected cell time of its method ({grid['nfe']} NFEs at "
                   f"the measured NFE/s and train overhead, eval n = {grid['eval_n']} at the measured eval rate, "
                   f"fixed costs as measured), divided by the measured 2-worker speedup of the toy-sized grid"}


def ratio_summary(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per RATIOS key: ours / theirs per repeat (pairs where both finished and both values are positive) as stats,
    under `<key>_ratio`, plus each side's own stats."""
    pairs = [(o, t) for o, t in zip(ours, theirs) if o.get("status") == t.get("status") == "finished"]
    out: dict[str, Any] = {"pairs": len(pairs), "ours": {}, "theirs": {}}
    for key in RATIOS:
        both = [(o[key], t[key]) for o, t in pairs if o.get(key) and t.get(key)]
        out[f"{key}_ratio"] = stats([o / t for o, t in both])
        out["ours"][key], out["theirs"][key] = stats([o for o, _ in both]), stats([t for _, t in both])
    return out


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def bench_against(rev: str, methods: Sequence[str], repeats: int, *, budget: int, eval_n: int, train_steps: int,
                  workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`rev` in a temporary worktree (removed afterwards), the same toy cells for ours (this tree) and theirs, each
    in a fresh process, alternating (the order flips every repeat). Returns (per method: the ratios ours / theirs
    and each side's figures and runs, what was compared: revisions and cell settings)."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    side = Path(tempfile.mkdtemp(prefix="stepbench-against-")) / commit[:12]
    _git("worktree", "add", "--detach", str(side), commit)
    try:
        names = _run([sys.executable, "-c", "import json, methods; print(json.dumps(methods.names()))"], side,
                     {"PYTHONPATH": str(side)})
        if names.returncode != 0:
            raise RuntimeError(f"{rev} does not import in this venv:\n{names.stderr[-3000:]}")
        theirs_methods = set(json.loads(names.stdout.strip().splitlines()[-1]))
        common = [m for m in methods if m in theirs_methods]
        runs = run_cells({"ours": REPO, "theirs": side}, common, repeats, workdir, budget=budget, eval_n=eval_n,
                         train_steps=train_steps, plain=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(side)], capture_output=True)
        shutil.rmtree(side.parent, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)
    per_method = {m: {**ratio_summary(runs[m]["ours"], runs[m]["theirs"]), "runs": runs[m]} for m in common}
    per_method |= {m: {"status": f"not a method at {rev}"} for m in methods if m not in theirs_methods}
    return per_method, {"rev": rev, "commit": commit, "ours": _git("rev-parse", "HEAD"), "repeats": repeats,
                        "budget": budget, "eval_n": eval_n, "train_steps": train_steps, "worktree": str(side)}


def against_table(against: dict[str, dict[str, Any]]) -> str:
    """perf.json's `against` (per method) as a markdown table: ratio median (min–max); ours' own peak RSS."""
    lines = [f"| method | {' | '.join(v + ' ratio' for v in RATIOS.values())} | peak RSS MB (ours) |",
             "|---|" + "---|" * (len(RATIOS) + 1)]
    for method, e in against.items():
        if "status" in e or not e["pairs"]:
            lines.append(f"| {method} | {e.get('status', 'no finished pair')} |" + " |" * len(RATIOS))
            continue
        cells = [_fmt_stat(e[f"{k}_ratio"], "{:.2f}") for k in RATIOS]
        lines.append(f"| {method} | {' | '.join(cells)} | {_fmt_stat(e['ours']['peak_rss_mb'], '{:.0f}')} |")
    return "\n".join(lines) + "\n"



def _fmt_stat(s: dict[str, Any] | None, fmt: str = "{:.3g}", pct: bool = False) -> str:
    if not s or not s.get("n"):
        return "n/a"
    f = (lambda v: f"{100 * v:.1f}%") if pct else fmt.format
    return f(s["median"]) if s["n"] == 1 else f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [f"| {' | '.join(headers)} |", "|" + "---|" * len(headers), *(f"| {' | '.join(map(str, r))} |"
                                                                         for r in rows), ""]


def markdown(results: dict[str, Any]) -> str:
    """The perf tables as markdown: median (min–max) over repeats; CPU-clock and wall-clock figures side by side."""
    m, t = results.get("machine", {}), results.get("targets", TARGETS)
    load = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines = ["# stepbench performance", "",
             f"Machine: {m.get('cpu_model')}, {m.get('usable_cores')} usable cores, {m.get('memory_gb')} GB; torch "
             f"{m.get('torch')} with {m.get('torch_threads')} intra-op thread(s) (OMP_NUM_THREADS="
             f"{m.get('omp_num_threads')}), nice {m.get('nice')}; load average at start "
             f"{load(m.get('load_average_start', []))}, at end {load(results.get('load_average_end', []))}. Figures: "
             f"median (min–max) over repeats. CPU = CPU seconds of the benchmark's own thread(s) (stable under load); "
             f"wall = elapsed.", ""]
    if "sampler" in results:
        lines += ["### Sampler overhead (ours / pipeline `__call__`, same model, batch, S)",
                  f"Our sampler records latents, log-probs and x0-predictions. Target <= {t['sampler_ratio']:.2f}x. "
                  "'outside networks' = CPU share of one call outside denoiser/VAE/text-encoder spans.", ""]
        lines += _table(["model", "batch", "S", "pipeline CPU s", "ours CPU s", "ratio (CPU)", "ratio (wall)",
                         "outside networks: pipeline / ours"],
                        [[r["model"], r["batch"], r["S"], _fmt_stat(r["cpu"]["pipeline_s"]),
                          _fmt_stat(r["cpu"]["sampler_s"]), _fmt_stat(r["cpu"]["ratio"], "{:.3f}"),
                          _fmt_stat(r["wall"]["ratio"], "{:.3f}"), f"{100 * r['pipeline_outside_networks']:.1f}% / "
                          f"{100 * r['sampler_outside_networks']:.1f}%"] for r in results["sampler"]])
    if "cells" in results:
        c = results["cells"]
        lines += [f"### Toy cells (recipe=toy, K={c['train_steps']}, budget {c['budget']} NFEs, eval n={c['eval_n']} "
                  f"at S=1,2,4,8; {c['model_note']}; each in a fresh, warmed-up process)",
                  f"Harness overhead = share of the cell outside denoiser forward/backward, VAE, reward (incl. SPO's "
                  f"preference model) and text-encoder spans. Target <= {t['harness_overhead']:.0%}; peak RSS <= "
                  f"{t['peak_rss_mb']:.0f} MB. Projected = a toy-grid cell ({c.get('target', {}).get('nfe', '?')} "
                  f"NFEs, eval n={c.get('target', {}).get('eval_n', '?')}) extrapolated from the phase rates (an "
                  f"estimate).", ""]
        for kind, title in (("cpu", "CPU clock"), ("wall", "wall clock")):
            rows = []
            for method, e in c["summary"].items():
                if e.get("status") != "finished":
                    rows.append([method, e.get("status")] + [""] * 8)
                    continue
                s = e[kind]
                rows.append([method, _fmt_stat(s["cell_s"])] + [_fmt_stat(s[k], pct=True) for k in (
                    "overhead", "train_overhead", "eval_overhead", "tracking_fraction")] + [
                    _fmt_stat(s["nfe_per_s"], "{:.0f}"), _fmt_stat(e["peak_rss_mb"], "{:.0f}"),
                    _fmt_stat(s["projected_toy_cell_s"], "{:.0f}"), _fmt_stat(s["projected_toy_cell_overhead"], pct=True)])
            lines += [f"#### {title}", ""] + _table(
                ["method", "cell s", "overhead (cell)", "overhead (train)", "overhead (eval)", "MLflow share",
                 "train NFE/s", "peak RSS MB", "projected toy-grid cell s", "projected overhead"], rows)
    for key in ("grid", "grid_toy_sized"):
        if key in results:
            g = results[key]
            what = f"{g['grid']} grid" + (f" with {' '.join(g['overrides'])}" if g.get("overrides") else "")
            lines += [f"### Grid scaling ({what}, joblib launcher)", f"Target >= {t['grid_speedup']}x. CPU s = user+sys "
                      "seconds of the run's processes; cores used = CPU s / wall s (what the box gave the run).", ""]
            lines += _table(["workers", "wall s", "CPU s", "cores used"], [
                [w, _fmt_stat(s["wall_s"]), _fmt_stat(s["cpu_s"]), _fmt_stat(s["cores_used"], "{:.2f}")]
                for w, s in g["workers"].items()])
            if "speedup" in g:
                lines += [f"Speedup 1 -> 2 workers (wall): {_fmt_stat(g['speedup'], '{:.2f}')}x.", ""]
    if "toy_grid" in results:
        tg = results["toy_grid"]
        lines += ["### Toy grid (`nox -s bench`)",
                  f"ESTIMATE (not measured; `time nox -s bench` measures it): {tg['wall_s'] / 60:.0f} min at this run's load, "
                  f"{tg.get('wall_s_if_2_free_cores', float('nan')) / 60:.0f} min on 2 free cores, for {tg['cells']} "
                  f"cells ({tg['how']}).", ""]
    if "against" in results:
        a = results["against_run"]
        lines += [f"### Against {a['rev']} ({a['commit'][:10]}): ours ({a['ours'][:10]}) / theirs",
                  f"Same toy cells (K={a['train_steps']}, {a['budget']} NFEs, eval n={a['eval_n']}, test split), "
                  f"alternating, {a['repeats']} repeat(s); median (min–max) of the per-repeat ratios. Targets: train "
                  f"NFE/s >= {t['train_nfe_s_ratio']}x, eval images/s >= {t['eval_images_s_ratio']}x.", "",
                  against_table(results["against"])]
    return "\n".join(lines) + "\n"



PERF_BEGIN = "<!-- perf:begin (generated by `python -m bench.perf readme` from perf.json; edits here are overwritten) -->"
PERF_END = "<!-- perf:end -->"


def write_readme(results: dict[str, Any], readme: Path) -> bool:
    """Replace README's text between PERF_BEGIN and PERF_END by the perf tables (no title); True if it changed."""
    old = readme.read_text(encoding="utf-8")
    start, end = old.find(PERF_BEGIN), old.find(PERF_END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme} has no generated performance section: add the lines {PERF_BEGIN!r} and {PERF_END!r}")
    new = old[:start + len(PERF_BEGIN)] + "\n" + markdown(results).split("\n", 2)[2].strip() + "\n" + old[end:]
    readme.write_text(new, encoding="utf-8")
    return new != old


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("command", nargs="?", default="run", choices=("run", "cell", "readme"), help="run: the sections (default); "
        "cell: one toy cell of the one method in --methods, in this process; readme: README's section from --out")
    add("--out", default="perf.json", help="JSON results (default perf.json)")
    add("--markdown", default="perf.md", help="markdown tables (default perf.md)")
    add("--sections", default=None, help=f"comma list of {', '.join(SECTIONS)} (default: all but against; with "
        "--against: against)")
    add("--against", default=None, metavar="REV", help="git revision to compare against (e.g. 7b17867)")
    add("--quick", action="store_true", help="1 repeat, small batches and budgets (smoke run)")
    add("--repeats", type=int, default=None, help="repeats of the sampler benchmark (default 5)")
    add("--cell-repeats", type=int, default=None, help="repeats of each method's cell (default 2)")
    add("--grid-repeats", type=int, default=1, help="repeats of the smoke grid per worker count")
    add("--methods", default=None, help="comma list of methods (default: every registered method)")
    add("--steps", default="1,2,4,8", help="sampler step counts S")
    add("--toy-batch", type=int, default=None, help="sampler batch on toy-turbo (default 32)")
    add("--sdxl-batch", type=int, default=8, help="sampler batch on the tiny SDXL pipeline")
    add("--budget", type=int, default=None, help="NFE budget of the cells (default 4096; --against 2048)")
    add("--eval-n", type=int, default=None, help="eval n of the cells (default 64; --against 32)")
    add("--eval-batch-size", type=int, default=None, help="eval batch of the cells (default: the toy grid's)")
    add("--train-steps", type=int, default=4, help="K of the cells")
    add("--workdir", default=None, help="scratch folder (default: a temporary one)")
    add("--store", default=None, help="cell: folder of its throw-away MLflow store")
    add("--json", default=None, help="cell: write its record here (default: print it)")
    add("--no-system-metrics", action="store_true", help="cell: no MLflow system metrics")
    add("--plain", action="store_true", help="cell: no span profiler (the --against measurement)")
    add("--tree", default=None, help="cell --plain: the checkout whose code must be the one imported")
    add("--readme", default="README.md", help="readme: the file to rewrite")
    args = parser.parse_args(argv)
    default = ["against"] if args.against else [s for s in SECTIONS if s != "against"]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()] if args.sections else default
    if unknown := sorted(set(args.sections) - set(SECTIONS)):
        parser.error(f"unknown section(s) {', '.join(unknown)}; available: {', '.join(SECTIONS)}")
    if "against" in args.sections and not args.against:
        parser.error("section 'against' needs --against REV (a git revision, e.g. 7b17867)")
    if args.against:
        try:
            _git("rev-parse", "--verify", f"{args.against}^{{commit}}")
        except ValueError:
            parser.error(f"--against {args.against!r} is not a commit of {REPO}")
    registered = method_names()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else registered
    if bad := sorted(set(args.methods) - set(registered)):
        parser.error(f"unknown method(s) {', '.join(bad)}; available: {', '.join(registered)}")
    if args.command == "cell" and len(args.methods) != 1:
        parser.error(f"cell runs one method: --methods <one of {', '.join(registered)}>")
    for name in ("repeats", "cell_repeats", "grid_repeats", "budget", "eval_n", "eval_batch_size", "train_steps"):
        if (value := getattr(args, name)) is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    quick, sections = args.quick, args.sections
    repeats, cell_repeats = args.repeats or (1 if quick else 5), args.cell_repeats or (1 if quick else 2)
    budget = args.budget or (2048 if args.against else 2560 if quick else 4096)
    eval_n = args.eval_n or (32 if args.against else 16 if quick else 64)
    if args.command == "readme":
        changed = write_readme(json.loads(Path(args.out).read_text()), Path(args.readme))
        print(f"{args.readme}: performance section {'rewritten' if changed else 'unchanged'} from {args.out}")
        return 0
    if args.command == "cell":
        store = Path(args.store or tempfile.mkdtemp(prefix="stepbench-perf-cell-"))
        store.mkdir(parents=True, exist_ok=True)
        overrides = cell_overrides(args.methods[0], budget=budget, eval_n=eval_n, train_steps=args.train_steps,
                                   store=store, system_metrics=not args.no_system_metrics,
                                   eval_batch_size=args.eval_batch_size or 256)
        record = measure_cell(overrides, profile=not args.plain, tree=args.tree)
        text = json.dumps(record, indent=2, default=str)
        Path(args.json).write_text(text) if args.json else print(text)
        return 0 if record["status"] == "finished" else 1

    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    results: dict[str, Any] = {"machine": machine(), "targets": TARGETS, "argv": argv, "toy_model": "toy-turbo weights"}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="stepbench-perf-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _log(f"machine: {results['machine']['cpu_model']}, load {results['machine']['load_average_start']}; "
         f"sections {', '.join(sections)}; scratch {workdir}")

    def save() -> None:
        results["load_average_end"] = list(os.getloadavg())
        out.write_text(json.dumps(results, indent=2, default=str))
        Path(args.markdown).write_text(markdown(results))

    if "sampler" in sections:
        steps = [int(s) for s in args.steps.split(",")]
        results["sampler"] = (bench_sampler("toy-turbo", steps, args.toy_batch or (8 if quick else 32), repeats)
                              + bench_sampler("tiny-sdxl", steps, args.sdxl_batch, repeats))
        save()
    if "cells" in sections:
        grid = toy_grid()
        runs = {m: r["ours"] for m, r in run_cells({"ours": REPO}, args.methods, cell_repeats, workdir, budget=budget,
                                                   eval_n=eval_n, train_steps=args.train_steps,
                                                   eval_batch_size=args.eval_batch_size or grid["eval_batch_size"]).items()}
        results["cells"] = {"budget": budget, "eval_n": eval_n, "train_steps": args.train_steps,
                            "model_note": "toy-turbo weights", "repeats": cell_repeats, "runs": runs,
                            "target": {"nfe": grid["nfe"], "eval_n": grid["eval_n"]}, "summary": summarize_cells(runs)}
        save()
    if "grid" in sections:
        results["grid"] = bench_grid(args.grid_repeats, (1, 2), workdir)
        save()
        # The smoke grid's cells are seconds of work against ~8 CPU-s of imports per worker process, so it cannot
        # scale; the same 5 cells at toy sizes show what a second worker buys on real work.
        results["grid_toy_sized"] = bench_grid(args.grid_repeats, (1, 2), workdir, extra=TOY_SIZED_SMOKE)
        save()
    if "toy_grid" in sections:
        if "cells" in results:
            speedup = (results.get("grid_toy_sized") or results.get("grid") or {}).get("speedup", {}).get("median")
            results["toy_grid"] = estimate_toy_grid(results["cells"]["summary"], speedup)
        save()
    if "against" in sections:
        results["against"], results["against_run"] = bench_against(
            args.against, args.methods, cell_repeats, budget=budget, eval_n=eval_n, train_steps=args.train_steps,
            workdir=workdir)
        save()
        print(against_table(results["against"]), flush=True)
    save()
    _log(f"wrote {args.out} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
