"""reports: MLflow store -> tidy frame -> leaderboard numbers, CIs, claims, HTML escaping, PDF sections, CLI errors.

The fixture writes a small grid through bench.tracking's own write API (as the harness does): per-image scores
are built from a known model (prompt effect + shared per-noise effect + method gain at each S + seed jitter), and
the test recomputes every leaderboard number from those raw records with plain pandas, independently of
reports.frame / reports.stats.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from bench import tracking  # noqa: E402
from bench.evaluate import save_grid  # noqa: E402
from reports import stats  # noqa: E402
from reports.__main__ import main as reports_main  # noqa: E402
from reports.frame import ReportInputError, load  # noqa: E402
from reports.render import build_context, render_html, tile_boxes, verdict, write_pdf, write_report  # noqa: E402

STEPS = (1, 2, 4, 8)
N_PROMPTS, N_SAMPLES = 6, 24
PROMPTS = ["a red circle", "two blue squares", "<script>alert('x')</script> & \"quotes\"",
           "three green triangles", "a yellow square", "one cyan circle"]
REWARDS = ("toy-all", "toy-color")  # training reward, held-out reward
# method -> (K, seeds, gain over base per S on the training reward)
CELLS = {
    "base": (2, [0], [0.0, 0.0, 0.0, 0.0]),
    "ddpo": (2, [0, 1], [0.02, 0.10, 0.04, 0.00]),
    "sdpo": (2, [0, 1, 2], [0.12, 0.15, 0.14, 0.12]),
    "pso": (2, [0], [0.01, 0.02, 0.01, 0.01]),
    "sft": (2, [0], [-0.10, -0.06, 0.0, 0.02]),
    "inference_scaling": (2, [0], [0.05, 0.05, 0.05, 0.05]),
}
FAILED = ("spo", 2, 0, "RuntimeError: <b>boom</b> budget exhausted")


def synthetic_values(method: str, seed: int, reward: str) -> np.ndarray:
    """(N_SAMPLES, len(STEPS)) scores: shared prompt/noise effects + method gain + per-seed jitter."""
    shared = np.random.default_rng(1000 + REWARDS.index(reward))
    prompt_effect = shared.normal(0.5, 0.15, N_PROMPTS)
    noise_effect = shared.normal(0.0, 0.1, (N_SAMPLES, len(STEPS)))  # same for every method: the pairing
    step_effect = np.array([-0.1, 0.0, 0.05, 0.08])
    gain = np.array(CELLS[method][2]) * (1.0 if reward == REWARDS[0] else -0.5)  # held-out: mild reward hacking
    own = np.random.default_rng(zlib.crc32(f"{method}/{seed}/{reward}".encode()))
    jitter = 0.0 if method == "base" else own.normal(0, 0.02) + own.normal(0, 0.03, (N_SAMPLES, len(STEPS)))
    prompt_idx = np.arange(N_SAMPLES) % N_PROMPTS
    return prompt_effect[prompt_idx, None] + noise_effect + step_effect + gain + jitter


def tile_image(method: str, s: int, j: int) -> torch.Tensor:
    """A blocky 32x32 test image (8x8 blocks of 4 px), different per (method, S, sample)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{method}/{s}/{j}".encode()))
    return torch.rand(3, 8, 8, generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)


def empty_store(root: Path, template: Path | None = None) -> str:
    """A new SQLite MLflow store; copying an already-migrated template skips MLflow's ~5 s of schema migrations."""
    root.mkdir(parents=True, exist_ok=True)
    if template is not None:
        shutil.copy(template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.Store(uri)  # creates (or opens) the database
    return uri


def write_store(root: Path, *, template: Path | None = None, failed: bool = True,
                grid: str = "toy") -> tuple[str, pd.DataFrame]:
    """A tmp SQLite MLflow store written through bench.tracking; returns (uri, raw per-image records)."""
    uri = empty_store(root, template)
    store = tracking.Store(uri)
    exp = store.experiment_id(grid)
    records = []
    for method, (k, seeds, _) in CELLS.items():
        for seed in seeds:
            name = tracking.run_name(method, "toy-turbo", REWARDS[0], k, seed)
            tags = dict(method=method, model="toy-turbo", reward=REWARDS[0], seed=seed, grid=grid,
                        train_steps=0 if method == "base" else k,  # as bench.cell tags them
                        cell_id=f"{method[:4]}{k}{seed}abcdef", git_commit="0123456789abcdef", device="cpu",
                        stepbench_version="0.1.0", **{"lib.torch": "2.13.0", "reward.toy-all.scale": "fraction correct",
                                                     "reward.toy-all.source": "tasks.toy.verify"})
            with store.start_run(exp, name, tags) as run:
                run.log_params({"eval.n": N_SAMPLES, "eval.grid_images": 8, "eval.seed": 0, "reward.name": REWARDS[0],
                                "eval.steps": list(STEPS), "dtype": "float32", "prompts": "toy"})
                rows = []
                for reward in REWARDS:
                    values = synthetic_values(method, seed, reward)
                    for i in range(N_SAMPLES):
                        for c, s in enumerate(STEPS):
                            rows.append(dict(run_id=run.run_id, cell_id=tags["cell_id"], method=method,
                                             prompt=PROMPTS[i % N_PROMPTS], prompt_idx=i % N_PROMPTS, sample_idx=i,
                                             seed=seed, S=s, reward=reward, value=float(values[i, c]),
                                             model="toy-turbo", train_steps=k, eval_seed=0))  # bench.cell's extras
                scores = pd.DataFrame(rows)
                records.append(scores.assign(train_steps=k))
                out = root / run.run_id
                out.mkdir()
                scores.to_parquet(out / "scores.parquet")
                trains = method not in ("base", "inference_scaling")
                metrics = {"cost/sample_nfe": 6000.0 + 100 * seed if trains else 0.0,
                           "cost/grad_nfe": 2000.0 if trains else 0.0,
                           "cost/reward_calls": 1500.0 if trains else 0.0, "cost/wall_seconds": 12.5,
                           "cost/train_seconds": 10.0, "cost/peak_rss_mb": 900.0}
                metrics["cost/train_nfe"] = metrics["cost/sample_nfe"] + metrics["cost/grad_nfe"]
                per_image = 4 if method == "inference_scaling" else 1
                for s in STEPS:
                    metrics[f"cost/eval_nfe/s{s}"] = float(N_SAMPLES * s * per_image)
                    for reward in REWARDS:
                        v = scores[(scores.S == s) & (scores.reward == reward)].value
                        metrics |= {f"eval/{reward}/s{s}/mean": v.mean(), f"eval/{reward}/s{s}/n": float(len(v))}
                    part = scores[(scores.S == s) & (scores.reward == REWARDS[0])].sort_values("sample_idx")[:8]
                    images = torch.stack([tile_image(method, s, j) for j in range(8)])
                    save_grid(images, part.prompt.tolist(), part.value.tolist(), out / f"grid_s{s}.png",
                              title=f"{name} S={s}", reward=REWARDS[0])
                metrics["cost/eval_nfe"] = sum(metrics[f"cost/eval_nfe/s{s}"] for s in STEPS)
                run.log_metrics(metrics)
                run.client.log_artifacts(run.run_id, str(out), "eval")  # one call: each costs a store round trip
    if failed:
        method, k, seed, error = FAILED
        tags = dict(method=method, model="toy-turbo", reward=REWARDS[0], train_steps=k, seed=seed, grid=grid,
                    cell_id="spo20failed0", git_commit="0123456789abcdef", device="cpu")
        with pytest.raises(RuntimeError):
            with store.start_run(exp, tracking.run_name(method, "toy-turbo", REWARDS[0], k, seed), tags):
                raise RuntimeError(error.split(": ", 1)[1])
    return uri, pd.concat(records, ignore_index=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template")
    empty_store(root)
    return root / "mlflow.db"


@pytest.fixture(scope="module")
def grid(tmp_path_factory, template):
    root = tmp_path_factory.mktemp("store")
    uri, records = write_store(root, template=template)
    results = load(uri)
    context = build_context(results, n_boot=400, seed=0)
    return dict(uri=uri, records=records, results=results, context=context, root=root)


# ----------------------------------------------------------------------------------------------- frame


def test_tidy_frame_has_one_row_per_image_score(grid):
    scores, records = grid["results"].scores, grid["records"]
    assert len(scores) == len(records)
    assert set(scores.columns) >= {"method", "model", "train_reward", "train_steps", "seed", "reward", "S",
                                   "prompt_idx", "sample_idx", "prompt", "value"}
    assert not scores.duplicated(["run_id", "reward", "S", "sample_idx"]).any()
    assert set(grid["results"].runs["status"]) == {"FINISHED", "FAILED"}


# ----------------------------------------------------------------------------------------------- numbers


def _expected(records: pd.DataFrame, reward: str) -> dict:
    """Leaderboard numbers recomputed from the raw records with pandas only."""
    r = records[records.reward == reward]
    per_seed = r.groupby(["method", "seed", "S"]).value.mean()
    per_step = per_seed.groupby(["method", "S"]).mean().unstack("S")  # method x S (mean over seeds)
    base = r[r.method == "base"].set_index(["sample_idx", "S"]).value
    out = {}
    for method in CELLS:
        mu = per_step.loc[method]
        k = CELLS[method][0]
        mine = r[r.method == method].join(base.rename("base"), on=["sample_idx", "S"])
        wins = ((mine.value > mine.base) + 0.5 * (mine.value == mine.base)).groupby(mine.S).mean().mean()
        gains = (mine.value - mine.base).groupby(mine.S).mean()
        out[method] = dict(S={s: mu[s] for s in STEPS}, mean=mu.mean(), worst=mu.min(),
                           gap=mu[k] - mu[[s for s in STEPS if s != k]].mean(), win=wins, gain=gains)
    return out


@pytest.mark.parametrize("which", [0, 1])
def test_leaderboard_numbers_match_independent_recomputation(grid, which):
    group = grid["context"]["groups"][0]
    tables = group["main"] if which == 0 else group["heldout"][0]
    assert tables.reward == REWARDS[which]
    expected = _expected(grid["records"], REWARDS[which])
    rows = {r[0].text: r for r in tables.leaderboard.rows}
    from reports.render import label

    assert list(rows) == [label(m) for m in CELLS]  # base first, fixed method order
    headers = tables.leaderboard.headers
    col = {h: i for i, h in enumerate(headers)}
    for method, e in expected.items():
        row = rows[label(method)]
        for s in STEPS:
            assert row[col[f"S={s} ↑"]].text == f"{e['S'][s]:.3f}", (method, s)
        assert row[col["mean over S ↑"]].text == f"{e['mean']:.3f}"
        assert row[col["worst S ↑"]].text == f"{e['worst']:.3f}"
        trains = method not in ("base", "inference_scaling")  # no K, hence no step gap
        assert row[col["K"]].text == (str(CELLS[method][0]) if trains else "—")
        assert row[col["step gap →0"]].text == (f"{e['gap']:+.3f}" if trains else "—")
        if method == "base":
            assert row[col["win rate vs base ↑"]].text == "—"
            assert row[col["CI over"]].text == f"{N_PROMPTS} prompts"
        else:
            assert row[col["win rate vs base ↑"]].text == f"{100 * e['win']:.1f}%"
            n = len(CELLS[method][1])
            assert row[col["CI over"]].text == (f"{n} seeds" if n > 1 else f"{N_PROMPTS} prompts")
    # bold = best per column
    for s in STEPS:
        best = max(expected, key=lambda m: expected[m]["S"][s])
        assert [r[0].text for r in tables.leaderboard.rows if r[col[f"S={s} ↑"]].bold] == [label(best)]
    gains = {r[0].text: r for r in tables.gains.rows}
    for method, e in expected.items():
        if method != "base":
            for c, s in enumerate(STEPS):
                assert gains[label(method)][2 + c].text == f"{e['gain'][s]:+.3f}"


def test_ci_over_seeds_lies_within_the_seed_means(grid):
    records = grid["records"]
    r = records[(records.reward == REWARDS[0]) & (records.method == "sdpo") & (records.S == 1)]
    seed_means = r.groupby("seed").value.mean()
    e = grid["context"]["groups"][0]["main"].estimates[("sdpo", 2)]["S"][1]
    assert (e.n, e.unit) == (3, "seeds")
    assert seed_means.min() - 1e-12 <= e.lo <= e.value <= e.hi <= seed_means.max() + 1e-12


def test_html_contains_the_leaderboard_numbers_and_escapes_the_malicious_prompt(grid, tmp_path):
    html = render_html(grid["context"])
    first = grid["context"]["groups"][0]["main"].leaderboard.rows[1]
    assert all(c.text in html for c in first)
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &#34;quotes&#34;" in html
    assert "&lt;b&gt;boom&lt;/b&gt;" in html  # error text escaped too
    provenance = grid["context"]["provenance"]
    assert ("torch", "2.13.0 (9 runs)") in provenance["libraries"]
    assert provenance["rewards"][0] | {"options": None} == dict(name="toy-all", trained=True, options=None,
                                                               source="tasks.toy.verify (9 runs)",
                                                               scale="fraction correct (9 runs)")
    # self-contained: no remote asset, fonts or scripts
    assert "http://" not in html and "https://" not in html and "@import" not in html and "url(" not in html


# ----------------------------------------------------------------------------------------------- stats


def _block(values, prompts=None, steps=(1,)):
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[None]
    if values.ndim == 2:  # (seeds, pairs) at one step count
        values = values[:, :, None]
    prompts = np.arange(values.shape[1]) if prompts is None else np.asarray(prompts)
    return stats.Block(values, prompts, steps)


def test_paired_ci_of_a_constant_shift_is_exact_while_unpaired_cis_are_wide():
    b = np.array([0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.5, 0.4])  # large prompt-to-prompt spread
    a = b + 0.25
    e = stats.paired_diff_ci(_block(a), _block(b), stats.at_step((1,), 1), n_boot=500)
    assert e.value == pytest.approx(0.25) and e.lo == pytest.approx(0.25) and e.hi == pytest.approx(0.25)
    ua = stats.mean_ci(_block(a), stats.at_step((1,), 1), n_boot=500)
    assert ua.hi - ua.lo > 0.2


def test_paired_ci_on_a_hand_made_example():
    # per-prompt differences 0, 0, 3: a resample's mean difference is k, the number of draws of prompt 3,
    # k ~ Binomial(3, 1/3): 0, 1, 2, 3 with probabilities 8/27, 12/27, 6/27, 1/27 -> 95% percentile CI [0, 3].
    a = _block([[1.0, 2.0, 5.0]])
    b = _block([[1.0, 2.0, 2.0]])
    e = stats.paired_diff_ci(a, b, stats.at_step((1,), 1), n_boot=4000, seed=3)
    assert (e.lo, e.hi, e.n) == (0.0, 3.0, 3) and e.value == pytest.approx(1.0)
    # two samples of one prompt move together: two clusters -> means 0, 1/2, 1 -> [0, 1]
    a2 = _block([[0.0, 0.0, 1.0, 1.0]], prompts=[0, 0, 1, 1])
    b2 = _block([[0.0, 0.0, 0.0, 0.0]], prompts=[0, 0, 1, 1])
    e2 = stats.paired_diff_ci(a2, b2, stats.at_step((1,), 1), n_boot=4000)
    assert (e2.value, e2.lo, e2.hi, e2.n) == (0.5, 0.0, 1.0, 2)


def test_bootstrap_is_deterministic_given_the_seed():
    rng = np.random.default_rng(0)
    block = stats.Block(rng.normal(size=(3, 40, 4)), np.arange(40) % 10, STEPS)
    f = stats.mean_over_steps(STEPS)
    assert stats.mean_ci(block, f, seed=7) == stats.mean_ci(block, f, seed=7)
    one = stats.Block(block.values[:1], block.prompts, STEPS)  # one seed: resampled over its 10 prompts
    assert stats.mean_ci(one, f, seed=7) == stats.mean_ci(one, f, seed=7)
    assert stats.mean_ci(one, f, seed=7) != stats.mean_ci(one, f, seed=8)
    assert stats.mean_ci(one, f, seed=7).unit == "prompts"


def test_identical_seeds_count_once_and_win_rate_counts_ties_half():
    v = np.array([[0.0, 1.0, 2.0]])
    dup = _block(np.stack([v[0], v[0]])[:, :, None])
    assert stats.mean_ci(dup, stats.at_step((1,), 1)).unit == "prompts"
    assert stats.win_rate(_block([[1.0, 1.0, 3.0]]), _block([[0.0, 1.0, 4.0]])) == pytest.approx(0.5)


def test_verdicts():
    up, down, zero = (stats.Estimate(0.1, 0.05, 0.15, 8, "p"), stats.Estimate(-0.1, -0.15, -0.05, 8, "p"),
                      stats.Estimate(0.0, -0.05, 0.05, 8, "p"))
    assert verdict(up)[0] == "supported" and verdict(down)[0] == "not supported"
    assert verdict(zero)[0] == "inconclusive at this n"
    assert verdict(up, 1000, 1050, "train")[0] == "supported"  # equal within 10 %
    assert verdict(up, 2000, 1000, "train")[0] == "inconclusive"  # better, but with more compute
    assert verdict(down, 2000, 1000, "train")[0] == "not supported"  # worse even with more compute


def test_claims_table(grid):
    claims = {c["source"]: c for c in grid["context"]["claims"] if c["source"] != "Inference-time scaling"}
    assert claims["SDPO"]["verdict"] == "supported"  # +0.1 at S in {1, 4, 8}
    assert "S ∈ {1, 4, 8}" in claims["SDPO"]["comparison"]
    assert claims["PSO"]["verdict"] == "supported"  # SFT degrades S=1,2
    assert claims["SPO"]["verdict"] == "not run"  # its only cell failed; Diffusion-DPO absent
    assert claims["Diffusion-Sharpening"]["verdict"] == "not run"
    search = [c for c in grid["context"]["claims"] if c["source"] == "Inference-time scaling"]
    assert len(search) == 4 and all("total NFEs" in c["compute"] for c in search)


def test_failed_cells_are_listed_with_their_error(grid):
    failed = grid["context"]["failed"]
    assert [f["run_name"] for f in failed] == ["spo/toy-turbo/toy-all/k2/s0"]
    assert "<b>boom</b>" in failed[0]["error"] and "Traceback" in failed[0]["traceback"]


def test_grid_tiles_crop_exactly_the_saved_images(tmp_path):
    images = torch.stack([tile_image("x", 1, j) for j in range(11)])
    for title in ("", "a title"):
        path = save_grid(images, ["p"] * 11, [0.5] * 11, tmp_path / "g.png", title=title, reward="toy-all")
        from PIL import Image

        img = np.asarray(Image.open(path).convert("RGB"))
        boxes = tile_boxes(img.shape[1], img.shape[0], 11)
        assert boxes is not None
        for j in (0, 8, 10):
            x, y, w, h = boxes[j]
            expected = (images[j].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(img[y:y + h:3, x:x + w:3], expected)
    assert tile_boxes(100, 100, 3) is None


# ----------------------------------------------------------------------------------------------- output


def test_pdf_contains_every_section_heading(grid, tmp_path):
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext missing: apt-get install -y poppler-utils")
    pdf = write_pdf(render_html(grid["context"]), tmp_path / "report.pdf")
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    for heading in ("How to read this report", "Leaderboard — toy-all", "Gain over base", "Held-out rewards",
                    "Step curves", "Cost", "Image grid", "Claims", "Failed cells", "Provenance"):
        assert heading in text, heading
    assert "<script>alert" in text  # the prompt is shown as text, not swallowed as markup


def test_cli_renders_and_reports_bad_input_with_exit_code_2(grid, template, tmp_path, capsys):
    out = tmp_path / "cli"
    assert reports_main(["--tracking-uri", grid["uri"], "--experiment", "toy", "--out", str(out), "--no-pdf",
                         "--n-boot", "100"]) == 0
    assert (out / "index.html").is_file() and not (out / "report.pdf").exists()
    assert "stepbench/toy" in capsys.readouterr().out

    empty = empty_store(tmp_path / "empty", template)  # a database without any experiment
    assert reports_main(["--tracking-uri", empty, "--out", str(tmp_path / "o")]) == 2
    assert "no stepbench experiments" in capsys.readouterr().err

    assert reports_main(["--tracking-uri", grid["uri"], "--experiment", "nope", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown experiment 'nope'; available: stepbench/toy"
    with pytest.raises(ReportInputError):
        load(grid["uri"], ["stepbench/nope"])

    # the real entry point: a message and exit code 2, no traceback, and no database created as a side effect
    missing = tmp_path / "nope.db"
    proc = subprocess.run([sys.executable, "-m", "reports", "--tracking-uri", f"sqlite:///{missing}", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no MLflow store at") and not missing.exists()


def test_a_grid_whose_cells_all_failed_still_renders(template, tmp_path):
    uri = empty_store(tmp_path / "store", template)
    store = tracking.Store(uri)
    exp = store.experiment_id("broken")
    with pytest.raises(ValueError):
        with store.start_run(exp, "ddpo/toy-turbo/toy-all/k2/s0", dict(method="ddpo", model="toy-turbo",
                                                                       reward="toy-all", train_steps=2, seed=0)):
            raise ValueError("lr must be positive")
    paths = write_report(load(uri), tmp_path / "out", pdf=False)
    html = paths["html"].read_text()
    assert "ValueError: lr must be positive" in html and "No finished cell" in html


def test_a_retuned_cell_replaces_the_older_config_of_the_same_grid_position(template, tmp_path):
    """After a preset changes, the grid reruns a position (method/model/reward/K/seed) under a new cell id; the
    report takes the newest config's run only (never a mix of both configs) and says which run it ignored."""
    import time

    uri, _ = write_store(tmp_path / "store", template=template, failed=False)
    store = tracking.Store(uri)
    exp = store.experiment_id("toy")
    name = tracking.run_name("pso", "toy-turbo", REWARDS[0], 2, 0)
    time.sleep(0.01)  # a later start_time than every run of write_store
    tags = dict(method="pso", model="toy-turbo", reward=REWARDS[0], seed=0, grid="toy", train_steps=2,
                cell_id="pso20retuned1", git_commit="0123456789abcdef", device="cpu")
    with store.start_run(exp, name, tags) as run:
        run.log_params({"eval.n": N_SAMPLES, "eval.steps": list(STEPS), "reward.name": REWARDS[0]})
        rows = [dict(run_id=run.run_id, cell_id="pso20retuned1", method="pso", prompt=PROMPTS[i % N_PROMPTS],
                     prompt_idx=i % N_PROMPTS, sample_idx=i, seed=0, S=s, reward=reward, value=1.0,
                     model="toy-turbo", train_steps=2, eval_seed=0)
                for reward in REWARDS for i in range(N_SAMPLES) for s in STEPS]
        out = tmp_path / run.run_id
        out.mkdir()
        pd.DataFrame(rows).to_parquet(out / "scores.parquet")
        run.client.log_artifacts(run.run_id, str(out), "eval")
        new_run = run.run_id
    results = load(uri)
    pso = results.scores[results.scores["method"] == "pso"]
    assert set(pso["run_id"]) == {new_run} and (pso["value"] == 1.0).all()
    assert any(p.startswith(f"{name}: FINISHED run of an older config (cell pso20abcdef)") for p in results.problems)
    assert set(results.scores[results.scores["method"] == "ddpo"]["seed"]) == {0, 1}  # other positions untouched
