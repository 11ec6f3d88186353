"""bench.grid.grid_cells: the distinct cells a multirun runs (what bench.perf estimates from)."""

from bench import grid as grids


def test_grid_cells_add_each_base_once_and_drop_not_applicable_cells():
    overrides = ["grid=smoke", "method=pso,ddpo", "train_steps=1,2"]
    names = [grids.cell_run_name(c) for c in grids.grid_cells(overrides)]
    # PSO's online variant needs K >= 2 (PSO Config.min_train_steps): its K = 1 cell is n/a and is left out.
    assert names == ["base/toy-turbo/toy-all/k0/s0", "pso/toy-turbo/toy-all/k2/s0",
                     "ddpo/toy-turbo/toy-all/k1/s0", "ddpo/toy-turbo/toy-all/k2/s0"]
    everything = [grids.cell_run_name(c) for c in grids.grid_cells(overrides, applicable_only=False)]
    assert everything == names[:1] + ["pso/toy-turbo/toy-all/k1/s0"] + names[1:]


def test_grid_cells_without_base_keep_only_the_jobs():
    cells = grids.grid_cells(["grid=smoke", "method=ddpo", "train_steps=1,2", "with_base=false"])
    assert [grids.cell_run_name(c) for c in cells] == ["ddpo/toy-turbo/toy-all/k1/s0", "ddpo/toy-turbo/toy-all/k2/s0"]


# --------------------------------------------------------------------------------------------- the named grids


def _trailing_timesteps(num_steps: int) -> set[int]:
    """The denoising timesteps of toy-turbo's sampler at `num_steps` (its own scheduler, trailing spacing)."""
    from diffusers import DDIMScheduler

    import tasks.models as models

    scheduler = DDIMScheduler.from_pretrained(models.get("toy-turbo").source, subfolder="scheduler")
    scheduler.set_timesteps(num_steps)
    return set(scheduler.timesteps.tolist())


def test_default_toy_grid_trains_three_seeds_at_two_k_and_evaluates_off_the_training_grids():
    cells = grids.grid_cells(["grid=toy"])
    trained = [c for c in cells if c["method"]["name"] not in ("base", "inference_scaling")]
    methods = {c["method"]["name"] for c in trained}
    assert {"ddpo", "diffusion_dpo", "pso", "spo", "sdpo", "sharpening", "sft"} <= methods
    for method in methods:  # every trained row: K in {2, 4} x seeds {0, 1, 2}, nothing n/a
        runs = sorted((grids.resolved_train_steps(c), c["seed"]) for c in trained if c["method"]["name"] == method)
        assert runs == [(k, s) for k in (2, 4) for s in (0, 1, 2)], method
    assert len(trained) == 6 * len(methods)
    assert {c["method"]["name"] for c in cells} - methods == {"base", "inference_scaling"}
    assert len({grids.cell_id(c) for c in cells}) == len(cells)
    ev = trained[0]["eval"]
    assert all(c["eval"] == ev for c in cells)  # the same protocol (noise, prompts, S) for every row: paired
    assert ev["splits"] == ["val", "test"] and ev["val_seed"] != ev["seed"]
    assert ev["n"] == 4 * 48 and ev["val_n"] > 0 and trained[0]["budget"]["nfe"] == 8_000  # grid/toy.yaml header
    # evaluation step counts whose timesteps neither training grid visits (trailing grids nest: 1 in 2 in 4 in 8)
    seen = _trailing_timesteps(2) | _trailing_timesteps(4)
    unseen = {s: sorted(_trailing_timesteps(s) - seen) for s in ev["steps"]}
    assert unseen[3] == [332, 666] and unseen[6] == [166, 332, 666, 832]
    assert {2, 4} <= set(ev["steps"]) and unseen[1] == unseen[2] == unseen[4] == []


def test_toy_full_and_smoke_grids():
    jobs = [dict(o.split("=", 1) for o in job) for job in grids.expand(["grid=toy-full"], True)]
    assert {j["model"] for j in jobs} == {"toy-turbo", "toy-base"}
    assert {j["train_steps"] for j in jobs} == {"1", "2", "4"} and {j["seed"] for j in jobs} == set("01234")
    full = grids._plain(grids.compose(["grid=toy-full"]))["eval"]
    assert full["steps"] == [1, 2, 3, 4, 6, 8] and full["n"] > 240 and full["splits"] == ["val", "test"]
    smoke = grids.grid_cells(["grid=smoke"])
    names = [grids.cell_run_name(c) for c in smoke]
    assert names[:3] == ["base/toy-turbo/toy-all/k0/s0", "ddpo/toy-turbo/toy-all/k1/s0", "ddpo/toy-turbo/toy-all/k2/s0"]
    assert {c["method"]["name"] for c in smoke} == {"base", "ddpo", "inference_scaling"} and len(smoke) <= 5
    assert {(c["eval"]["n"], c["eval"]["val_n"], c["budget"]["nfe"]) for c in smoke} == {(8, 8, 48)}
    assert grids.eval_splits(smoke[0]) == [("val", 8, 1), ("test", 8, 0)]
