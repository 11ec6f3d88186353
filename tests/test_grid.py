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
