"""The perf tooling itself (bench.perf_profile, bench.perf): accounting and report writing, on synthetic workloads
with a fake clock, so every number is exact. Nothing here is timed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import perf
from bench.perf_profile import FLOOR, SpanProfiler


class FakeClock:
    """Time moves only when a test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       add_attention=False)


class Tick(torch.autograd.Function):
    """Identity whose backward advances the fake clock: a loss-side op of known backward cost."""

    @staticmethod
    def forward(ctx, x, clock, seconds):
        ctx.clock, ctx.seconds = clock, seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.advance(ctx.seconds)
        return grad, None, None


def test_spans_phases_and_nesting_add_up():
    clock = FakeClock()
    prof = SpanProfiler(clock=clock, cpu_clock=clock)
    with prof.phase("train"):
        clock.advance(1.0)                      # ours, unattributed
        with prof.span("denoiser_forward"):
            clock.advance(2.0)
            with prof.span("reward"):           # nested: part of the enclosing span, not counted twice
                clock.advance(0.5)
        with prof.span("tracking"):
            clock.advance(0.25)
        with prof.phase("eval"):                # pauses "train"
            with prof.span("reward"):
                clock.advance(3.0)
            clock.advance(1.0)
        clock.advance(0.75)
    clock.advance(2.0)                          # outside any phase -> "other"
    both = prof.summary(wall=clock.now, cpu=clock.now)
    assert both["wall"] == both["cpu"]  # one fake clock drives both
    summary = both["wall"]
    train, evals, other = (summary["phases"][p] for p in ("train", "eval", "other"))
    assert train["elapsed"] == pytest.approx(4.5)
    assert train["seconds"]["denoiser_forward"] == pytest.approx(2.5)
    assert train["seconds"]["reward"] == 0.0
    assert train["floor"] == pytest.approx(2.5)
    assert train["seconds"]["tracking"] == pytest.approx(0.25)
    assert train["unattributed"] == pytest.approx(4.5 - 2.5 - 0.25)
    assert train["overhead"] == pytest.approx(2.0 / 4.5)
    assert evals["elapsed"] == pytest.approx(4.0) and evals["floor"] == pytest.approx(3.0)
    assert other["elapsed"] == pytest.approx(2.0) and other["floor"] == 0.0
    total = summary["total"]
    assert total["elapsed"] == pytest.approx(10.5)
    assert total["floor"] == pytest.approx(5.5)
    assert total["overhead"] == pytest.approx(5.0 / 10.5)
    assert sum(p["elapsed"] for p in summary["phases"].values()) == pytest.approx(total["elapsed"])
    assert total["calls"] == {"denoiser_forward": 1, "reward": 1, "tracking": 1}


def test_spans_of_other_threads_are_ignored():
    import threading

    clock = FakeClock()
    prof = SpanProfiler(clock=clock)

    def work():
        with prof.span("reward"):
            clock.advance(5.0)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert prof.summary(wall=clock.now)["wall"]["total"]["floor"] == 0.0


def test_backward_is_split_at_the_denoiser_output():
    """Loss-side backward (5 s) is ours; from the UNet output's gradient on (7 s in its parameters' grads) is the
    denoiser's; the forward's 3 s (inside a submodule) is denoiser forward; the optimizer step is unattributed."""
    clock = FakeClock()
    unet = tiny_unet()
    unet.conv_in.register_forward_hook(lambda *a: clock.advance(3.0))
    unet.conv_in.weight.register_hook(lambda g: clock.advance(7.0))  # conv_in's grad comes last: inside the UNet
    prof = SpanProfiler(clock=clock, cpu_clock=clock)
    with prof.instrument(), prof.phase("train"):
        out = unet(torch.randn(2, 3, 8, 8), torch.tensor([10, 500])).sample
        loss = Tick.apply(out, clock, 5.0).pow(2).mean()
        loss.backward()
        clock.advance(1.0)
    seconds = prof.summary()["cpu"]["phases"]["train"]["seconds"]
    assert seconds["denoiser_forward"] == pytest.approx(3.0)
    assert seconds["backward_other"] == pytest.approx(5.0)
    assert seconds["denoiser_backward"] == pytest.approx(7.0)
    assert unet.conv_in.weight.grad is not None


def test_backward_without_a_denoiser_is_all_ours_and_no_grad_forwards_leave_no_hook():
    clock = FakeClock()
    unet = tiny_unet()
    prof = SpanProfiler(clock=clock)
    with prof.instrument():
        with torch.no_grad():
            unet(torch.randn(1, 3, 8, 8), torch.tensor([10]))
        w = torch.ones(3, requires_grad=True)
        Tick.apply(w, clock, 2.0).sum().backward()
    seconds = prof.summary()["wall"]["total"]["seconds"]
    assert seconds["backward_other"] == pytest.approx(2.0)
    assert seconds["denoiser_backward"] == 0.0


def test_reward_and_text_encoder_spans_and_patches_are_undone():
    from diffusers import UNet2DModel

    from tasks.rewards.base import Reward
    from tasks.toy.pipeline import ToyTextEncoder

    clock = FakeClock()

    class SlowReward(Reward):
        name = "slow"

        def score(self, images, prompts):
            clock.advance(0.5 * len(prompts))
            return images.mean(dim=(1, 2, 3))

    forward, call, backward = UNet2DModel.forward, Reward.__call__, torch.autograd.backward
    had_call = "__call__" in vars(SlowReward)
    prof = SpanProfiler(clock=clock)
    with prof.instrument():
        assert UNet2DModel.forward is not forward and torch.autograd.backward is not backward
        values = SlowReward(batch_size=2)(torch.rand(5, 3, 4, 4), ["a"] * 5)
        ToyTextEncoder(out_dim=8).encode(["a red circle"])
    total = prof.summary()["wall"]["total"]
    assert values.shape == (5,)
    assert total["seconds"]["reward"] == pytest.approx(2.5)  # one span around the 3 chunks
    assert total["calls"]["reward"] == 1 and total["calls"]["text_encoder"] == 1
    assert UNet2DModel.forward is forward and Reward.__call__ is call and torch.autograd.backward is backward
    assert ("__call__" in vars(SlowReward)) == had_call
    assert set(FLOOR) == {"denoiser_forward", "denoiser_backward", "vae", "reward", "text_encoder",
                          "preference_model"}


def test_stats_median_min_max():
    assert perf.stats([3, 1, 2])["median"] == 2
    s = perf.stats([4.0, 1.0, 2.0, 3.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 4.0, 4)
    assert perf.stats([])["n"] == 0


def _record(method: str, train_s: float, train_floor: float, train_nfe: int, cpu_scale: float = 0.5) -> dict:
    """A synthetic `run_profiled_cell` record: train, eval (10 s, floor 9) and other (5 s, 1 s of it MLflow) phases;
    the CPU clock reads `cpu_scale` x the wall clock everywhere."""
    def block(elapsed, floor, tracking=0.0):
        seconds = dict.fromkeys(("denoiser_forward", "denoiser_backward", "vae", "reward", "text_encoder",
                                 "preference_model", "backward_other", "tracking"), 0.0)
        seconds["denoiser_forward"], seconds["tracking"] = floor, tracking
        return {"elapsed": elapsed, "seconds": seconds, "calls": {}, "floor": floor, "ours": elapsed - floor,
                "unattributed": elapsed - floor - tracking, "overhead": (elapsed - floor) / elapsed}

    def profile(f):
        phases = {"train": block(f * train_s, f * train_floor, f * 0.1), "eval": block(f * 10.0, f * 9.0),
                  "other": block(f * 5.0, 0.0, f * 1.0)}
        return {"total": block(f * (train_s + 15.0), f * (train_floor + 9.0), f * 1.1), "phases": phases}

    return {"method": method, "status": "finished", "train_steps": 4, "budget_nfe": 2000, "eval_n": 64,
            "eval_steps": [1, 2, 4, 8], "wall": train_s + 15.0, "cpu": cpu_scale * (train_s + 15.0),
            "profile": {"wall": profile(1.0), "cpu": profile(cpu_scale)},
            "train_nfe": train_nfe, "sample_nfe": train_nfe // 2, "grad_nfe": train_nfe // 2,
            "train_nfe_per_s": {"wall": train_nfe / train_s, "cpu": train_nfe / (cpu_scale * train_s)},
            "eval_nfe": 64 * 15, "peak_rss_mb": 900.0, "startup_s": {"imports": 5.0, "store": 1.0}}


def test_cell_summary_and_projection():
    runs = {"ddpo": [_record("ddpo", 20.0, 19.0, 2000), _record("ddpo", 30.0, 28.5, 2000)],
            "sft": [{"method": "sft", "status": "error"}]}
    summary = perf.summarize_cells(runs, target={"nfe": 20000, "eval_n": 512})
    ddpo = summary["ddpo"]
    wall, cpu = ddpo["wall"], ddpo["cpu"]
    assert wall["cell_s"]["median"] == pytest.approx(40.0) and cpu["cell_s"]["median"] == pytest.approx(20.0)
    assert wall["nfe_per_s"]["median"] == pytest.approx((100.0 + 2000 / 30) / 2)
    assert cpu["nfe_per_s"]["median"] == pytest.approx(2 * (100.0 + 2000 / 30) / 2)
    assert wall["train_overhead"]["min"] == pytest.approx(0.05) and wall["train_overhead"]["max"] == pytest.approx(0.05)
    assert wall["tracking_fraction"]["max"] == pytest.approx(1.1 / 35.0)
    assert cpu["overhead"]["values"] == pytest.approx(wall["overhead"]["values"])  # shares do not depend on scale
    assert ddpo["peak_rss_mb"]["median"] == 900.0
    # projection of the first record: train x10 (20k / 2k NFEs), eval x8 (512 / 64), other fixed
    elapsed = 20.0 * 10 + 10.0 * 8 + 5.0
    floor = 19.0 * 10 + 9.0 * 8
    assert wall["projected_toy_cell_s"]["min"] == pytest.approx(elapsed)
    assert cpu["projected_toy_cell_s"]["min"] == pytest.approx(elapsed / 2)
    assert wall["projected_toy_cell_overhead"]["values"][0] == pytest.approx((elapsed - floor) / elapsed)
    assert summary["sft"] == {"status": "error"}


def test_json_and_markdown_carry_every_field(tmp_path):
    cells = {"ddpo": [_record("ddpo", 20.0, 19.0, 2000)]}  # cell 35 s: floor 28 s -> 20% overhead
    row = {"model": "toy-turbo", "S": 4, "batch": 8,
           "cpu": {"pipeline_s": perf.stats([1.0, 1.2]), "sampler_s": perf.stats([1.04, 1.1]),
                   "ratio": perf.stats([1.05, 0.92])},
           "wall": {"pipeline_s": perf.stats([2.0, 2.4]), "sampler_s": perf.stats([2.1, 2.2]),
                    "ratio": perf.stats([1.2, 0.9])},
           "pipeline_outside_networks": 0.031, "sampler_outside_networks": 0.042}
    results = {
        "machine": {"cpu_model": "Test CPU", "usable_cores": 2, "memory_gb": 8.0, "torch": "2.x", "torch_threads": 1,
                    "omp_num_threads": "1", "nice": 15, "load_average_start": [1.0, 2.0, 3.0]},
        "load_average_end": [4.0, 5.0, 6.0], "targets": perf.TARGETS, "toy_model": "toy-turbo weights",
        "sampler": [row],
        "cells": {"budget": 2000, "eval_n": 64, "train_steps": 4, "model_note": "toy-turbo weights", "repeats": 1,
                  "runs": cells, "target": {"nfe": 20000, "eval_n": 512},
                  "summary": perf.summarize_cells(cells, target={"nfe": 20000, "eval_n": 512})},
        "grid": {"grid": "smoke", "workers": {"1": {"wall_s": perf.stats([100.0]), "cpu_s": perf.stats([90.0]),
                                                    "cores_used": perf.stats([0.9])},
                                              "2": {"wall_s": perf.stats([60.0]), "cpu_s": perf.stats([100.0]),
                                                    "cores_used": perf.stats([1.67])}},
                 "speedup": perf.stats([100.0 / 60.0])},
        "toy_grid": {"kind": "estimate", "cells": 34, "serial_s": 7200.0, "speedup_used": 1.67, "wall_s": 4311.0,
                     "serial_cpu_s": 3600.0, "wall_s_if_2_free_cores": 2155.0, "methods_missing": [],
                     "how": "sum of projected cells"},
        "against": {"ddpo": perf.ratio_summary(
            [_cell("finished", 200.0, 50.0, 30.0, 1000.0), _cell("finished", 180.0, 45.0, 32.0, 1010.0)],
            [_cell("finished", 100.0, 25.0, 60.0, 900.0), _cell("finished", 100.0, 30.0, 64.0, 900.0)]),
            "nft": {"status": "not a method at 7b17867"}},
        "against_run": {"rev": "7b17867", "commit": "7b17867" + "0" * 33, "ours": "a" * 40, "repeats": 2,
                        "budget": 2048, "eval_n": 32, "train_steps": 4},
    }
    md = perf.markdown(results)
    for text in ("Test CPU", "load average at start 1.00, 2.00, 3.00", "at end 4.00, 5.00, 6.00",
                 "| toy-turbo | 8 | 4 | 1.1 (1–1.2) | 1.07 (1.04–1.1) | 0.985 (0.920–1.050) | 1.050 (0.900–1.200) | "
                 "3.1% / 4.2% |",
                 "### CPU clock", "### wall clock", "a toy-grid cell (20000 NFEs, eval n=512)",
                 "| ddpo | 17.5 | 20.0% | 5.0% | 10.0% | 3.1% | 200 | 900 | 142 | 8.1% |",
                 "| ddpo | 35 | 20.0% | 5.0% | 10.0% | 3.1% | 100 | 900 | 285 | 8.1% |",
                 "| 2 | 60 | 100 | 1.67 |", "1.67x", "ESTIMATE", "72 min at this run's load, 36 min on 2 free cores",
                 "for 34 cells", "Target <= 1.10x", "Target >= 1.6x", "Target <= 5%",
                 "### Against 7b17867 (7b17867000): ours (aaaaaaaaaa) / theirs", "train NFE/s >= 1.8x",
                 "| ddpo | 1.90 (1.80–2.00) | 1.75 (1.50–2.00) | 0.50 (0.50–0.50) | 1.12 (1.11–1.12) | 1005 (1000–1010) |",
                 "| nft | not a method at 7b17867 |"):
        assert text in md, text
    out = tmp_path / "perf.json"
    out.write_text(json.dumps(results, default=str))
    back = json.loads(out.read_text())
    ddpo = back["cells"]["summary"]["ddpo"]
    assert ddpo["peak_rss_mb"]["median"] == 900.0
    for kind in ("cpu", "wall"):
        for key in ("cell_s", "floor_s", "overhead", "train_overhead", "eval_overhead", "tracking_fraction",
                    "nfe_per_s", "projected_toy_cell_s", "projected_toy_cell_overhead"):
            assert set(ddpo[kind][key]) >= {"median", "min", "max", "n"}, (kind, key)


# ------------------------------------------------------------------------------------------------------------------
# The performance fixes keep behaviour (bench/perf.py measured them; these pin that they change no number).


def test_toy_rewards_reuse_one_verifier_pass_exactly():
    from tasks import rewards
    from tasks.rewards import toy
    from tasks.toy import verify
    from tasks.toy.world import all_prompts

    torch.manual_seed(0)
    prompts = all_prompts("test")[:6]
    images = torch.rand(6, 3, 32, 32)
    images[:, :, 8:20, 8:20] = 0.9  # a square on noise
    expected = verify.score(images, prompts)
    calls = []
    original = verify.score
    verify.score = lambda *a: calls.append(1) or original(*a)
    try:
        toy._last_pass = None
        got = {name: rewards.load(f"toy-{name}")(images, prompts) for name in ("all", "mean3", "color", "shape")}
        assert len(calls) == 1  # four rewards, one verifier pass
        for name, values in got.items():
            assert torch.equal(values, expected[name])
        images[0] = 0.0  # same tensor, new content: recomputed, not served stale
        assert rewards.load("toy-count")(images, prompts)[0] == original(images[:1], prompts[:1])["count"][0]
        assert len(calls) == 2
        assert rewards.load("toy-all")(images, prompts[::-1]).shape == (6,) and len(calls) == 3  # other prompts
    finally:
        verify.score = original


def test_sdpo_scores_each_distinct_x0_prediction_once():
    from methods.sdpo import score_steps

    class Identity:  # decode = identity on (B, 3, h, w) "latents"; counts decoded rows
        decoded = 0

        def decode(self, latents):
            Identity.decoded += len(latents)
            return latents

    seen = []

    def reward(images, prompts):
        seen.append(len(images))
        return images.mean(dim=(1, 2, 3)) + torch.tensor([float(len(p)) for p in prompts])

    torch.manual_seed(0)
    x0_preds = torch.rand(4, 3, 3, 2, 2)  # (B=4, T=3, C, h, w)
    prompts = ["a", "bb", "ccc", "dddd"]
    steps = torch.tensor([[0, 0, 0, 0], [1, 0, 2, 1], [2, 2, 2, 2]])  # first / anchor / last; coincide in rows 1, 2
    got = score_steps(Identity(), reward, x0_preds, steps, prompts)
    want = torch.stack([torch.stack([x0_preds[b, steps[j, b]].mean() + len(prompts[b]) for b in range(4)])
                        for j in range(3)])
    assert torch.allclose(got, want)
    assert Identity.decoded == 10 and seen == [10]  # 12 scored slots, 10 distinct (row, step) pairs


def test_dpo_micro_batch_is_memory_only():
    import methods
    from bench import grid as grids

    assert "micro_batch" in methods.config_class("diffusion_dpo").non_semantic
    assert methods.presets("diffusion_dpo")["toy"]["micro_batch"] == 16
    a = grids.compose(["method=diffusion_dpo", "method.micro_batch=16"])
    b = grids.compose(["method=diffusion_dpo", "method.micro_batch=0"])
    assert grids.cell_id(a) == grids.cell_id(b)


# ------------------------------------------------------------------------------------------------------------------
# --against: ratio maths, perf.json layout, argument errors, and one tiny end-to-end run against HEAD itself.


def _cell(status: str, nfe_s: float, images_s: float, cell_s: float, rss: float) -> dict:
    return {"status": status, "train_nfe_s": nfe_s, "eval_images_s": images_s, "cell_s": cell_s, "peak_rss_mb": rss}


def test_ratios_pair_repeats_and_skip_failed_or_missing_values():
    ours = [_cell("finished", 200.0, 50.0, 30.0, 1000.0), _cell("error", 1.0, 1.0, 1.0, 1.0),
            _cell("finished", 300.0, 40.0, 20.0, 1100.0), _cell("finished", None, 30.0, 10.0, 800.0)]
    theirs = [_cell("finished", 100.0, 25.0, 60.0, 500.0), _cell("finished", 100.0, 25.0, 60.0, 500.0),
              _cell("finished", 100.0, 80.0, 10.0, 1100.0), _cell("finished", None, 10.0, 20.0, 400.0)]
    got = perf.ratio_summary(ours, theirs)
    assert got["pairs"] == 3  # the failed repeat drops its pair, not the run
    assert got["train_nfe_s_ratio"]["values"] == [2.0, 3.0]  # a method that does not train has no NFE/s ratio
    assert got["eval_images_s_ratio"]["values"] == [2.0, 0.5, 3.0]
    assert got["eval_images_s_ratio"]["median"] == 2.0 and got["eval_images_s_ratio"]["min"] == 0.5
    assert got["cell_s_ratio"]["values"] == pytest.approx([0.5, 2.0, 0.5])
    assert got["peak_rss_mb_ratio"]["max"] == 2.0
    assert got["ours"]["train_nfe_s"]["median"] == 250.0 and got["theirs"]["train_nfe_s"]["median"] == 100.0
    assert perf.ratio_summary([], [])["train_nfe_s_ratio"]["n"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--sections", "sampler,nope"], "unknown section(s) nope; available: sampler, cells, grid, toy_grid, against"),
    (["--sections", "against"], "section 'against' needs --against REV"),
    (["--against", "no-such-rev-xyz"], "--against 'no-such-rev-xyz' is not a commit"),
    (["--methods", "ddpo,nope"], "unknown method(s) nope; available: base, ddpo"),
    (["cell", "--methods", "ddpo,sft"], "cell runs one method"),
    (["--budget", "0"], "--budget must be >= 1, got 0"),
    (["--cell-repeats", "-1"], "--cell-repeats must be >= 1, got -1"),
])
def test_bad_arguments_fail_before_any_work(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        perf.main([*argv, "--out", str(tmp_path / "perf.json")])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "perf.json").exists()


def test_against_defaults_to_the_against_section_only():
    args = perf.parse_args(["--against", "HEAD"])
    assert args.sections == ["against"] and args.methods == perf.method_names()
    assert "against" not in perf.parse_args([]).sections


def test_readme_section_is_rewritten_between_the_markers(tmp_path):
    results = {"machine": {"cpu_model": "Test CPU", "load_average_start": [1.0]}, "load_average_end": [2.0],
               "against": {"sft": perf.ratio_summary([_cell("finished", 3.0, 2.0, 1.0, 1.0)],
                                                     [_cell("finished", 1.0, 1.0, 1.0, 1.0)])},
               "against_run": {"rev": "HEAD~1", "commit": "c" * 40, "ours": "d" * 40, "repeats": 1, "budget": 64,
                               "eval_n": 4, "train_steps": 4}}
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n{perf.PERF_BEGIN}\nold text\n{perf.PERF_END}\n\n## Next\n")
    assert perf.write_readme(results, readme)
    text = readme.read_text()
    assert "old text" not in text and "# stepbench performance" not in text
    assert "| sft | 3.00 | 2.00 | 1.00 | 1.00 | 1 |" in text and "Machine: Test CPU" in text
    assert text.endswith(f"{perf.PERF_END}\n\n## Next\n") and text.startswith(f"# x\n\n## Performance\n{perf.PERF_BEGIN}\n")
    assert not perf.write_readme(results, readme)  # unchanged the second time
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no generated performance section"):
        perf.write_readme(results, readme)


def test_readme_performance_section_is_perf_json():
    """The README's generated performance section is `python -m bench.perf readme` of the committed perf.json."""
    from pathlib import Path

    root = Path(perf.REPO)
    text = (root / "README.md").read_text()
    body = text[text.index(perf.PERF_BEGIN) + len(perf.PERF_BEGIN):text.index(perf.PERF_END)].strip()
    if not (root / "perf.json").is_file():
        assert body.startswith("Not yet generated")
        return
    assert body == perf.markdown(json.loads((root / "perf.json").read_text())).split("\n", 2)[2].strip()


@pytest.mark.slow
def test_against_head_end_to_end(tmp_path):
    """`--against HEAD` on one tiny cell: both sides run in their own process from their own tree, perf.json has
    the ratios per method with finite values, and the side worktree is gone afterwards. (A ratio near 1 is not
    asserted: this is not a speed claim.)"""
    import subprocess
    import sys

    out = tmp_path / "perf.json"
    proc = subprocess.run([sys.executable, "-m", "bench.perf", "--against", "HEAD", "--methods", "base",
                           "--eval-n", "4", "--cell-repeats", "1", "--out", str(out), "--markdown",
                           str(tmp_path / "perf.md"), "--workdir", str(tmp_path / "work")],
                          cwd=perf.REPO, capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    base, run = results["against"]["base"], results["against_run"]
    assert run["commit"] == run["ours"] or len(run["commit"]) == 40
    assert base["pairs"] == 1
    for key in ("eval_images_s_ratio", "cell_s_ratio", "peak_rss_mb_ratio"):
        assert base[key]["n"] == 1 and math.isfinite(base[key]["median"]) and base[key]["median"] > 0, key
    assert base["train_nfe_s_ratio"]["n"] == 0  # base does not train
    ours, theirs = base["runs"]["ours"][0], base["runs"]["theirs"][0]
    assert ours["bench"].startswith(str(perf.REPO)) and theirs["bench"].startswith(run["worktree"])
    assert ours["eval_images"] == theirs["eval_images"] == 4 * 4  # n x S = 1, 2, 4, 8
    assert not __import__("pathlib").Path(run["worktree"]).exists()
    listed = subprocess.run(["git", "-C", str(perf.REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert run["worktree"] not in listed
    assert "| base |" in proc.stdout  # the ratio table is printed


# ------------------------------------------------------------------------------------------------------------------
# Levers kept (issue 17): they must not change the default path's numbers, or must refuse where they cannot work.


@pytest.mark.parametrize("name, extra", [("adam", {}), ("adamw", {"weight_decay": 1e-2}), ("sgd", {"momentum": 0.9})])
def test_foreach_optimizer_is_bit_identical_to_the_per_parameter_loop(name, extra):
    from types import SimpleNamespace

    from methods.common import build_optimizer

    def trained(foreach: bool | None):
        torch.manual_seed(0)
        unet = tiny_unet()
        config = SimpleNamespace(optimizer=name, lr=3e-4, **extra)
        opt = build_optimizer(unet.parameters(), config)
        if foreach is not None:
            assert opt.defaults["foreach"] is True
            for group in opt.param_groups:
                group["foreach"] = foreach
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in unet.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in unet.parameters()]

    built, loop = trained(None), trained(False)
    assert all(torch.equal(a, b) for a, b in zip(built, loop))
    assert not torch.equal(built[0], tiny_unet().conv_in.weight)  # it trained


def test_reduced_precision_on_the_cpu_is_refused_where_the_cpu_lacks_it(monkeypatch):
    from bench import accel

    accel.check({"precision": "fp32", "device": "cpu"})  # always fine
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not accel.cpu_autocast("bf16")
    with pytest.raises(ValueError, match="precision=bf16 on the CPU needs native bf16 arithmetic"):
        accel.check({"precision": "bf16", "device": "cpu"})
    accel.check({"precision": "bf16", "device": "cuda"})  # CUDA autocast is not the CPU's business
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    accel.check({"precision": "bf16", "device": "cpu"})
