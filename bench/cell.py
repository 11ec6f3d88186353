"""One benchmark cell: (model, reward, method, K, seed) -> train within a budget -> evaluate at every S -> MLflow.

    status = run_cell(cfg, grid="toy")      # "finished" | "skipped" | "failed" | "running-elsewhere" | "n/a"
    status.run_id                           # the MLflow run it made (or found FINISHED), None if none

Resume and faults: a cell whose cell_id already has a FINISHED run in the grid's experiment is skipped; RUNNING
runs of the cell whose process is dead (SIGKILL, OOM killer, crashed machine) are marked KILLED first and the
cell reruns; a cell that raises is marked FAILED with the error text (tag ``error`` + ``error.txt``) and
``run_cell`` returns "failed" so the grid goes on. A lock file per cell_id (beside a SQLite database; for a
tracking server, in the temp directory, per server URI) keeps two workers on one machine from running the same
cell at once (e.g. the shared base cell). Memory/speed settings and data-parallel training: bench/accel.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import accel, tracking, validate
from bench import grid as grids

log = logging.getLogger("bench.cell")
_CLAIM_ATTEMPTS = 5


# --------------------------------------------------------------------------------------------- helpers


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every `interval` s), plus
    torch.cuda.max_memory_allocated when on CUDA."""

    def __init__(self, device: str, interval: float = 0.2):
        self.device, self.interval = device, interval
        self.peak_rss = 0
        self._stop = threading.Event()

    def _sample(self):
        import psutil

        proc = psutil.Process()
        while True:
            self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            if self._stop.wait(self.interval):
                break

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def metrics(self) -> dict[str, float]:
        import torch

        out = {"cost/peak_rss_mb": self.peak_rss / 2**20}
        if self.device.startswith("cuda"):
            out["cost/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


@contextlib.contextmanager
def cell_lock(uri: str, cid: str, wait: bool = True) -> Iterator[bool]:
    """An exclusive per-cell file lock of this host (bench.tracking.lock_dir: beside a SQLite database, else in a
    per-user 0700 folder; opened without following symlinks; released by the kernel if we are killed). It keeps
    two workers of one machine off the same cell; workers on other machines are kept off by the cell's lease in
    the store (tracking.Store.start_run). Yields True once held; with wait=False yields False at once when
    another worker holds it."""
    with tracking.file_lock(tracking.lock_dir(uri) / f"{cid}.lock", wait=wait) as held:
        yield held


def policy_kwargs(cfg: dict, method_config: Any) -> dict[str, Any]:
    """Policy construction arguments: cfg.policy, with lora_rank / full_finetune / lora_alpha / lora_targets
    taken from the method's Config when it has those fields (its recipes decide, e.g. the toy full fine-tune)."""
    kwargs = dict(cfg["policy"])
    for key in ("lora_rank", "lora_alpha", "lora_targets", "full_finetune"):
        if hasattr(method_config, key) and getattr(method_config, key) is not None:
            kwargs[key] = getattr(method_config, key)
    if kwargs.get("lora_targets") is not None:
        kwargs["lora_targets"] = tuple(kwargs["lora_targets"])
    return kwargs


LAUNCH_ENV = "STEPBENCH_LAUNCH"
"""Set by bench.run for one launch of a grid (inherited by its worker processes) and tagged on its runs."""


def _failed_this_launch(store: tracking.Store, experiment_id: str, cid: str):
    """A FAILED run of the cell made by this grid launch (and none FINISHED), else None."""
    launch = os.environ.get(LAUNCH_ENV)
    if not launch:
        return None
    runs = store.cell_runs(experiment_id, cid)
    if any(r.info.status == "FINISHED" for r in runs):
        return None
    failed = [r for r in runs if r.info.status == "FAILED" and r.data.tags.get("stepbench.launch") == launch]
    return failed[0] if failed else None


class NothingTrained(RuntimeError):
    """A training method ended without changing a trainable weight (e.g. a budget below one update)."""


def _fingerprint(policy) -> list[tuple[float, float]]:
    """(sum, sum of squares) in float64 of every trainable tensor: changes with any update, costs no copy."""
    import torch

    with torch.no_grad():
        return [(float(p.double().sum()), float(p.double().square().sum())) for p in policy.trainable_parameters()]


def _check_finite(policy) -> None:
    import torch

    for param in policy.trainable_parameters():
        if not torch.isfinite(param).all():
            raise FloatingPointError("trained weights contain NaN/inf (diverged training); the cell is FAILED")


def _gain_over_base(cfg: dict, run: tracking.CellRun, scores) -> dict[str, float]:
    """Paired gain over the base cell at each (split, reward, S): bench.evaluate.gains_over_base against the base
    run's scores (design.md: differences between methods are paired). {} without a finished base run of the same
    eval settings."""
    import pandas as pd

    from bench import evaluate as ev

    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    base_run = run.store.finished_run(experiment_id, grids.cell_id(grids.base_config(cfg)))
    if base_run is None:
        return {}
    try:
        base_scores = pd.read_parquet(tracking.artifact_path(run.store.uri, base_run.info.run_id,
                                                             "eval/scores.parquet"))
    except FileNotFoundError:
        return {}
    return ev.gains_over_base(scores, base_scores)


# --------------------------------------------------------------------------------------------- the cell


class CellStatus(str):
    """run_cell's outcome: the status string ("finished", "skipped", ...) carrying the cell's MLflow run id."""

    run_id: str | None

    def __new__(cls, status: str, run_id: str | None = None) -> CellStatus:
        out = super().__new__(cls, status)
        out.run_id = run_id
        return out


def run_cell(cfg: Any, grid: str = "adhoc", *, index: str = "", tags: dict[str, Any] | None = None,
             train_hook: Callable[..., Any] | None = None, run_name: str | None = None) -> CellStatus:
    """Run one cell (see `_run_cell`); a tracking server that is unreachable before the cell's run exists makes the
    cell "failed" with one line, so the grid goes on to its summary."""
    try:
        return _run_cell(cfg, grid, index=index, tags=tags, train_hook=train_hook, run_name=run_name)
    except Exception as err:  # noqa: BLE001 - only outages are turned into a status
        if not tracking._is_outage(err):
            raise
        name = run_name or grids.cell_run_name(grids._plain(cfg))
        print(f"{index}FAILED {name}: tracking server unreachable ({str(err).splitlines()[0][:200]})", flush=True)
        return CellStatus("failed")


def _run_cell(cfg: Any, grid: str = "adhoc", *, index: str = "", tags: dict[str, Any] | None = None,
              train_hook: Callable[..., Any] | None = None, run_name: str | None = None) -> CellStatus:
    """Run one cell unless a FINISHED run of it exists; never raises for a failing cell (returns "failed", or
    "killed" when the exception carries ``mlflow_status = "KILLED"``, e.g. a pruned sweep trial).

    tags: extra MLflow run tags; run_name: the run's name (default: the cell's, bench.grid.cell_run_name).
    The returned status carries ``run_id``: the run this call made, or the FINISHED run it skipped to. train_hook(method, policy, task, budget, tracker) -> tracker: called just before
    training; the tracker it returns is the one the method gets (bench.sweep reports and prunes through it).

    A base cell is shared by every method cell of its (model, reward), whatever their seed and K (so is a best-of-N
    cell by its jobs of every seed and K: bench.grid.invariant_axes): when another worker of this machine is
    running it, this call returns "running-elsewhere" at once instead of waiting (a method cell trains meanwhile
    and waits for the base only where it needs it, for the gain over base after its evaluation)."""
    cfg = grids.canonical(cfg)  # a cell shared across seeds runs under the canonical seed, whichever job asked
    validate.check_config(cfg)
    reason = grids.not_applicable(cfg)
    if reason is not None:
        print(f"{index}n/a  {grids.cell_run_name(cfg)}: {reason}", flush=True)
        return CellStatus("n/a")
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    dp = accel.data_parallel()
    if dp is not None and not dp.is_main:
        return CellStatus(_follow(cfg, dp, index))
    store = tracking.Store(cfg["tracking"]["uri"], lease_seconds=cfg["tracking"].get(
        "lease_seconds", tracking.DEFAULT_LEASE_SECONDS))
    experiment_id = store.experiment_id(grid)
    if cfg.get("with_base", True) and not grids.is_base(cfg):
        base = grids.base_config(cfg)
        failed = _failed_this_launch(store, experiment_id, grids.cell_id(base))
        if failed is not None:  # shared by the grid's jobs: one failure per grid launch, not one per job
            print(f"{index}(base) skip {grids.cell_run_name(base)}: it FAILED earlier in this grid launch (run "
                  f"{failed.info.run_id}); not retried", flush=True)
            base_status = "failed"
        else:
            base_status = run_cell(base, grid, index=index + "(base) " if index else "(base) ")
        if base_status == "failed":
            log.warning("the base cell failed; running %s anyway", grids.cell_run_name(cfg))
    cid = grids.cell_id(cfg)
    name = run_name or grids.cell_run_name(cfg)
    # a shared cell (base, best-of-N: one per seed and K) that another worker runs is not waited for here
    with cell_lock(store.uri, cid, wait=not (grids.is_base(cfg) or grids.is_shared(cfg))) as held:
        if not held:
            print(f"{index}skip {name}: another worker of this machine is running it", flush=True)
            if dp is not None:
                dp.announce(cid, "skip")
            return CellStatus("running-elsewhere")
        for run_id in store.reap_stale(experiment_id, cid):
            print(f"{index}marked stale run {run_id} of {name} KILLED (its process or node is gone)", flush=True)
        done = store.finished_run(experiment_id, cid)
        if done is not None:
            print(f"{index}skip {name}: cell {cid} already FINISHED (run {done.info.run_id})", flush=True)
            if dp is not None:
                dp.announce(cid, "skip")
            return CellStatus("skipped", done.info.run_id)
        live = store.live_run(experiment_id, cid)
        if live is not None:
            print(f"{index}skip {name}: run {live.info.run_id} of this cell is RUNNING in another process "
                  f"(host {live.data.tags.get('stepbench.host', '?')})", flush=True)
            if dp is not None:
                dp.announce(cid, "skip")
            return CellStatus("running-elsewhere")
        run_tags = {
            "method": cfg["method"]["name"], "model": cfg["model"]["name"], "reward": cfg["reward"]["name"],
            "train_steps": grids.cell_train_steps(cfg), "seed": grids.cell_seed(cfg),
            "grid": grid, "cell_id": cid, "git_commit": tracking.git_commit(),
            "stepbench_version": tracking.stepbench_version(), "device": cfg["device"],
            "recipe": cfg["recipe"]["name"], **paper_tags(cfg["method"]["name"]), **(tags or {}),
        }
        if os.environ.get(LAUNCH_ENV):
            run_tags["stepbench.launch"] = os.environ[LAUNCH_ENV]
        if dp is not None:
            run_tags["world_size"] = dp.world_size
            dp.announce(cid, "run")
        tic = time.perf_counter()
        run = None
        try:
            for attempt in range(_CLAIM_ATTEMPTS):
                try:
                    with store.start_run(experiment_id, name, run_tags,
                                         system_metrics=cfg["tracking"]["system_metrics"],
                                         flush_every=cfg["tracking"]["flush_every"],
                                         flush_seconds=cfg["tracking"]["flush_seconds"],
                                         outage_seconds=cfg["tracking"].get("outage_seconds", 600.0)) as run:
                        print(f"{index}run  {name} (cell {cid}, run {run.run_id})", flush=True)
                        _execute(cfg, run, train_hook)
                    break
                except tracking.ClaimLost as lost:
                    # two workers claimed at once: wait a random moment, then the cell is either taken (skip) or
                    # free again (claim again); both backing off twice in a row is rare, forever is impossible
                    time.sleep(random.uniform(0.2, 2.0))
                    held = store.finished_run(experiment_id, cid) or store.live_run(experiment_id, cid)
                    if held is not None or attempt == _CLAIM_ATTEMPTS - 1:
                        print(f"{index}skip {name}: {lost}", flush=True)
                        if dp is not None:
                            dp.announce(cid, "skip")
                        if held is not None and held.info.status == "FINISHED":
                            return CellStatus("skipped", held.info.run_id)
                        return CellStatus("running-elsewhere")
        except Exception as err:  # noqa: BLE001 - any failure of one cell must not stop the grid
            status = getattr(err, "mlflow_status", "FAILED")
            if status == "FAILED":  # the traceback is in the run's error.txt; the console gets one line
                log.debug("cell %s failed", name, exc_info=True)
            first = (str(err).strip().splitlines() or [""])[0]
            print(f"{index}{status} {name}: {type(err).__name__}: {first} (traceback: the run's error.txt)",
                  flush=True)
            return CellStatus(status.lower(), None if run is None else run.run_id)
        print(f"{index}done {name} in {time.perf_counter() - tic:.1f} s", flush=True)
        return CellStatus("finished", run.run_id)


def _follow(cfg: dict, dp: accel.DataParallel, index: str = "") -> str:
    """A rank > 0 of a data-parallel cell: wait for rank 0 to run or skip it; if it runs, train in lockstep
    (nothing is logged: rank 0 alone talks to MLflow and evaluates)."""
    cid, name = grids.cell_id(cfg), grids.cell_run_name(cfg)
    decision = dp.decision(cid)
    if decision != "run":
        print(f"{index}rank {dp.rank}: rank 0 skips {name}", flush=True)
        return "skipped"
    try:
        _execute(cfg, accel.NullRun(), dp=dp)
    except Exception as err:  # noqa: BLE001 - as run_cell: report, do not stop the grid
        log.exception("rank %d: cell %s failed", dp.rank, name)
        print(f"{index}rank {dp.rank} FAILED {name}: {type(err).__name__}: {err}", flush=True)
        return "failed"
    return "finished"


def _execute(cfg: dict, run: tracking.CellRun, train_hook: Callable[..., Any] | None = None, *,
             dp: accel.DataParallel | None = None) -> None:
    import tempfile

    import torch
    import yaml

    import methods
    import tasks.models as models
    import tasks.prompts as prompt_sets
    import tasks.rewards as rewards
    from bench import evaluate as ev
    from bench.provenance import provenance_tags
    from methods.common import Budget, Task, seed_everything
    from methods.policy import load_policy

    wall = time.perf_counter()
    dp = dp if dp is not None else accel.data_parallel()
    device, seed = (dp.device(cfg["device"]) if dp else cfg["device"]), int(cfg["seed"])
    accel.configure_backends(device, cfg.get("tf32", True))
    run.set_tags(provenance_tags(cfg))  # after threads and backends are set: what this cell's arithmetic used
    base = grids.is_base(cfg)
    k = grids.cell_train_steps(cfg)
    run.log_params(tracking.flatten(cfg) | {"train_steps_resolved": k, "cell_id": grids.cell_id(cfg)})
    config_text = yaml.safe_dump(cfg, sort_keys=False)
    run.log_text(config_text, "config.yaml")

    with PeakMemory(device) as memory, tempfile.TemporaryDirectory(prefix="stepbench-cell-") as tmp:
        tmp = Path(tmp)
        seed_everything(seed)
        spec = models.get(cfg["model"]["name"])
        train_set = prompt_sets.load(cfg["prompts"])
        eval_set = prompt_sets.load(cfg["eval"]["prompts"])
        splits = grids.eval_splits(cfg)  # [(split, n, noise seed)]
        split_prompts = {split: list(getattr(eval_set, split)) for split, _, _ in splits}
        for split, prompts in split_prompts.items():
            run.log_prompts(prompts, name=f"{cfg['eval']['prompts']}/{split}", context=split)
        if not base:
            run.log_prompts(list(train_set.train), name=f"{cfg['prompts']}/train", context="train")

        offload = cfg.get("offload_rewards", False)
        reward = accel.place_reward(rewards.load(cfg["reward"]["name"], **cfg["reward"]["options"]), device, offload)
        eval_rewards = {cfg["reward"]["name"]: reward}
        for name in cfg["eval"]["rewards"]:
            if name not in eval_rewards and (dp is None or dp.is_main):  # ranks > 0 do not evaluate
                eval_rewards[name] = accel.place_reward(rewards.load(name), device, offload)

        method = methods.load(cfg["method"]["name"], **validate.method_fields(cfg["method"]))
        policy = load_policy(spec.name, path=cfg["model"]["path"], device=device,
                             dtype=getattr(torch, cfg["dtype"]), **policy_kwargs(cfg, method.config))
        accel.autocast_denoiser(policy, cfg.get("precision", "fp32"))
        nfe, reward_calls = int(cfg["budget"]["nfe"]), cfg["budget"]["reward_calls"]
        train_seed = seed
        if dp is not None:  # the cell's budget is shared by the ranks; each draws its own data
            nfe, train_seed = dp.share_budget(nfe), dp.rank_seed(seed)
            reward_calls = None if reward_calls is None else dp.share_budget(reward_calls)
            seed_everything(train_seed)
        budget = Budget(nfe, reward_calls)
        task = Task(prompts=list(train_set.train), reward=reward, train_steps=k or spec.default_train_steps,
                    seed=train_seed, device=device)
        tracker = run.tracker(show_progress=cfg["progress"])

        method_tracker = tracker if train_hook is None else train_hook(method, policy, task, budget, tracker)
        if dp is not None:
            method_tracker = accel.ScaledTracker(method_tracker, dp.world_size)
        tic = time.perf_counter()
        sync = dp.training(policy.trainable_parameters()) if dp is not None else contextlib.nullcontext()
        before = _fingerprint(policy) if methods.trains(cfg["method"]["name"]) else None
        with sync as gradient_sync, accel.optimizers(cfg.get("adam_8bit", False)):
            method.train(policy, task, budget, method_tracker)
        train_seconds = time.perf_counter() - tic
        if before is not None and _fingerprint(policy) == before:
            raise NothingTrained(f"trained nothing: {cfg['method']['name']} made no update within budget.nfe="
                                 f"{nfe} ({budget.total_nfe} NFEs spent, {budget.grad_nfe} in gradient steps); "
                                 f"a run with 0 updates is not a result: raise budget.nfe")
        if dp is not None:
            sample_nfe, grad_nfe, calls = dp.sum_counts([budget.sample_nfe, budget.grad_nfe, budget.reward_calls])
            budget.load_dict({"sample_nfe": sample_nfe, "grad_nfe": grad_nfe, "reward_calls": calls})
            print(f"data-parallel rank {dp.rank}/{dp.world_size}: training seed {train_seed}, "
                  f"{gradient_sync.syncs} gradient all-reduces, adapters sha1 {accel.adapter_digest(policy)}",
                  flush=True)
            if not dp.is_main:
                return
        run.flush()
        _check_finite(policy)

        tic = time.perf_counter()
        results = [ev.evaluate(method, policy, split_prompts[split], list(cfg["eval"]["steps"]), eval_rewards,
                               split=split, n=n, eval_seed=noise_seed, batch_size=int(cfg["eval"]["batch_size"]),
                               grid_images=int(cfg["eval"]["grid_images"]), progress=tracker.progress)
                   for split, n, noise_seed in splits]
        eval_seconds = time.perf_counter() - tic

        import pandas as pd

        noise_seeds = {split: noise_seed for split, _, noise_seed in splits}
        scores = pd.concat([r.scores for r in results], ignore_index=True)
        scores.insert(0, "run_id", run.run_id)
        scores.insert(1, "cell_id", grids.cell_id(cfg))
        scores.insert(2, "method", cfg["method"]["name"])
        scores.insert(7, "seed", seed)  # after split, prompt, prompt_idx, sample_idx
        scores["model"] = cfg["model"]["name"]
        scores["train_steps"] = k
        scores["eval_seed"] = scores["split"].map(noise_seeds).astype("int64")
        scores_path = tmp / "scores.parquet"
        scores.to_parquet(scores_path, index=False)
        run.log_artifact(scores_path, "eval")
        summary = ev.summarize(scores)
        summary_path = tmp / "summary.csv"
        summary.to_csv(summary_path, index=False)
        run.log_artifact(summary_path, "eval")

        train_reward = cfg["reward"]["name"]
        for result in results:
            split = result.split
            for num_steps, images in result.images.items():
                if len(images) == 0:
                    continue
                arrays = ev.sample_arrays(result, num_steps, split_prompts[split])
                run.log_artifact(ev.save_samples(arrays, tmp / split / f"samples_s{num_steps}.npz"), f"eval/{split}")
                first = scores[(scores.split == split) & (scores.S == num_steps) & (scores.reward == train_reward)]
                values = first.set_index("sample_idx").value.loc[arrays["sample_idx"]].tolist()
                png = ev.save_grid(images, arrays["prompt"].tolist(), values, tmp / split / f"grid_s{num_steps}.png",
                                   reward=train_reward, title=f"{grids.cell_run_name(cfg)}  {split}  S={num_steps}")
                run.log_artifact(png, f"eval/{split}")

        curve = ev.save_training_curve(tracker.history, tmp / "train_curve.png", title=grids.cell_run_name(cfg))
        if curve is not None:
            run.log_artifact(curve)
        if cfg["tracking"]["save_adapter"] and not base and budget.total_nfe > 0:
            adapter = policy.save_adapter(tmp / "adapter" / "adapter.safetensors")
            run.log_artifact(adapter, "adapter")

    metrics = ev.summary_metrics(summary)
    for name in eval_rewards:
        metrics |= ev.step_generalization(summary, name)
    metrics |= {
        "cost/sample_nfe": budget.sample_nfe, "cost/grad_nfe": budget.grad_nfe, "cost/train_nfe": budget.total_nfe,
        "cost/reward_calls": budget.reward_calls, "cost/budget_nfe": int(cfg["budget"]["nfe"]),
        "cost/eval_nfe": sum(sum(r.nfe.values()) for r in results),
        "cost/eval_extra_nfe": sum(sum(r.extra_nfe.values()) for r in results),
        "cost/eval_search_reward_calls": sum(sum(r.reward_calls.values()) for r in results),
        "cost/eval_reward_calls": sum(r.score_calls for r in results),
        "cost/train_seconds": train_seconds, "cost/eval_seconds": eval_seconds,
        "cost/wall_seconds": time.perf_counter() - wall,
    }
    # per S: summed over the splits, and per split (whose sample counts differ: NFEs per image = the split's
    # cost/eval_nfe/<split>/s<S> over its eval/<split>/<reward>/s<S>/n)
    for num_steps in cfg["eval"]["steps"]:
        for key, per_split in (("eval_nfe", lambda r: r.nfe), ("eval_extra_nfe", lambda r: r.extra_nfe),
                               ("eval_seconds", lambda r: r.seconds)):
            metrics[f"cost/{key}/s{num_steps}"] = sum(per_split(r)[num_steps] for r in results)
            metrics |= {f"cost/{key}/{r.split}/s{num_steps}": per_split(r)[num_steps] for r in results}
    metrics |= memory.metrics()
    if not base:
        if cfg.get("with_base", True):
            with cell_lock(run.store.uri, grids.cell_id(grids.base_config(cfg))):
                pass  # the base cell, if another worker of this machine is still running it, finishes first
        metrics |= _gain_over_base(cfg, run, scores)
    run.log_metrics(metrics, step=budget.total_nfe)
    run.flush()
    # the evaluation curve: eval/<split>/<reward>/mean at step = S, one line per key in MLflow's own chart of
    # reward against step count; buffered, then written by one log_batch call
    for num_steps, curve in ev.curve_metrics(summary).items():
        run.log_metrics(curve, step=num_steps)
    run.flush()


def paper_tags(method: str) -> dict[str, str]:
    """The run's "row vs paper" record (methods.common.Deviation): tags `paper` and `paper_deviations` (JSON list of
    [deviation, reason, file]), so the report shows the same table as the README without importing methods; and
    the method's display names (`method_label`, `method_short_label`), so a report of old runs keeps them."""
    import json

    import methods

    cls = methods.method_class(method)
    rows = [[d.what, d.why, d.where] for d in getattr(cls, "deviations", ())]
    return {"paper": getattr(cls, "paper", ""), "paper_deviations": json.dumps(rows),
            "method_label": methods.label(method), "method_short_label": methods.label(method, short=True)}
