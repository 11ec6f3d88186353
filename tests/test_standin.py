"""Real-model grids: the plan printer, the preflight that stops a GPU grid on a CPU box in seconds, and a reduced
stand-in run of grid=sdxl-turbo (tiny StableDiffusionXLPipeline + tiny reward models of the real classes in the
real checkpoint layouts) through bench.run and the report, so the SDXL code path can never rot."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import plan as planner
from bench import standin

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdxl_standin(tmp_path_factory):
    return standin.build("sdxl-turbo", tmp_path_factory.mktemp("standin"))


@pytest.fixture
def standin_cache(sdxl_standin, monkeypatch):
    """This process reads the stand-in's private HF cache, offline (as the nox session's env does)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(sdxl_standin.hub_cache))
    for key, value in sdxl_standin.env().items():
        monkeypatch.setenv(key, value)
    return sdxl_standin


# --------------------------------------------------------------------------------------------- the plan


def test_real_grid_plan_counts_cells_nfes_and_gpu_hours():
    p = planner.plan(["grid=sdxl-turbo"], multirun=True)
    cells = p.cells
    # 4 rewards x (1 base + 1 inference scaling + 3 seeds x 14 methods x 3 K), minus online PSO, SPO, SPO-x0 and
    # GRPO at K = 1 (they train at K >= 2: "n/a"); base and inference scaling once per reward, not per seed and K
    assert len(cells) == 464 and sum(c.method == "base" for c in cells) == 4
    assert sum(c.method == "inference_scaling" for c in cells) == 4
    assert len({c.run_name for c in cells}) == 464
    assert len(p.not_applicable) == 48 and all("/k1/" in name for name in p.not_applicable)
    assert {name.split("/")[0] for name in p.not_applicable} == {"pso", "spo", "spo_reward_x0", "grpo"}
    ddpo = next(c for c in cells if c.method == "ddpo")
    # evaluation: 490 test + 320 validation samples at each S
    assert (ddpo.train_nfe, ddpo.eval_nfe) == (2_560_000, (490 + 320) * (1 + 2 + 4 + 8))
    search = next(c for c in cells if c.method == "inference_scaling")  # best-of-4: 4 x S per image, no training
    assert (search.train_nfe, search.eval_nfe) == (0, 4 * (490 + 320) * 15)
    assert {c.device for c in cells} == {"cuda"} and {c.model for c in cells} == {"sdxl-turbo"}
    # FLOPs of a K=1 DDPO cell by hand: training NFEs at 2x the UNet forward, one decode + training-reward forward
    # per K-step trajectory (half the NFEs sample), eval: NFEs, one decode per image, 5 reward forwards per image
    unet, vae, r = planner.UNET_TFLOP["sdxl-turbo"], planner.VAE_DECODE_TFLOP["sdxl-turbo"], planner.REWARD_TFLOP
    k1 = next(c for c in cells if c.method == "ddpo" and c.train_steps == 1 and c.reward == "aesthetic")
    expected = (2_560_000 * 2 * unet + 2_560_000 / 2 * (vae + r["aesthetic"]) + 810 * 15 * unet + 810 * 4 * vae
                + 810 * 4 * sum(r[n] for n in ("pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore")))
    assert k1.tflop == pytest.approx(expected, rel=1e-9)
    assert p.gpu_hours == pytest.approx(sum(c.tflop for c in cells) / (989.4 * 0.4) / 3600, rel=1e-9)
    assert 1000 < p.gpu_hours < 4000
    text = planner.format_plan(p)
    for fragment in ["464 cells (4 base + 4 inference scaling + 456 trained", "n/a: 48 more cells", "1.59 TFLOP per NFE", "989.4 TFLOP/s", "40%", "GPU-hours",
                     "2,560,000"]:
        assert fragment in text, fragment


def test_evaluation_cost_per_image_is_the_method_config_s_own():
    """Inference scaling's search cost comes from its Config (its defaults and its formula), not a copy in plan."""
    assert planner.eval_nfe_per_image({"name": "ddpo"}, 4) == (4, 1, 0)
    assert planner.eval_nfe_per_image({"name": "inference_scaling"}, 4) == (16, 4, 4)  # its default: best-of-4
    zero_order = {"name": "inference_scaling", "search": "zero_order", "zo_rounds": 2, "zo_neighbours": 3}
    assert planner.eval_nfe_per_image(zero_order, 4) == (7 * 4, 7, 7)
    paths = {"name": "inference_scaling", "search": "paths", "num_candidates": 2, "paths_branches": 3}
    assert planner.eval_nfe_per_image(paths, 4) == (2 * 4 + 2 * 2 * (4 - 2), 6, 6)  # branch step b = S // 2


def test_flop_constants_match_a_count_of_the_real_unet_config():
    counted = planner.count_flops("sd-turbo")
    assert counted["unet_params"] == 865_910_724  # SD 2.1's UNet, as published
    assert counted["unet"] == pytest.approx(planner.UNET_TFLOP["sd-turbo"], rel=2e-3)
    assert counted["vae_decode"] == pytest.approx(planner.VAE_DECODE_TFLOP["sd-turbo"], rel=2e-3)


@pytest.mark.slow
def test_real_grid_without_gpu_or_weights_stops_within_seconds(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "bench.plan", "-m", "grid=sdxl-turbo"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=300)
    elapsed = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert out.returncode == planner.NOT_READY, out.stderr
    assert "464 cells" in out.stdout and "GPU-hours" in out.stdout  # the plan comes first
    err = out.stderr
    if not torch.cuda.is_available():
        assert "CUDA: the grid runs on device=cuda" in err and "--stand-in" in err
    for fragment in ["hf download stabilityai/sdxl-turbo", "huggingface-cli download", "model.path=/path/to/sdxl-turbo",
                     "hf download yuvalkirstain/PickScore_v1", "hf download xswu/HPSv2 HPS_v2_compressed.pt",
                     "hf download THUDM/ImageReward ImageReward.pt", "hf download openai/clip-vit-large-patch14",
                     "+reward.options.path=", str(tmp_path / "empty-cache")]:
        assert fragment in err, (fragment, err)
    # ~3 s of CPU (imports, 9 config compositions, cache lookups) and ~5 s of wall time on an idle box; the CPU
    # bound is what holds on a crowded one: nothing heavy (no model) ran
    assert cpu < 30 and elapsed < 240, (cpu, elapsed)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


# --------------------------------------------------------------------------------------------- the stand-in


def test_standin_assets_are_the_real_classes_and_layouts(sdxl_standin, standin_cache):
    from diffusers import StableDiffusionXLPipeline

    from tasks import rewards

    index = json.loads((sdxl_standin.model_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_standin.model_path, local_files_only=True)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2e6
    hps = sdxl_standin.repos["xswu/HPSv2"]
    assert set(torch.load(hps / "HPS_v2_compressed.pt", weights_only=True)) == {"state_dict", "epoch"}
    ir = torch.load(sdxl_standin.repos["THUDM/ImageReward"] / "ImageReward.pt", weights_only=True)
    assert {k.split(".")[0] for k in ir} == {"blip", "mlp"} and "mlp.layers.7.weight" in ir
    mlp = torch.load(sdxl_standin.repos["trl-lib/ddpo-aesthetic-predictor"] / "aesthetic-model.pth", weights_only=True)
    assert sorted(mlp) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    # every reward loads by its real hub id from the private cache, offline, and scores
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in ("pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore"):
        scores = rewards.load(name)(images, ["a red cat", "two dogs"])
        assert scores.shape == (2,) and torch.isfinite(scores).all(), name
    # rebuilding reuses the assets (seconds, not minutes)
    before = (sdxl_standin.model_path / "unet").stat().st_mtime
    standin.build("sdxl-turbo", sdxl_standin.root)
    assert (sdxl_standin.model_path / "unet").stat().st_mtime == before


def test_standin_preflight_passes(standin_cache):
    overrides = standin_cache.overrides("sdxl-turbo", workers=1)
    p = planner.plan(["grid=sdxl-turbo", *overrides], multirun=True)
    assert planner.preflight(p) == []
    methods = {c.method for c in p.cells}
    assert methods == {"base", "ddpo", "diffusion_dpo", "diffusion_dpo_online", "pso", "pso_offline", "spo",
                       "spo_reward_x0", "sdpo", "sdpo_t_eq_k", "sharpening", "sharpening_sft", "sft", "inference_scaling",
                       "grpo", "nft"}
    assert {c.train_steps for c in p.cells if c.method not in ("base", "inference_scaling")} == {1, 2, 4}
    assert {c.device for c in p.cells} == {"cpu"} and {c.reward for c in p.cells} == {"pickscore"}


@pytest.mark.slow
def test_reduced_standin_sdxl_grid_runs_end_to_end_and_reports(standin_cache, tmp_path, monkeypatch, capsys):
    """base + DDPO (DDIM kernel) + PSO (Euler-ancestral, SDXL's own) at K=2 on the tiny SDXL pipeline, scored by the
    five tiny reward models, through bench.run in-process; the report renders from its MLflow store."""
    from bench import run as bench_run
    from bench import tracking

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [o for o in standin_cache.overrides("sdxl-turbo", budget_nfe=48, eval_n=4, workers=1)
                 if not o.startswith("tracking.uri")]
    argv = ["-m", "grid=sdxl-turbo", *overrides, f"tracking.uri={uri}", "method=base,ddpo,pso", "train_steps=2",
            "eval.steps=[1,2]", f"hydra.sweep.dir={tmp_path}/multirun"]
    bench_run.main(argv)
    assert "grid sdxl-turbo: 3 cells: 3 finished" in capsys.readouterr().out

    runs = tracking.load_runs(uri, "sdxl-turbo").set_index("method")
    assert sorted(runs.index) == ["base", "ddpo", "pso"] and set(runs.status) == {"FINISHED"}
    assert set(runs.model) == {"sdxl-turbo"} and set(runs["params.model.path"]) == {str(standin_cache.model_path.resolve())}
    p = planner.plan(["grid=sdxl-turbo", *argv[2:-1]], multirun=True)
    planned = {c.method: c for c in p.cells}
    for method, run in runs.iterrows():
        assert run["metrics.cost/eval_nfe"] == planned[method].eval_nfe == (4 + 4) * (1 + 2)  # val + test
        for reward in ("pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore"):
            for s in (1, 2):
                for split in ("val", "test"):
                    assert run[f"metrics.eval/{split}/{reward}/s{s}/n"] == 4, (method, split, reward, s)
    for method in ("ddpo", "pso"):
        assert 0 < runs.loc[method, "metrics.cost/train_nfe"] <= 48
    scores = tracking.load_scores(uri, runs.run_id.tolist())
    assert len(scores) == 3 * 2 * (4 + 4) * 5  # cells x S x (val n + test n) x rewards

    from reports.__main__ import main as report_main

    assert report_main(["--tracking-uri", uri, "--experiment", "stepbench/sdxl-turbo", "--out",
                        str(tmp_path / "report"), "--no-pdf", "--n-boot", "200"]) == 0
    html = (tmp_path / "report" / "index.html").read_text()
    assert "sdxl-turbo" in html and "pso" in html
    assert html.count("random-weight stand-in: not a result") >= 3  # title, header, every section
