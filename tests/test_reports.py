"""reports: MLflow store -> tidy frame -> leaderboard numbers, intervals, verdicts, claims, HTML escaping, PDF
sections, CLI errors, sweeps and stand-ins.

The fixture writes a small grid through bench.tracking's own write API (as the harness does): per-image scores
are built from a known model (prompt effect + shared per-noise effect + method gain at each S + seed jitter) on the
test split, and the same scores + 5 on the validation split (so a validation number leaking into the report would
show); the test recomputes every leaderboard number from the raw test records with plain pandas, independently of
reports.frame / reports.stats. Sample images are logged as eval/test/samples_s<S>.npz arrays, as bench.evaluate does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from bench import tracking  # noqa: E402
from reports import stats  # noqa: E402
from reports.__main__ import main as reports_main  # noqa: E402
from reports.frame import ReportInputError, load  # noqa: E402
from reports.render import build_context, claim_verdict, render_html, write_pdf, write_report  # noqa: E402

STEPS = (1, 2, 4, 8)
N_PROMPTS, N_SAMPLES = 6, 24
PROMPTS = ["a red circle", "two blue squares", "<script>alert('x')</script> & \"quotes\"",
           "three green triangles", "a yellow square", "one cyan circle"]
REWARDS = ("toy-all", "toy-color")  # training reward, held-out reward
SPLITS = {"val": 5.0, "test": 0.0}  # split -> offset of its scores: validation numbers must never reach the report
N_NPZ = 8  # samples per S logged as arrays
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


def synthetic_values(method: str, seed: int, reward: str, gain: list[float] | None = None) -> np.ndarray:
    """(N_SAMPLES, len(STEPS)) scores: shared prompt/noise effects + method gain + per-seed jitter."""
    shared = np.random.default_rng(1000 + REWARDS.index(reward))
    prompt_effect = shared.normal(0.5, 0.15, N_PROMPTS)
    noise_effect = shared.normal(0.0, 0.1, (N_SAMPLES, len(STEPS)))  # same for every method: the pairing
    step_effect = np.array([-0.1, 0.0, 0.05, 0.08])
    gain = np.array(CELLS[method][2] if gain is None else gain) * (1.0 if reward == REWARDS[0] else -0.5)  # hacking
    own = np.random.default_rng(zlib.crc32(f"{method}/{seed}/{reward}".encode()))
    jitter = 0.0 if method == "base" else own.normal(0, 0.02) + own.normal(0, 0.03, (N_SAMPLES, len(STEPS)))
    prompt_idx = np.arange(N_SAMPLES) % N_PROMPTS
    return prompt_effect[prompt_idx, None] + noise_effect + step_effect + gain + jitter


def tile_image(method: str, s: int, j: int) -> np.ndarray:
    """A blocky 16x16 uint8 test image (4x4 blocks of 4 px), different per (method, S, sample)."""
    g = np.random.default_rng(zlib.crc32(f"{method}/{s}/{j}".encode()))
    return g.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)


def save_samples(folder: Path, method: str, s: int, prompts: list[str], split: str = "test") -> Path:
    """eval/<split>/samples_s<S>.npz as the contract has it: images (k,H,W,3) uint8, prompt, prompt_idx, sample_idx."""
    (folder / split).mkdir(parents=True, exist_ok=True)
    path = folder / split / f"samples_s{s}.npz"
    idx = np.arange(N_NPZ)
    np.savez(path, images=np.stack([tile_image(method, s, j) for j in idx]), prompt=np.array(prompts)[idx % N_PROMPTS],
             prompt_idx=idx % N_PROMPTS, sample_idx=idx)
    return path


def empty_store(root: Path, template: Path | None = None) -> str:
    """A new SQLite MLflow store; copying an already-migrated template skips MLflow's ~5 s of schema migrations."""
    root.mkdir(parents=True, exist_ok=True)
    if template is not None:
        shutil.copy(template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.Store(uri)  # creates (or opens) the database
    return uri


def write_store(root: Path, *, template: Path | None = None, failed: bool = True, grid: str = "toy",
                cells: dict | None = None, tags: dict | None = None, drop: tuple[str, ...] = (),
                method_tags=None) -> tuple[str, pd.DataFrame]:
    """A tmp SQLite MLflow store written through bench.tracking; returns (uri, raw per-image records).
    `method_tags(method)`: more tags of that method's runs."""
    uri = empty_store(root, template)
    store = tracking.Store(uri)
    exp = store.experiment_id(grid)
    records = []
    extra = tags or {}
    for method, (k, seeds, gain) in (cells or CELLS).items():
        for seed in seeds:
            name = tracking.run_name(method, "toy-turbo", REWARDS[0], k, seed)
            tags = dict(method=method, model="toy-turbo", reward=REWARDS[0], seed=seed, grid=grid,
                        train_steps=0 if method == "base" else k,  # as bench.cell tags them
                        cell_id=f"{method[:4]}{k}{seed}abcdef", git_commit="0123456789abcdef", device="cpu",
                        stepbench_version="0.1.0", **{"lib.torch": "2.13.0", "reward.toy-all.scale": "fraction correct",
                                                     "reward.toy-all.source": "tasks.toy.verify"}) | extra
            tags |= method_tags(method) if method_tags else {}
            tags = {key: value for key, value in tags.items() if key not in drop}
            with store.start_run(exp, name, tags) as run:
                run.log_params({"eval.n": N_SAMPLES, "eval.grid_images": 8, "eval.seed": 0, "reward.name": REWARDS[0],
                                "eval.steps": list(STEPS), "dtype": "float32", "prompts": "toy"})
                rows = []
                for split, offset in SPLITS.items():
                    for reward in REWARDS:
                        values = synthetic_values(method, seed, reward, gain) + offset
                        for i in range(N_SAMPLES):
                            for c, s in enumerate(STEPS):
                                rows.append(dict(run_id=run.run_id, cell_id=tags["cell_id"], method=method,
                                                 split=split, prompt=PROMPTS[i % N_PROMPTS], prompt_idx=i % N_PROMPTS,
                                                 sample_idx=i, seed=seed, S=s, reward=reward,
                                                 value=float(values[i, c]), model="toy-turbo", train_steps=k,
                                                 eval_seed=0))  # bench.cell's extras
                scores = pd.DataFrame(rows)
                records.append(scores[scores.split == "test"].assign(train_steps=k))
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
                    metrics[f"cost/eval_nfe/s{s}"] = float(len(SPLITS) * N_SAMPLES * s * per_image)  # both splits
                    metrics |= {f"cost/eval_nfe/{split}/s{s}": float(N_SAMPLES * s * per_image) for split in SPLITS}
                    for split in SPLITS:
                        for reward in REWARDS:
                            v = scores[(scores.S == s) & (scores.reward == reward) & (scores.split == split)].value
                            metrics |= {f"eval/{split}/{reward}/s{s}/mean": v.mean(),
                                        f"eval/{split}/{reward}/s{s}/n": float(len(v))}
                    save_samples(out, method, s, PROMPTS)
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

    order = ["base", "ddpo", "inference_scaling", "pso", "sdpo", "sft"]  # base first, then the registry's order
    assert list(rows) == [label(m) for m in order]
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
        n = len(CELLS[method][1])
        seeds = f"{n} seeds" if n > 1 else "1 seed"
        assert row[col["interval over"]].text == f"{seeds} × {N_PROMPTS} prompts × noises"
        if method == "base":
            assert row[col["win rate vs base ↑"]].text == "—"
        else:
            assert row[col["win rate vs base ↑"]].text == f"{100 * e['win']:.1f}%"
            # a trained row from one seed is flagged: its interval cannot cover seed variance
            assert (row[col["interval over"]].sub != "") == (n == 1 and method != "inference_scaling")
    # bold = best per column
    for s in STEPS:
        best = max(expected, key=lambda m: expected[m]["S"][s])
        assert [r[0].text for r in tables.leaderboard.rows if r[col[f"S={s} ↑"]].bold] == [label(best)]
    gains = {r[0].text: r for r in tables.gains.rows}
    for method, e in expected.items():
        if method != "base":
            for c, s in enumerate(STEPS):
                assert gains[label(method)][2 + c].text == f"{e['gain'][s]:+.3f}"


def test_interval_of_a_three_seed_row_is_at_least_the_t_interval_over_its_seeds(grid):
    """With 3 seeds the seed level alone gives mean +- t(2) sd/sqrt(3); the hierarchical interval adds the prompt
    level on top, so it is at least that wide (a percentile bootstrap over 3 seeds would be ~2x narrower)."""
    from scipy import stats as st

    records = grid["records"]
    r = records[(records.reward == REWARDS[0]) & (records.method == "sdpo") & (records.S == 1)]
    seed_means = r.groupby("seed").value.mean()
    e = grid["context"]["groups"][0]["main"].estimates[("sdpo", 2)]["S"][1]
    assert e.n == 3 and e.value == pytest.approx(seed_means.mean())
    t_half = st.t.ppf(0.975, 2) * seed_means.std(ddof=1) / np.sqrt(3)
    assert e.hi - e.value >= 0.9 * t_half and e.value - e.lo >= 0.9 * t_half
    assert e.lo < seed_means.min() and e.hi > seed_means.max()


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


def test_claim_verdicts_apply_the_compute_rule_after_holm():
    assert claim_verdict("better")[0] == "better" and claim_verdict("worse")[0] == "worse"
    assert claim_verdict("inconclusive", 1000, 1000, "train")[0] == "inconclusive"
    assert claim_verdict("better", 1000, 1050, "train")[0] == "better"  # equal within 10 %
    assert claim_verdict("better", 2000, 1000, "train")[0] == "inconclusive"  # better, but with more compute
    assert claim_verdict("worse", 2000, 1000, "train")[0] == "worse"  # worse even with more compute
    assert claim_verdict("worse", 500, 1000, "train")[0] == "inconclusive"  # worse, but with less compute
    assert claim_verdict("better", float("nan"), 1000, "train")[1] == "compute (NFEs) not recorded"


def test_gains_over_base_carry_holm_corrected_verdicts(grid):
    """Each column of the gains table (one S, or the mean over S) is one Holm family over its rows."""
    main = grid["context"]["groups"][0]["main"]
    rows = list(main.gain_estimates)
    assert len(rows) == 5  # every trained / inference-scaling row
    for col in (*STEPS, "mean"):
        column = [main.gain_estimates[k]["S"][col] if col != "mean" else main.gain_estimates[k]["mean"] for k in rows]
        for key, e, q in zip(rows, column, stats.holm([e.p for e in column])):
            verdict_, p = main.gain_estimates[key]["verdict"][col]
            assert p == pytest.approx(q)
            assert verdict_ == ("inconclusive" if q >= 0.05 else "better" if e.value > 0 else "worse")
    # clear cases of the synthetic grid: PSO's +0.04 and best-of-4's +0.07 (one run each, 6 prompts), SFT's -0.06 at S=1
    assert main.gain_estimates[("pso", 2)]["verdict"]["mean"][0] == "better"
    assert main.gain_estimates[("inference_scaling", -1)]["verdict"]["mean"][0] == "better"
    assert main.gain_estimates[("sft", 2)]["verdict"][1][0] == "worse"
    assert main.gain_estimates[("sft", 2)]["verdict"]["mean"][0] == "inconclusive"  # +0.000 over S
    gains = {r[0].text: r for r in main.gains.rows}
    assert gains["PSO"][-2].tone == "pos" and "better" in gains["PSO"][-2].sub
    assert gains["SFT (plain fine-tuning)"][2].tone == "neg"


def test_step_generalization_table_sets_the_gain_off_k_against_the_gain_at_k(grid):
    group = grid["context"]["groups"][0]
    [sg] = group["stepgen"]  # one training step count K = 2 in the fixture
    assert sg["k"] == 2 and sg["table"].headers[1] == "Δ S=2 (=K)"
    records = grid["records"]
    r = records[records.reward == REWARDS[0]]
    base = r[r.method == "base"].set_index(["sample_idx", "S"]).value
    rows = {row[0].text: row for row in sg["table"].rows}
    from reports.render import label

    for method in ("ddpo", "sdpo", "pso", "sft"):
        mine = r[r.method == method].join(base.rename("base"), on=["sample_idx", "S"])
        gain = (mine.value - mine.base).groupby(mine.S).mean()
        expected = gain[[1, 4, 8]].mean() - gain[2]
        row = rows[label(method)]
        assert row[1].text == f"{gain[2]:+.3f}" and row[-2].text == f"{expected:+.3f}", method
    assert "Inference scaling" not in rows  # it has no K


def test_claims_table(grid):
    claims = {c["source"]: c for c in grid["context"]["claims"] if c["source"] != "Inference-time scaling"}
    assert claims["SDPO"]["verdict"] == "better"  # +0.1 at S in {1, 4, 8}
    assert "S ∈ {1, 4, 8}" in claims["SDPO"]["comparison"]
    assert claims["PSO"]["verdict"] == "better"  # SFT degrades S=1,2
    compared = [c for c in grid["context"]["claims"] if c["estimate"] is not None]
    assert [c["p_holm"] for c in compared] == pytest.approx(stats.holm([c["estimate"].p for c in compared]))
    assert f"over {len(compared)} comparisons" in claims["SDPO"]["reason"]
    assert claims["SPO"]["verdict"] == "not run"  # its only cell failed; Diffusion-DPO absent
    assert claims["Diffusion-Sharpening"]["verdict"] == "not run"
    search = [c for c in grid["context"]["claims"] if c["source"] == "Inference-time scaling"]
    assert len(search) == 4 and all("total NFEs" in c["compute"] for c in search)
    # total = training + the test split's evaluation NFEs: PSO 8,000 + 24 x 15 = 8.36k, best-of-4 24 x 15 x 4 = 1.44k
    pso = next(c for c in search if c["comparison"].startswith("PSO"))
    assert pso["compute"] == "8.36k vs 1.44k total NFEs"


def test_failed_cells_are_listed_with_their_error(grid):
    failed = grid["context"]["failed"]
    assert [f["run_name"] for f in failed] == ["spo/toy-turbo/toy-all/k2/s0"]
    assert "<b>boom</b>" in failed[0]["error"] and "Traceback" in failed[0]["traceback"]


def test_image_grid_shows_the_logged_arrays_where_rows_disagree_most(grid):
    """Tiles are the npz arrays themselves (no PNG round trip); samples are ordered by how much the rows' scores
    disagree (mean over S of max - min across rows), so the shown ones are the top of that ranking."""
    import base64
    import io

    from PIL import Image

    g = grid["context"]["groups"][0]["grid"]
    assert g["any"] and not g["missing"]
    records = grid["records"]
    r = records[(records.reward == REWARDS[0]) & (records.sample_idx < N_NPZ)]
    lowest = r[r.seed == r.groupby("method").seed.transform("min")]
    spread = lowest.pivot_table(index=["S", "sample_idx"], columns="method", values="value")
    spread = (spread.max(axis=1) - spread.min(axis=1)).groupby(level="sample_idx").mean()
    expected = sorted(spread.index, key=lambda j: (-spread[j], j))[:3]
    assert [s["sample_idx"] for s in g["samples"]] == expected
    sample = g["samples"][0]
    ddpo = next(row for row in sample["rows"] if row["label"].startswith("DDPO"))
    uri = ddpo["tiles"][STEPS.index(4)]["uri"]
    tile = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    assert np.array_equal(tile, tile_image("ddpo", 4, sample["sample_idx"]))


def test_failed_attributes_come_from_the_per_image_checks():
    from reports.render import failed_attributes

    assert failed_attributes({"toy-color": 1.0, "toy-shape": 0.0, "toy-count": 1.0}) == ["shape"]
    # colour from toy-mean3 when toy-color was not scored: 3 * 1/3 - 0 - 1 = 0 -> colour failed, shape failed
    assert failed_attributes({"toy-mean3": 1 / 3, "toy-shape": 0.0, "toy-count": 1.0}) == ["colour", "shape"]
    assert failed_attributes({"toy-all": 1.0}) == []


# ----------------------------------------------------------------------------------------------- output


def test_pdf_contains_every_section_heading(grid, tmp_path):
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext missing: apt-get install -y poppler-utils")
    pdf = write_pdf(render_html(grid["context"]), tmp_path / "report.pdf")
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    for heading in ("How to read this report", "Leaderboard — toy-all", "Gain over base", "Step generalization",
                    "Held-out rewards",
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
    # this run's scores have no split column (written before the split protocol): read, but said so
    assert any(p.startswith("1 run(s) were scored before the train/val/test protocol") for p in results.problems)
    assert set(results.scores[results.scores["method"] == "ddpo"]["seed"]) == {0, 1}  # other positions untouched


# ----------------------------------------------------------------------------------------------- sweeps, stand-ins


def test_sweeps_stay_out_of_the_default_report_and_show_their_best_trial_when_asked(template, tmp_path):
    """A sweep's trials are many configs at one grid position: the default report leaves stepbench/sweep/* out; asked
    for, a sweep is one row per position, its best trial (tag sweep.best=true: the tuned config), not the last one."""
    uri, _ = write_store(tmp_path / "store", template=template, failed=False, cells={"base": CELLS["base"]})
    store = tracking.Store(uri)
    write_store(tmp_path / "store", template=None, failed=False, grid="sweep/ddpo-study",
                cells={"ddpo": (2, [0], CELLS["ddpo"][2])}, tags={"sweep.best": "true", "cell_id": "trial0"})
    time.sleep(0.01)
    write_store(tmp_path / "store", template=None, failed=False, grid="sweep/ddpo-study",
                cells={"ddpo": (2, [0], CELLS["sft"][2])},
                tags={"sweep.best": "false", "cell_id": "trial1"})  # the last trial (another config), worse
    assert tracking.list_experiments(uri) == ["stepbench/sweep/ddpo-study", "stepbench/toy"]
    default = load(uri)
    assert default.experiments == ["stepbench/toy"] and set(default.scores["method"]) == {"base"}
    both = load(uri, sweeps=True)
    sweep = both.scores[both.scores["experiment"] == "stepbench/sweep/ddpo-study"]
    best = both.runs[both.runs["tags.sweep.best"] == "true"]
    assert set(sweep["run_id"]) == set(best["run_id"]) and len(best) == 1
    assert any("1 sweep trial run(s) left out" in p for p in both.problems)
    named = load(uri, ["sweep/ddpo-study"])  # naming it is asking for it
    assert named.experiments == ["stepbench/sweep/ddpo-study"]
    titles = [g["title"] for g in build_context(named, n_boot=50, figures=False)["groups"]]
    assert titles == ["toy-turbo · trained on toy-all · tuned config (best trial) of sweep ddpo-study"]
    del store


def test_a_stand_in_report_says_it_is_not_a_result_on_every_page_and_tolerates_missing_tags(template, tmp_path):
    """Runs of bench/standin.py (tag recipe=standin) render with the note in the title, at the top of every section
    and on every PDF page; runs without a git_commit tag (issue 16.8: a TypeError before) render too."""
    uri, _ = write_store(tmp_path / "store", template=template, failed=False, tags={"recipe": "standin"},
                         drop=("git_commit",), cells={m: CELLS[m] for m in ("base", "ddpo", "inference_scaling")})
    results = load(uri)
    assert results.standin and (results.runs["git_commit"] == "").all()
    context = build_context(results, n_boot=100)
    note = "random-weight stand-in: not a result"
    assert context["title"].startswith(note)
    assert all(c["commit"] == "" for c in context["provenance"]["cells"])
    html = render_html(context)
    assert html.count(f'<p class="standin">{note}</p>') == 1 + len(context["groups"]) + 1  # header, groups, claims
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext missing: apt-get install -y poppler-utils")
    pdf = write_pdf(html, tmp_path / "report.pdf")
    pages = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                           check=True).stdout.split("\f")
    pages = [p for p in pages if p.strip()]
    assert len(pages) >= 2 and all(note.upper() in p for p in pages)
    real = build_context(load(write_store(tmp_path / "real", template=template, failed=False,
                                          cells={"base": CELLS["base"]})[0]), n_boot=100)
    assert note not in render_html(real)


def test_row_vs_paper_section_reads_the_runs_deviation_tags(grid):
    """bench.cell tags every run with its method's Deviation records; the report lists the newest run's per method."""
    import json
    import types

    import pandas as pd

    import methods
    from bench.cell import paper_tags
    from reports import render

    tags = paper_tags("sdpo_t_eq_k")
    rows = json.loads(tags["paper_deviations"])
    first = methods.method_class("sdpo_t_eq_k").deviations[0]
    assert rows[0] == [first.what, first.why, first.where] and "arXiv 2411.11727" in tags["paper"]
    old = json.dumps([["an older record", "", "x.py"]])
    runs = pd.DataFrame({"method": ["sdpo_t_eq_k", "sdpo_t_eq_k", "base"], "start_time": [1, 2, 3],
                         "tags.paper": [tags["paper"]] * 2 + ["the untrained base model"],
                         "tags.paper_deviations": [old, tags["paper_deviations"], "[]"]})
    table = render.row_vs_paper(types.SimpleNamespace(runs=runs))
    assert [r["deviation"] for r in table] == [r[0] for r in rows]
    assert {r["method"] for r in table} == {"sdpo_t_eq_k"} and table[0]["file"] == rows[0][2]
    html = render_html({**grid["context"], "deviations": table})
    assert 'id="paper"' in html and "training trajectories of T = K steps" in html
    assert "The runs carry no row-vs-paper record" in render_html({**grid["context"], "deviations": []})


def test_every_method_has_a_label_and_a_colour_and_its_runs_show_the_label(template, tmp_path):
    """Labels live once, in the method classes (bench.cell logs them as run tags); colours come from a palette by
    the registry's order. A run's own tag wins (a report of old runs keeps its labels, even of a method no longer
    registered); a run without the tag falls back to the registered class."""
    import re

    import methods
    from bench.cell import paper_tags
    from reports import plots, render

    names = methods.names()
    labels = [methods.label(m) for m in names]
    assert all(labels) and len(set(labels)) == len(names)  # a subclass must not inherit its parent's label
    colours = [plots.colour(m) for m in names]
    assert len(set(colours)) == len(names) and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)
    assert plots.colour("retired_method") == plots.colour("retired_method") in plots.PALETTE

    def method_tags(method):
        cell_id = {"cell_id": f"{method}-2-0"}  # the fixture's default cell id takes 4 letters of the name
        if method == "retired_method":
            return cell_id | {"method_label": "Retired (as logged)"}
        return cell_id | ({} if method == "pso" else paper_tags(method))  # pso: runs older than the tags

    cells = {m: (2, [0], [0.01 * i] * len(STEPS)) for i, m in enumerate([*names, "retired_method"])}
    uri, _ = write_store(tmp_path / "store", template=template, failed=False, cells=cells, method_tags=method_tags)
    results = load(uri)
    assert results.runs.set_index("method").loc["ddpo", "tags.method_label"] == "DDPO"
    html = render_html(build_context(results, n_boot=50))
    leaderboard = set(re.findall(r"<td[^>]*>([^<]*?)</td>", html))
    for method in names:
        assert render.label(method) == methods.label(method)
        assert methods.label(method).replace("&", "&amp;") in leaderboard, method
    assert render.label("retired_method") == "Retired (as logged)" and "Retired (as logged)" in leaderboard
    assert render.label("base", short=True) == "base" and render.label("sft", short=True) == "SFT"
