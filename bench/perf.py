"""Performance benchmarks: how far a cell is from its physical floor (the networks' own time), measured, not guessed.

    python -m bench.perf --out perf.json --markdown perf.md        # everything (nox -s perf)
    python -m bench.perf --quick --sections sampler                # 1 repeat, small batches: a smoke run
    python -m bench.perf --sections cells --methods ddpo,sft       # some methods' toy cells only
    python -m bench.perf --toy-grid                                # also time `nox -s bench`'s toy grid (tens of minutes)
    python -m bench.perf cell --method ddpo --json cell.json       # one profiled toy cell, in this process
    python -m bench.perf paper                                     # the on-paper GPU estimate only (no timing)

Every timed figure is a median over repeats with its min and max; the machine (CPU, cores, torch, threads, load
average at start and end) is recorded beside them, because on a shared 2-core box the load moves numbers by 2x.
Sections:

- ``sampler``: `methods.sampling.sample` (recording latents, log-probs, x0-predictions) against the pipeline's own
  ``__call__`` at the same model, batch and step count, on toy-turbo and a tiny SDXL pipeline; repeats interleave
  the two (and alternate their order) so load drift cancels in the per-repeat ratio.
- ``cells``: one toy cell per method (recipe=toy, K = 4, a small NFE budget, small eval n), each in a fresh process,
  run through `bench.cell.run_cell` against a throw-away SQLite store under `bench.perf_profile.SpanProfiler`:
  wall time split into floor (denoiser forward/backward, VAE, reward, text encoder) and ours, per phase (setup and
  logging, train, eval); training throughput in NFEs/s; peak resident memory of the process (ru_maxrss);
  MLflow time as a fraction of the cell. The toy-grid cell (20k NFEs, eval n = 512) is projected from the phase
  rates (labelled a projection).
- ``grid``: the smoke grid under the joblib launcher with 1 and 2 workers (wall, and the CPU seconds the workers got).
- ``toy_grid``: an estimate of `nox -s bench`'s wall time from the per-cell numbers, or (``--toy-grid``) a real run.
- ``paper``: FLOPs per NFE of the SD-Turbo / SDXL-Turbo UNets (counted on the meta device from their published
  configs), NFEs per cell at the sd-turbo / sdxl-turbo grid budgets, and the GPU-hours that implies.

Run niced on shared machines (``nice -n 15``); one torch thread per process (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SECTIONS = ("sampler", "cells", "grid", "toy_grid", "paper")
TARGETS = {"sampler_ratio": 1.10, "harness_overhead": 0.05, "peak_rss_mb": 2048.0, "grid_speedup": 1.6}
TOY_SIZED_SMOKE = ("recipe=toy", "budget.nfe=2560", "eval.n=64", "eval.batch_size=64")
"""Overrides that turn the smoke grid's 5 cells into toy-sized ones (toy recipe, a few epochs, eval n 64)."""
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
REPO = Path(__file__).resolve().parents[1]


# ============================================================================================== small helpers


def stats(values: Sequence[float]) -> dict[str, Any]:
    """{"median", "min", "max", "n", "values"} of a list of numbers (median of an even count: the mean of the two)."""
    values = [float(v) for v in values]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": model, "logical_cores": os.cpu_count(), "usable_cores": usable,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "nice": os.nice(0), "load_average_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def method_names() -> list[str]:
    """Every registered method (methods/__init__.py): a method added there is profiled with no edit here."""
    import methods

    return methods.names()


def _env() -> dict[str, str]:
    return {**os.environ, **CHILD_ENV}


def _log(message: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {message}", flush=True)


def toy_model_path(cache: Path | None = None) -> tuple[str | None, str]:
    """(model.path override or None, note). toy-turbo's shipped weights when present; else toy-base's (same
    architecture, so timings hold, but rewards differ); else a random-weight pipeline of that architecture."""
    from tasks import models as zoo

    turbo = Path(zoo.get("toy-turbo").source)
    if (turbo / "model_index.json").is_file():
        return None, "toy-turbo weights"
    base = Path(zoo.get("toy-base").source)
    if (base / "model_index.json").is_file():
        return str(base), "toy-base weights standing in for toy-turbo (same architecture; rewards differ)"
    cache = cache or Path(tempfile.gettempdir()) / "stepbench-perf-toy"
    if not (cache / "model_index.json").is_file():
        import torch

        from tasks.toy.pipeline import ToyPipeline, ToyTextEncoder, build_scheduler, build_unet

        torch.manual_seed(0)
        ToyPipeline(build_unet((16, 32, 64)), ToyTextEncoder(out_dim=64), build_scheduler()).save_pretrained(cache)
    return str(cache), "random-weight toy pipeline (toy-turbo's architecture) standing in for toy-turbo"


# ============================================================================================== sampler


def _prompts(n: int) -> list[str]:
    from tasks.toy.world import all_prompts

    pool = all_prompts("test")
    return [pool[i % len(pool)] for i in range(n)]


def _sampler_setup(model: str, toy_path: str | None):
    """(policy, pipeline call(prompts, S, generator), sampler call(prompts, S, generator)) for one model.

    Both calls do the same work: encode the prompts, draw x_T from the generator, S denoiser calls with the same
    stochastic kernel (DDIM eta = 1 on the toy, Euler-ancestral on SDXL), decode; ours also records every latent,
    x0-prediction and log-prob."""
    from methods import sampling
    from methods.policy import Policy
    from tasks import models as zoo

    if model == "toy-turbo":
        spec = zoo.get("toy-turbo")
        pipe = zoo.load_pipeline("toy-turbo", path=toy_path)
        # The toy recipe trains every weight (no LoRA layers); the pipeline then runs the very same UNet.
        policy = Policy(pipe, spec, full_finetune=True)

        def run_pipe(prompts, steps, gen):
            return pipe(prompts, steps, guidance_scale=0.0, generator=gen, eta=1.0, output_type="pt").images
    elif model == "tiny-sdxl":
        from tasks.tiny import build_tiny_sdxl

        spec = zoo.get("sdxl-turbo")
        pipe = build_tiny_sdxl()
        policy = Policy(pipe, spec)  # LoRA adapters injected into pipe.unet: both paths run the same network
        side = policy.resolution

        def run_pipe(prompts, steps, gen):
            return pipe(prompts, num_inference_steps=steps, guidance_scale=0.0, height=side, width=side,
                        generator=gen, output_type="pt").images
    else:
        raise ValueError(f"unknown sampler benchmark model {model!r}; use toy-turbo or tiny-sdxl")

    def run_ours(prompts, steps, gen):
        return sampling.sample(policy, prompts, steps, generator=gen, eta=1.0, record=True).images

    return policy, run_pipe, run_ours


def bench_sampler(model: str, steps: Sequence[int], batch: int, repeats: int, toy_path: str | None = None
                  ) -> list[dict[str, Any]]:
    """Per S: wall and CPU seconds of the pipeline and of our recording sampler (interleaved repeats, alternating
    order), their per-repeat ratios, and the share of each call spent outside the networks (span profiler)."""
    import torch

    from bench.perf_profile import SpanProfiler

    _, run_pipe, run_ours = _sampler_setup(model, toy_path)
    prompts = _prompts(batch)
    runners = {"pipeline": run_pipe, "sampler": run_ours}

    def timed(which: str, num_steps: int, profiler: SpanProfiler | None = None) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(1234)
        wall, cpu = time.perf_counter(), time.thread_time()
        with torch.no_grad(), (profiler.instrument() if profiler else _nothing()):
            runners[which](prompts, num_steps, gen)
        return time.perf_counter() - wall, time.thread_time() - cpu

    rows = []
    for num_steps in steps:
        timed("pipeline", num_steps), timed("sampler", num_steps)  # warm-up (allocator, lazy imports)
        seconds: dict[str, dict[str, list[float]]] = {w: {"wall": [], "cpu": []} for w in runners}
        ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
        profilers = {w: SpanProfiler() for w in runners}
        for r in range(repeats):
            order = ("pipeline", "sampler") if r % 2 == 0 else ("sampler", "pipeline")
            # The last repeat runs under the span profiler (hooks cost microseconds per network call).
            got = {w: timed(w, num_steps, profilers[w] if r == repeats - 1 else None) for w in order}
            for w, (wall, cpu) in got.items():
                seconds[w]["wall"].append(wall)
                seconds[w]["cpu"].append(cpu)
            ratios["wall"].append(got["sampler"][0] / got["pipeline"][0])
            ratios["cpu"].append(got["sampler"][1] / got["pipeline"][1])
        row = {"model": model, "S": num_steps, "batch": batch}
        for kind in ("wall", "cpu"):
            row[kind] = {"pipeline_s": stats(seconds["pipeline"][kind]), "sampler_s": stats(seconds["sampler"][kind]),
                         "ratio": stats(ratios[kind])}
        for w, prof in profilers.items():
            cpu = prof.summary()["cpu"]["total"]
            row[f"{w}_outside_networks"] = cpu["overhead"]  # CPU-clock share of the call outside network spans
        rows.append(row)
        _log(f"sampler {model} S={num_steps}: pipeline {statistics.median(seconds['pipeline']['cpu']):.3f} CPU s, "
             f"ours {statistics.median(seconds['sampler']['cpu']):.3f} CPU s, ratio {statistics.median(ratios['cpu']):.3f}"
             f" (wall {statistics.median(ratios['wall']):.3f})")
    return rows


def _nothing():
    import contextlib

    return contextlib.nullcontext()


# ============================================================================================== one profiled cell


def cell_overrides(method: str, *, budget: int, eval_n: int, train_steps: int, store: Path,
                   model_path: str | None, system_metrics: bool = True, eval_batch_size: int = 256) -> list[str]:
    """The toy cell perf runs: the toy grid's recipe and settings, except a small budget and eval n."""
    overrides = [f"method={method}", f"train_steps={train_steps}", f"budget.nfe={budget}", f"eval.n={eval_n}",
                 f"eval.batch_size={min(eval_batch_size, eval_n)}", "with_base=false", "progress=false",
                 f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"tracking.system_metrics={str(system_metrics).lower()}"]
    if model_path is not None:
        overrides.append(f"model.path={model_path}")
    return overrides


def run_profiled_cell(overrides: list[str], grid: str = "perf") -> dict[str, Any]:
    """Run one cell in this process under the span profiler; phases: train (method.train), eval
    (bench.evaluate.evaluate), other (setup, MLflow, artifacts). Returns the profile, NFEs and peak memory."""
    import methods
    from bench import cell as cells
    from bench import evaluate as ev
    from bench import grid as grids
    from bench.perf_profile import SpanProfiler

    cfg = grids._plain(grids.compose(overrides))
    startup = warm_process(cfg, grid)
    profiler = SpanProfiler()
    seen: dict[str, Any] = {}
    original_load, original_evaluate = methods.load, ev.evaluate

    def load(name, *args, **kwargs):
        method = original_load(name, *args, **kwargs)
        train = method.train

        def profiled_train(policy, task, budget, tracker):
            seen["budget"] = budget
            with profiler.phase("train"):
                return train(policy, task, budget, tracker)

        method.train = profiled_train
        return method

    def evaluate(*args, **kwargs):
        with profiler.phase("eval"):
            result = original_evaluate(*args, **kwargs)
        seen["eval"] = result
        return result

    methods.load, ev.evaluate = load, evaluate
    try:
        with profiler.instrument():
            status = cells.run_cell(cfg, grid)
    finally:
        methods.load, ev.evaluate = original_load, original_evaluate
    summary = profiler.summary()
    budget, result = seen.get("budget"), seen.get("eval")
    train_nfe = budget.total_nfe if budget is not None else 0
    train_time = {kind: summary[kind]["phases"].get("train", {"elapsed": 0.0})["elapsed"] for kind in summary}
    return {
        "method": cfg["method"]["name"], "status": status, "overrides": overrides,
        "train_steps": cfg["train_steps"], "budget_nfe": cfg["budget"]["nfe"], "eval_n": cfg["eval"]["n"],
        "eval_steps": list(cfg["eval"]["steps"]), "wall": summary["wall"]["total"]["elapsed"],
        "cpu": summary["cpu"]["total"]["elapsed"], "profile": summary,
        "train_nfe": train_nfe, "sample_nfe": budget.sample_nfe if budget is not None else 0,
        "grad_nfe": budget.grad_nfe if budget is not None else 0,
        "train_nfe_per_s": {kind: train_nfe / t if train_nfe and t > 0 else None for kind, t in train_time.items()},
        "eval_nfe": sum(result.nfe.values()) if result is not None else 0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "startup_s": startup,
    }


def warm_process(cfg: dict, grid: str) -> dict[str, float]:
    """Pay a worker process's one-time costs before the profiled cell, as every cell after a worker's first one
    finds them paid: the imports a cell makes (torch, diffusers pipelines, peft, pyplot, ...), then mlflow's SQL
    store (imported by bench.tracking) and the grid's experiment in it (the parent of a grid creates it before any worker starts).
    Returns their seconds (reported beside the cell, not in it)."""
    tic = time.perf_counter()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (bench.evaluate.save_training_curve)
    import pandas  # noqa: F401
    import peft  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    from PIL import Image, ImageDraw, ImageFont  # noqa: F401

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


def bench_cells(methods: Sequence[str], repeats: int, *, budget: int, eval_n: int, train_steps: int,
                model_path: str | None, workdir: Path, eval_batch_size: int = 256) -> dict[str, list[dict[str, Any]]]:
    """Each method's toy cell in a fresh process (clean peak memory, no state shared between methods), repeated;
    methods interleave within a repeat."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(repeats):
        for method in methods:
            store = workdir / f"cell-{method}-{r}"
            store.mkdir(parents=True, exist_ok=True)
            out = store / "cell.json"
            cmd = [sys.executable, "-m", "bench.perf", "cell", "--method", method, "--budget", str(budget),
                   "--eval-n", str(eval_n), "--eval-batch-size", str(eval_batch_size), "--train-steps",
                   str(train_steps), "--store", str(store),
                   "--json", str(out)]
            if model_path is not None:
                cmd += ["--model-path", model_path]
            tic = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
            if proc.returncode != 0 or not out.is_file():
                _log(f"cell {method} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                runs[method].append({"method": method, "status": "error", "error": proc.stderr[-4000:]})
                continue
            record = json.loads(out.read_text())
            record["process_seconds"] = time.perf_counter() - tic
            runs[method].append(record)
            wall, cpu = record["profile"]["wall"]["total"], record["profile"]["cpu"]["total"]
            _log(f"cell {method} [{r + 1}/{repeats}] {record['status']}: {wall['elapsed']:.1f} s wall "
                 f"(overhead {wall['overhead']:.1%}), {cpu['elapsed']:.1f} CPU s (overhead {cpu['overhead']:.1%}), "
                 f"{record['train_nfe']} train NFEs, peak {record['peak_rss_mb']:.0f} MB")
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
        entry: dict[str, Any] = {
            "status": "finished", "repeats": len(ok), "train_nfe": ok[0]["train_nfe"],
            "sample_nfe": ok[0]["sample_nfe"], "grad_nfe": ok[0]["grad_nfe"], "eval_nfe": ok[0]["eval_nfe"],
            "peak_rss_mb": stats([r["peak_rss_mb"] for r in ok]),
        }
        for kind in ("wall", "cpu"):
            profiles = [r["profile"][kind] for r in ok]

            def phase(p, name, key="elapsed"):
                return p["phases"].get(name, {}).get(key, 0.0)

            projected = [_project(r, kind, target["nfe"], target["eval_n"]) for r in ok]
            trained = [p for p, r in zip(profiles, ok) if r["train_nfe"]]
            entry[kind] = {
                "cell_s": stats([p["total"]["elapsed"] for p in profiles]),
                "floor_s": stats([p["total"]["floor"] for p in profiles]),
                "overhead": stats([p["total"]["overhead"] for p in profiles]),
                "train_s": stats([phase(p, "train") for p in profiles]),
                "train_overhead": stats([phase(p, "train", "overhead") for p in trained]),
                "eval_s": stats([phase(p, "eval") for p in profiles]),
                "eval_overhead": stats([phase(p, "eval", "overhead") for p in profiles]),
                "other_s": stats([phase(p, "other") for p in profiles]),
                "tracking_s": stats([p["total"]["seconds"].get("tracking", 0.0) for p in profiles]),
                "tracking_fraction": stats([p["total"]["seconds"].get("tracking", 0.0) / p["total"]["elapsed"]
                                            for p in profiles]),
                "train_tracking_s": stats([p["phases"].get("train", {}).get("seconds", {}).get("tracking", 0.0)
                                           for p in profiles]),
                "nfe_per_s": stats([r["train_nfe_per_s"][kind] for r in ok if r["train_nfe_per_s"][kind]]),
                "seconds_by_category": {c: stats([p["total"]["seconds"].get(c, 0.0) for p in profiles])
                                        for c in profiles[0]["total"]["seconds"]},
                "projected_toy_cell_s": stats([x["elapsed"] for x in projected]),
                "projected_toy_cell_overhead": stats([x["overhead"] for x in projected]),
            }
        out[method] = entry
    return out


def _project(record: dict[str, Any], kind: str, nfe: int, eval_n: int) -> dict[str, float]:
    """A cell of `nfe` training NFEs and `eval_n` evaluation samples per S from one measured small cell on one
    clock: train time scales with NFEs at the measured NFE/s and train overhead, eval time with n at the measured
    eval overhead, and the rest (setup, MLflow, artifacts) is taken as fixed. An estimate, not a measurement (a
    method's one-off costs, e.g. SPO's preference-model fit, are scaled too, so its overhead is overstated)."""
    phases = record["profile"][kind]["phases"]
    empty = {"elapsed": 0.0, "floor": 0.0}
    train, evals, other = (phases.get(p, empty) for p in ("train", "eval", "other"))
    train_scale = nfe / record["train_nfe"] if record["train_nfe"] else 0.0
    eval_scale = eval_n / record["eval_n"]
    elapsed = train["elapsed"] * train_scale + evals["elapsed"] * eval_scale + other["elapsed"]
    floor = train["floor"] * train_scale + evals["floor"] * eval_scale + other["floor"]
    return {"elapsed": elapsed, "floor": floor, "overhead": (elapsed - floor) / elapsed if elapsed > 0 else 0.0}


# ============================================================================================== grid scaling


def bench_grid(repeats: int, workers: Sequence[int], model_path: str | None, workdir: Path,
               grid: str = "smoke", extra: Sequence[str] = ()) -> dict[str, Any]:
    """Wall time of `python -m bench.run -m grid=<grid> hydra/launcher=joblib hydra.launcher.n_jobs=<w>` per worker
    count (fresh store each run; worker counts alternate order across repeats), plus the CPU seconds the run's
    processes got, which says how many cores the box actually gave it."""
    seconds: dict[int, list[float]] = {w: [] for w in workers}
    cpu: dict[int, list[float]] = {w: [] for w in workers}
    for r in range(repeats):
        order = list(workers) if r % 2 == 0 else list(reversed(workers))
        for w in order:
            run_dir = workdir / f"grid-{grid}{'-overridden' if extra else ''}-w{w}-{r}"
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "bench.run", "-m", f"grid={grid}", "hydra/launcher=joblib",
                   f"hydra.launcher.n_jobs={w}", f"tracking.uri=sqlite:///{run_dir / 'mlflow.db'}",
                   f"hydra.sweep.dir={run_dir / 'multirun'}", "progress=false", *extra]
            if model_path is not None:
                cmd.append(f"model.path={model_path}")
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            tic = time.perf_counter()
            proc = subprocess.run(cmd, cwd=run_dir, env=_env(), capture_output=True, text=True)
            wall = time.perf_counter() - tic
            (run_dir / "stdout.txt").write_text(proc.stdout)
            (run_dir / "stderr.txt").write_text(proc.stderr)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            if proc.returncode != 0:
                _log(f"grid {grid} with {w} worker(s) exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                     f"{proc.stderr[-3000:]}")
            seconds[w].append(wall)
            cpu[w].append(used)
            _log(f"grid {grid} with {w} worker(s): {wall:.1f} s wall, {used:.1f} CPU s "
                 f"(load {os.getloadavg()[0]:.1f})")
    result: dict[str, Any] = {"grid": grid, "overrides": list(extra), "workers": {}}
    for w in workers:
        result["workers"][str(w)] = {"wall_s": stats(seconds[w]), "cpu_s": stats(cpu[w]),
                                     "cores_used": stats([c / s for c, s in zip(cpu[w], seconds[w])])}
    if len(workers) >= 2:
        one, two = workers[0], workers[1]
        result["speedup"] = stats([a / b for a, b in zip(seconds[one], seconds[two])])
    return result


# ============================================================================================== toy grid


@functools.cache
def toy_grid() -> dict[str, Any]:
    """What `nox -s bench` runs, read from bench/conf/grid/toy.yaml: its distinct cells as (method, K) (base once
    per seed), training budget, eval n and eval batch size."""
    from bench import grid as grids

    composed = grids.grid_cells(["grid=toy"])
    cfg = next(c for c in composed if not grids.is_base(c))
    cells = [(c["method"]["name"], 0 if grids.is_base(c) else grids.resolved_train_steps(c)) for c in composed]
    return dict(cells=cells, nfe=int(cfg["budget"]["nfe"]), eval_n=int(cfg["eval"]["n"]),
                eval_batch_size=int(cfg["eval"]["batch_size"]))


def estimate_toy_grid(cells_summary: dict[str, dict[str, Any]], speedup: float | None) -> dict[str, Any]:
    """Serial sum of the projected toy-grid cell times (K = 4's rates for any other K), divided by the measured
    2-worker speedup of the toy-sized grid (or 2 if none). An estimate; `--toy-grid` measures it."""
    grid = toy_grid()
    cells = grid["cells"]
    missing = sorted({m for m, _ in cells if cells_summary.get(m, {}).get("status") != "finished"})
    serial = sum(cells_summary[m]["wall"]["projected_toy_cell_s"]["median"] for m, _ in cells if m not in missing)
    serial_cpu = sum(cells_summary[m]["cpu"]["projected_toy_cell_s"]["median"] for m, _ in cells if m not in missing)
    factor = speedup if speedup and speedup > 0 else 2.0
    return {"kind": "estimate", "cells": len(cells), "serial_s": serial, "speedup_used": factor,
            "wall_s": serial / factor, "serial_cpu_s": serial_cpu, "wall_s_if_2_free_cores": serial_cpu / factor,
            "methods_missing": missing,
            "how": f"sum over the toy grid's cells of the projected cell time of its method ({grid['nfe']} NFEs at "
                   f"the measured NFE/s and train overhead, eval n = {grid['eval_n']} at the measured eval rate, "
                   f"fixed costs as measured), divided by the measured 2-worker speedup of the toy-sized grid"}


def run_toy_grid(model_path: str | None, workdir: Path) -> dict[str, Any]:
    """`nox -s bench`'s two steps timed for real: the toy grid on 2 joblib workers, then the report."""
    run_dir = workdir / "toy-grid"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.run", "-m", "grid=toy", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           f"tracking.uri=sqlite:///{run_dir / 'mlflow.db'}", f"hydra.sweep.dir={run_dir / 'multirun'}",
           "progress=false"] + ([f"model.path={model_path}"] if model_path else [])
    tic = time.perf_counter()
    grid = subprocess.run(cmd, cwd=run_dir, env=_env(), capture_output=True, text=True)
    grid_s = time.perf_counter() - tic
    tic = time.perf_counter()
    report = subprocess.run([sys.executable, "-m", "reports", "--experiment", "stepbench/toy", "--out",
                             str(run_dir / "report"), "--uri", f"sqlite:///{run_dir / 'mlflow.db'}"],
                            cwd=run_dir, env=_env(), capture_output=True, text=True)
    report_s = time.perf_counter() - tic
    return {"kind": "measured", "grid_s": grid_s, "report_s": report_s, "wall_s": grid_s + report_s,
            "grid_exit": grid.returncode, "report_exit": report.returncode}


# ============================================================================================== paper estimate

def paper_estimate(grids_: Sequence[str] = ("sdxl-turbo", "sd-turbo")) -> dict[str, Any]:
    """bench.plan's compute estimate of each real grid (one cost model: bench/plan.py), grouped by (method, K):
    NFEs and H100 GPU-hours per cell, with the UNet / VAE FLOPs counted on the meta device from the real configs."""
    from bench import grid as grids
    from bench import plan as planner

    out: dict[str, Any] = {"peak_tflops": planner.PEAK_TFLOPS, "utilisation": planner.UTILISATION,
                           "train_nfe_factor": planner.TRAIN_NFE_FACTOR, "reward_tflop": dict(planner.REWARD_TFLOP),
                           "grids": {}}
    for grid in grids_:
        if not (grids.CONF_DIR / "grid" / f"{grid}.yaml").is_file():
            out["grids"][grid] = {"status": f"bench/conf/grid/{grid}.yaml not found"}
            continue
        p = planner.plan([f"grid={grid}"])
        model = p.cells[0].model
        counted, side = planner.count_flops(model), planner.REAL_UNET[model]["sample_size"]
        flops = {"resolution": 8 * side, "latent": side, "tokens": 77, "unet_params": counted["unet_params"],
                 "unet_tflop_per_nfe": counted["unet"], "vae_decode_tflop": counted["vae_decode"]}
        rate = p.peak_tflops * p.utilisation * 3600  # TFLOP per GPU-hour
        groups: dict[str, dict[str, Any]] = {}
        for c in p.cells:
            g = groups.setdefault(c.method if c.method == grids.BASE else f"{c.method} K={c.train_steps}",
                                  {"method": c.method, "K": c.train_steps, "cells": 0, "train_nfe": c.train_nfe,
                                   "eval_nfe": c.eval_nfe, "tflop": 0.0})
            g["cells"] += 1
            g["tflop"] += c.tflop  # cells of a group differ in reward (its forward's FLOPs) and seed
        for g in groups.values():
            g["gpu_hours_all_cells"] = g["tflop"] / rate
            g["gpu_hours_per_cell"] = g["gpu_hours_all_cells"] / g["cells"]
        out["grids"][grid] = {"model": model, "flops": flops, "cells": len(p.cells), "methods": groups,
                              "gpu_hours": p.gpu_hours}
    return out


# ============================================================================================== report writers


def _fmt_stat(s: dict[str, Any] | None, fmt: str = "{:.3g}", pct: bool = False) -> str:
    if not s or not s.get("n"):
        return "n/a"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: fmt.format(v))
    if s["n"] == 1:
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"


def markdown(results: dict[str, Any]) -> str:
    """The perf tables as markdown: median (min–max) over repeats; CPU-clock and wall-clock figures side by side."""
    lines = ["# stepbench performance", ""]
    m = results.get("machine", {})
    lines += [f"Machine: {m.get('cpu_model')}, {m.get('usable_cores')} usable cores, {m.get('memory_gb')} GB; "
              f"torch {m.get('torch')} with {m.get('torch_threads')} intra-op thread(s) "
              f"(OMP_NUM_THREADS={m.get('omp_num_threads')}), nice {m.get('nice')}; load average at start "
              f"{', '.join(f'{x:.2f}' for x in m.get('load_average_start', []))}, at end "
              f"{', '.join(f'{x:.2f}' for x in results.get('load_average_end', []))}. Figures: median (min–max) over "
              f"repeats. CPU = CPU seconds of the benchmark's own thread(s) (stable under load); wall = elapsed.", ""]
    targets = results.get("targets", TARGETS)
    if "sampler" in results:
        lines += ["## Sampler overhead (ours / pipeline `__call__`, same model, batch, S)",
                  f"Our sampler records latents, log-probs and x0-predictions. Target <= {targets['sampler_ratio']:.2f}x. "
                  "'outside networks' = CPU share of one call outside denoiser/VAE/text-encoder spans.", "",
                  "| model | batch | S | pipeline CPU s | ours CPU s | ratio (CPU) | ratio (wall) | "
                  "outside networks: pipeline / ours |", "|---|---|---|---|---|---|---|---|"]
        for row in results["sampler"]:
            cpu, wall = row["cpu"], row["wall"]
            lines.append(f"| {row['model']} | {row['batch']} | {row['S']} | {_fmt_stat(cpu['pipeline_s'])} | "
                         f"{_fmt_stat(cpu['sampler_s'])} | {_fmt_stat(cpu['ratio'], '{:.3f}')} | "
                         f"{_fmt_stat(wall['ratio'], '{:.3f}')} | {100 * row['pipeline_outside_networks']:.1f}% / "
                         f"{100 * row['sampler_outside_networks']:.1f}% |")
        lines.append("")
    if "cells" in results:
        c = results["cells"]
        lines += [f"## Toy cells (recipe=toy, K={c['train_steps']}, budget {c['budget']} NFEs, eval n={c['eval_n']} "
                  f"at S=1,2,4,8; {c['model_note']}; each in a fresh, warmed-up process)",
                  f"Harness overhead = share of the cell outside denoiser forward/backward, VAE, reward (incl. SPO's "
                  f"preference model) and text-encoder spans. Target <= {targets['harness_overhead']:.0%}; peak RSS <= "
                  f"{targets['peak_rss_mb']:.0f} MB. Projected = a toy-grid cell ({c.get('target', {}).get('nfe', '?')} "
                  f"NFEs, eval n={c.get('target', {}).get('eval_n', '?')}) extrapolated from the phase rates (an "
                  f"estimate).", ""]
        for kind, title in (("cpu", "CPU clock"), ("wall", "wall clock")):
            lines += [f"### {title}", "",
                      "| method | cell s | overhead (cell) | overhead (train) | overhead (eval) | MLflow share | "
                      "train NFE/s | peak RSS MB | projected toy-grid cell s | projected overhead |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for method, entry in c["summary"].items():
                if entry.get("status") != "finished":
                    lines.append(f"| {method} | {entry.get('status')} | | | | | | | | |")
                    continue
                s_ = entry[kind]
                lines.append(
                    f"| {method} | {_fmt_stat(s_['cell_s'])} | {_fmt_stat(s_['overhead'], pct=True)} | "
                    f"{_fmt_stat(s_['train_overhead'], pct=True)} | {_fmt_stat(s_['eval_overhead'], pct=True)} | "
                    f"{_fmt_stat(s_['tracking_fraction'], pct=True)} | {_fmt_stat(s_['nfe_per_s'], '{:.0f}')} | "
                    f"{_fmt_stat(entry['peak_rss_mb'], '{:.0f}')} | {_fmt_stat(s_['projected_toy_cell_s'], '{:.0f}')} | "
                    f"{_fmt_stat(s_['projected_toy_cell_overhead'], pct=True)} |")
            lines.append("")
    for key in ("grid", "grid_toy_sized"):
        if key not in results:
            continue
        g = results[key]
        what = f"{g['grid']} grid" + (f" with {' '.join(g['overrides'])}" if g.get("overrides") else "")
        lines += [f"## Grid scaling ({what}, joblib launcher)",
                  f"Target >= {targets['grid_speedup']}x. CPU s = user+sys seconds of the run's processes; cores used "
                  f"= CPU s / wall s (what the box actually gave the run).", "",
                  "| workers | wall s | CPU s | cores used |", "|---|---|---|---|"]
        for w, s_ in g["workers"].items():
            lines.append(f"| {w} | {_fmt_stat(s_['wall_s'])} | {_fmt_stat(s_['cpu_s'])} | "
                         f"{_fmt_stat(s_['cores_used'], '{:.2f}')} |")
        if "speedup" in g:
            lines += ["", f"Speedup 1 -> 2 workers (wall): {_fmt_stat(g['speedup'], '{:.2f}')}x."]
        lines.append("")
    if "toy_grid" in results:
        t = results["toy_grid"]
        if t.get("kind") == "measured":
            lines += ["## Toy grid (`nox -s bench`)", f"Measured: {t['wall_s'] / 60:.0f} min (grid {t['grid_s'] / 60:.0f} "
                      f"min, report {t['report_s'] / 60:.1f} min).", ""]
        else:
            lines += ["## Toy grid (`nox -s bench`)",
                      f"ESTIMATE (not measured; `--toy-grid` measures it): {t['wall_s'] / 60:.0f} min at this run's "
                      f"load, {t.get('wall_s_if_2_free_cores', float('nan')) / 60:.0f} min on 2 free cores, for "
                      f"{t['cells']} cells ({t['how']}).", ""]
    if "paper" in results:
        p = results["paper"]
        lines += ["## On paper: real models on an H100-class GPU",
                  f"bench.plan's estimate: peak {p['peak_tflops']:g} TFLOP/s dense bf16 at {p['utilisation']:.0%} "
                  f"utilisation; a training NFE costs {p['train_nfe_factor']:g} forwards on average (half sampling "
                  f"forwards, half forward+backward); every trajectory and evaluation image adds a VAE decode and its "
                  f"reward forwards.", ""]
        for grid, g in p["grids"].items():
            if "flops" not in g:
                lines.append(f"- {grid}: {g.get('status')}")
                continue
            f = g["flops"]
            lines += [f"### {grid} ({g['cells']} cells): UNet {f['unet_params'] / 1e9:.2f} B params, "
                      f"{f['unet_tflop_per_nfe']:.3f} TFLOP per NFE at {f['resolution']} px (latent {f['latent']}², "
                      f"{f['tokens']} tokens); VAE decode {f['vae_decode_tflop']:.2f} TFLOP per image; "
                      f"total {g['gpu_hours']:,.0f} GPU-hours", "",
                      "| method | K | cells | train NFEs/cell | eval NFEs/cell | GPU-h/cell | GPU-h all cells |",
                      "|---|---|---|---|---|---|---|"]
            for e in g["methods"].values():
                lines.append(f"| {e['method']} | {e['K'] or '–'} | {e['cells']} | {e['train_nfe']:,} | "
                             f"{e['eval_nfe']:,} | {e['gpu_hours_per_cell']:.2f} | {e['gpu_hours_all_cells']:,.0f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


# ============================================================================================== CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cell"]:
        return _cell_main(argv[1:])
    if argv[:1] == ["paper"]:
        print(json.dumps(paper_estimate(), indent=2))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="perf.json", help="JSON results (default perf.json)")
    parser.add_argument("--markdown", default="perf.md", help="markdown tables (default perf.md)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="1 repeat, small batches and budgets (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of the sampler benchmark (default 5)")
    parser.add_argument("--cell-repeats", type=int, default=None, help="repeats of each method's cell (default 2)")
    parser.add_argument("--grid-repeats", type=int, default=1, help="repeats of the smoke grid per worker count")
    parser.add_argument("--methods", default=None, help="methods whose toy cell is profiled (default: every "
                        "registered method)")
    parser.add_argument("--steps", default="1,2,4,8", help="sampler step counts S")
    parser.add_argument("--toy-batch", type=int, default=None, help="sampler batch on toy-turbo (default 32)")
    parser.add_argument("--sdxl-batch", type=int, default=8, help="sampler batch on the tiny SDXL pipeline")
    parser.add_argument("--budget", type=int, default=None, help="NFE budget of the profiled cells (default 4096)")
    parser.add_argument("--eval-n", type=int, default=None, help="eval n of the profiled cells (default 64)")
    parser.add_argument("--train-steps", type=int, default=4, help="K of the profiled cells")
    parser.add_argument("--toy-grid", action="store_true", help="run the toy grid for real (tens of minutes)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; available: {', '.join(SECTIONS)}")
    registered = method_names()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else registered
    bad = sorted(set(methods) - set(registered))
    if bad:
        parser.error(f"unknown method(s) {', '.join(bad)}; available: {', '.join(registered)}")
    repeats = args.repeats or (1 if args.quick else 5)
    cell_repeats = args.cell_repeats or (1 if args.quick else 2)
    toy_batch = args.toy_batch or (8 if args.quick else 32)
    budget = args.budget or (2560 if args.quick else 4096)
    eval_n = args.eval_n or (16 if args.quick else 64)
    steps = [int(s) for s in args.steps.split(",")]

    import torch

    torch.set_num_threads(1)
    results: dict[str, Any] = {"machine": machine(), "targets": TARGETS, "argv": argv}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="stepbench-perf-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_path, model_note = toy_model_path(workdir / "toy-standin")
    results["toy_model"] = model_note
    _log(f"machine: {results['machine']['cpu_model']}, load {results['machine']['load_average_start']}; "
         f"toy model: {model_note}; scratch {workdir}")

    def save() -> None:
        results["load_average_end"] = list(os.getloadavg())
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        Path(args.markdown).write_text(markdown(results))

    timed_section: Callable[[str], bool] = lambda name: name in sections  # noqa: E731
    if timed_section("sampler"):
        rows = bench_sampler("toy-turbo", steps, toy_batch, repeats, model_path)
        rows += bench_sampler("tiny-sdxl", steps, args.sdxl_batch, repeats)
        results["sampler"] = rows
        save()
    if timed_section("cells"):
        grid = toy_grid()
        runs = bench_cells(methods, cell_repeats, budget=budget, eval_n=eval_n, train_steps=args.train_steps,
                           model_path=model_path, workdir=workdir, eval_batch_size=grid["eval_batch_size"])
        results["cells"] = {"budget": budget, "eval_n": eval_n, "train_steps": args.train_steps,
                            "model_note": model_note, "repeats": cell_repeats, "runs": runs,
                            "target": {"nfe": grid["nfe"], "eval_n": grid["eval_n"]}, "summary": summarize_cells(runs)}
        save()
    if timed_section("grid"):
        results["grid"] = bench_grid(args.grid_repeats, (1, 2), model_path, workdir)
        save()
        # The smoke grid's cells are seconds of work against ~8 CPU-s of imports per worker process, so it cannot
        # scale; the same 5 cells at toy sizes show what a second worker buys on real work.
        results["grid_toy_sized"] = bench_grid(args.grid_repeats, (1, 2), model_path, workdir, extra=TOY_SIZED_SMOKE)
        save()
    if timed_section("toy_grid"):
        if args.toy_grid:
            results["toy_grid"] = run_toy_grid(model_path, workdir)
        elif "cells" in results:
            speedup = (results.get("grid_toy_sized") or results.get("grid") or {}).get("speedup", {}).get("median")
            results["toy_grid"] = estimate_toy_grid(results["cells"]["summary"], speedup)
        save()
    if timed_section("paper"):
        results["paper"] = paper_estimate()
        save()
    save()
    _log(f"wrote {args.out} and {args.markdown}")
    return 0


def _cell_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf cell", description="one profiled toy cell")
    parser.add_argument("--method", required=True, choices=method_names())
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--eval-n", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--store", default=None, help="folder of the throw-away MLflow store")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--no-system-metrics", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    store = Path(args.store or tempfile.mkdtemp(prefix="stepbench-perf-cell-"))
    store.mkdir(parents=True, exist_ok=True)
    overrides = cell_overrides(args.method, budget=args.budget, eval_n=args.eval_n, train_steps=args.train_steps,
                               store=store, model_path=args.model_path, system_metrics=not args.no_system_metrics,
                               eval_batch_size=args.eval_batch_size)
    record = run_profiled_cell(overrides)
    text = json.dumps(record, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0 if record["status"] == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
