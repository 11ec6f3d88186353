"""No duplicate cell work (issue 18.6) and longest cells first (issue 17): bench.grid's shared cells, bench.plan's
count of them, and bench.schedule's launch order."""

from __future__ import annotations

from collections import Counter

import pytest

import methods
from bench import grid as grids
from bench import plan as planner
from bench import schedule
from bench.validate import conf_options

NAMED_GRIDS = [g for g in conf_options("grid") if g != "adhoc"]


def _cfg(*overrides: str) -> dict:
    return grids._plain(grids.compose(list(overrides)))


def test_untrained_cells_ignore_seed_and_k_and_trained_cells_do_not():
    base = {grids.cell_id(_cfg("method=base", f"seed={s}", f"train_steps={k}")) for s in (0, 1) for k in (1, 4)}
    search = {grids.cell_id(_cfg("method=inference_scaling", f"seed={s}", f"train_steps={k}", f"budget.nfe={n}"))
              for s in (0, 1) for k in (1, 4) for n in (10, 20)}
    assert len(base) == 1 and len(search) == 1 and base != search
    # what does change a best-of-N cell: its own search settings, the model, the reward, the evaluation
    for change in ["method.seed=1", "method.num_candidates=8", "reward=toy-mean3", "eval.n=5"]:
        assert grids.cell_id(_cfg("method=inference_scaling", change)) not in search, change
    # a trained method keeps every axis
    ddpo = {grids.cell_id(_cfg("method=ddpo", f"seed={s}", f"train_steps={k}")) for s in (0, 1) for k in (1, 4)}
    assert len(ddpo) == 4
    shared = _cfg("method=inference_scaling", "seed=1", "train_steps=2")
    assert grids.cell_run_name(shared) == "inference_scaling/toy-turbo/toy-all/k0/s0"
    assert grids.canonical(shared)["seed"] == 0 and grids.canonical(shared)["train_steps"] == 2
    assert grids.not_applicable(shared) is None


@pytest.mark.parametrize("grid", NAMED_GRIDS)
def test_no_two_planned_cells_share_a_results_key(grid):
    """Every named grid's plan: one cell per results key (cell_id), and no cell of a method that cannot depend on
    the seed or K is planned once per seed or K."""
    p = planner.plan([f"grid={grid}", "device=cpu"], multirun=True)
    ids = Counter(c.cell_id for c in p.cells)
    assert ids and ids.most_common(1)[0][1] == 1
    for method in ("base", "inference_scaling"):
        mine = [c for c in p.cells if c.method == method]
        assert mine, method  # every named grid has both rows
        assert len(mine) == len({(c.model, c.reward) for c in mine}), [c.run_name for c in mine]
        assert {(c.seed, c.train_steps) for c in mine} == {(0, 0)}
    jobs = grids.expand([f"grid={grid}", "device=cpu"], multirun=True)
    seeds = {j.split("=")[1] for job in jobs for j in job if j.startswith("seed=")} or {"0"}
    ks = {j.split("=")[1] for job in jobs for j in job if j.startswith("train_steps=")} or {"4"}
    trained = [c for c in p.cells if methods.trains(c.method)]
    pairs = {(c.model, c.reward) for c in p.cells}
    trained_methods = {c.method for c in trained}
    # the trained cells are the full product, less the n/a ones; the untrained ones once per (model, reward)
    assert len(trained) == len(pairs) * len(trained_methods) * len(seeds) * len(ks) - len(p.not_applicable)
    assert len(p.cells) == len(trained) + 2 * len(pairs)


@pytest.mark.parametrize("grid", ["smoke", "toy"])
def test_the_runner_launches_each_planned_cell_exactly_once(grid, tiny_toy):
    """What bench.run launches (bench.schedule.launch_order over the composed jobs) covers the plan's cells, and
    no launched job only repeats cells an earlier job already runs."""
    overrides = [f"grid={grid}", f"model.path={tiny_toy}"]
    jobs = grids.expand(overrides, multirun=True)
    cells = [grids._plain(grids.compose(job)) for job in jobs]
    order = schedule.launch_order(cells)
    covered: list[str] = []
    for i in order:
        new = [cid for cid in schedule.job_cells(cells[i]) if cid not in covered]
        assert new, f"job {jobs[i]} repeats cells an earlier job runs"
        covered += new
    planned = {c.cell_id for c in planner.plan(overrides, multirun=True).cells}
    assert set(covered) == planned and len(covered) == len(planned)
    assert {grids.cell_id(c) for c in grids.grid_cells(overrides)} == planned


def test_launch_order_puts_the_longest_cells_first_and_drops_repeats(tiny_toy):
    jobs = grids.expand(["grid=toy", f"model.path={tiny_toy}"], multirun=True)
    cells = [grids._plain(grids.compose(job)) for job in jobs]
    order = schedule.launch_order(cells)
    names = [grids.cell_run_name(cells[i]) for i in order]
    work = [planner.cell_work(cells[i]) for i in order]
    assert work == sorted(work, reverse=True)
    # best-of-4 evaluates 4 x the base's evaluation NFEs (4 x (192 + 48) x (1+2+3+4+6+8) = 23,040), more than a
    # trained cell's 2 x budget.nfe training (2 x 8,000) + 5,760 evaluation NFE-equivalents: it goes first
    base_eval = planner.cell_work(grids.base_config(cells[0]))
    assert base_eval == (192 + 48) * (1 + 2 + 3 + 4 + 6 + 8)
    assert names[0] == "inference_scaling/toy-turbo/toy-all/k0/s0" and work[0] == 4 * base_eval
    assert work[1] == 2 * cells[order[1]]["budget"]["nfe"] + base_eval
    # the base job goes (the first job runs the shared base cell before its own), and every other cell once
    planned = planner.plan(["grid=toy"], multirun=True).cells
    assert not any(n.startswith("base/") for n in names)
    assert len(order) == len(set(names)) == len(planned) - 1
    # ties keep the grid's order (method, then seed)
    assert names[1:4] == [f"ddpo/toy-turbo/toy-all/k2/s{s}" for s in range(3)]


def test_launch_order_is_longest_processing_time_first_with_n_a_jobs_last():
    cells = [_cfg("method=ddpo", "train_steps=1", "budget.nfe=100"), _cfg("method=pso", "train_steps=1"),
             _cfg("method=ddpo", "train_steps=2", "budget.nfe=900"), _cfg("method=base"),
             _cfg("method=sft", "train_steps=1", "budget.nfe=500")]
    # pso at K = 1 is n/a: launched last (it prints why); base is run by the first job, so its own job goes
    order = schedule.launch_order(cells)
    assert order == [2, 4, 0, 1]
    # given lengths win; a base job that comes first runs its cell, and the others still add their own
    assert schedule.launch_order(cells, work=[5.0, 0.0, 1.0, 9.0, 3.0]) == [3, 0, 4, 2, 1]


def test_ordered_sweep_makes_hydra_launch_the_given_jobs_in_order():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(["method=base,ddpo", "seed=0,1"])
    jobs = BasicSweeper.split_arguments(parsed, None)[0]
    assert jobs[0] == ["method=base", "seed=0"] and len(jobs) == 4
    with schedule.ordered_sweep(jobs, [3, 1]):
        assert BasicSweeper.split_arguments(parsed, None) == [[jobs[3], jobs[1]]]
        assert BasicSweeper.split_arguments(parsed, 1) == [[jobs[3]], [jobs[1]]]
        other = OverridesParser.create().parse_overrides(["method=sft,pso"])  # not the planned sweep: untouched
        assert BasicSweeper.split_arguments(other, None) == [[["method=sft"], ["method=pso"]]]
    assert BasicSweeper.split_arguments(parsed, None) == [jobs]


def test_workers_get_distinct_progress_rows(tmp_path):
    import subprocess
    import sys

    parent = f"test-{tmp_path.name}"
    mine = schedule.claim_progress_position(parent)
    assert schedule.claim_progress_position(parent) == mine  # one row per process, for all its cells
    code = ("from bench import schedule; import sys; a = schedule.claim_progress_position(sys.argv[1]); "
            "b = schedule.claim_progress_position(sys.argv[1]); print(a, b)")
    other = subprocess.run([sys.executable, "-c", code, parent], capture_output=True, text=True, check=True)
    a, b = map(int, other.stdout.split())
    assert a == b and a != mine and a >= 1 and mine >= 1  # row 0 is the grid's bar


def test_grid_progress_advances_by_the_work_of_ended_cells(tmp_path):
    from bench import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = tracking.Store(uri)
    experiment_id = store.experiment_id("progress")
    with store.start_run(experiment_id, "a", {"cell_id": "a"}):
        pass
    progress = schedule.GridProgress(uri, "progress", {"a": 3.0, "b": 1.0, "c": 6.0}, interval=0.05)
    with progress:
        assert progress.bar.n == 3.0 and progress.bar.total == 10.0  # "a" FINISHED before the grid started
        with pytest.raises(RuntimeError), store.start_run(experiment_id, "c", {"cell_id": "c"}):
            raise RuntimeError("a failed cell has ended too")
        import time

        deadline = time.monotonic() + 30
        while progress.bar.n < 9.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert progress.bar.n == 9.0 and "2/3 cells" in progress.bar.desc
        running = store.start_run(experiment_id, "b", {"cell_id": "b"})
        running.__enter__()  # RUNNING: not counted
        time.sleep(0.3)
        assert progress.bar.n == 9.0
        running.__exit__(None, None, None)
    assert progress.bar.n == 10.0  # the last poll at the end sees it FINISHED


def test_base_and_search_samples_do_not_depend_on_the_training_seed(tiny_toy):
    """The invariance the untrained methods declare (Config.invariant_to): a fresh policy built after seeding with
    different training seeds (its LoRA A matrices differ, B = 0) samples bit-identical images, plain and best-of-N."""
    import torch

    import methods
    import tasks.rewards as rewards
    from bench.evaluate import initial_noise
    from methods.common import seed_everything
    from methods.policy import load_policy

    prompts = ["a red circle", "two blue squares"]
    verifier = rewards.load("toy-all")
    images = {}
    for seed in (0, 1):
        seed_everything(seed)
        policy = load_policy("toy-turbo", path=str(tiny_toy), device="cpu")
        noise = initial_noise(0, range(len(prompts)), tuple(policy.latent_shape))
        adapter = next(p for p in policy.trainable_parameters() if p.abs().sum() > 0).detach().clone()
        for name in ("base", "inference_scaling"):
            out, _ = (methods.load(name).generate(policy, prompts, 2, noise=noise) if name == "base" else
                      methods.load(name).generate(policy, prompts, 2, noise=noise, verifier=verifier))
            images[seed, name] = out
        images[seed, "adapter"] = adapter
    assert not torch.equal(images[0, "adapter"], images[1, "adapter"])  # the seeds did draw different adapters
    for name in ("base", "inference_scaling"):
        assert torch.equal(images[0, name], images[1, name]), name


def test_progress_rows_never_follow_a_planted_symlink(tmp_path, monkeypatch):
    """The row lock files sit in a per-user 0700 folder and are opened with O_NOFOLLOW: a symlink planted as a row's
    lock file is skipped (the next row is taken) and its target is left untouched."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    folder = tmp_path / "stepbench-progress" / "planted"
    folder.mkdir(parents=True, mode=0o700)
    (tmp_path / "stepbench-progress").chmod(0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (folder / "row1.lock").symlink_to(victim)
    assert schedule.claim_progress_position("planted") == 2
    assert victim.read_text() == "keep" and (folder / "row1.lock").is_symlink()
