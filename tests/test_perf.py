"""The perf tooling itself (bench.perf_profile, bench.perf): accounting and report writing, on synthetic workloads
with a fake clock, so every number is exact. Nothing here is timed."""

from __future__ import annotations

import json

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
        "paper": {"peak_tflops": 989.4, "utilisation": 0.4, "train_nfe_factor": 2.0, "grids": {
            "sdxl-turbo": {"model": "sdxl-turbo", "cells": 300, "gpu_hours": 1234.0,
                           "flops": {"resolution": 512, "latent": 64, "tokens": 77, "unet_params": 2_567_463_684,
                                     "unet_tflop_per_nfe": 1.59, "vae_decode_tflop": 2.5},
                           "methods": {"ddpo K=4": {"method": "ddpo", "K": 4, "cells": 12, "train_nfe": 2_560_000,
                                                    "eval_nfe": 7350, "tflop": 9.84e7,
                                                    "gpu_hours_per_cell": 5.7, "gpu_hours_all_cells": 68.4}}}}},
    }
    md = perf.markdown(results)
    for text in ("Test CPU", "load average at start 1.00, 2.00, 3.00", "at end 4.00, 5.00, 6.00",
                 "| toy-turbo | 8 | 4 | 1.1 (1–1.2) | 1.07 (1.04–1.1) | 0.985 (0.920–1.050) | 1.050 (0.900–1.200) | "
                 "3.1% / 4.2% |",
                 "### CPU clock", "### wall clock", "a toy-grid cell (20000 NFEs, eval n=512)",
                 "| ddpo | 17.5 | 20.0% | 5.0% | 10.0% | 3.1% | 200 | 900 | 142 | 8.1% |",
                 "| ddpo | 35 | 20.0% | 5.0% | 10.0% | 3.1% | 100 | 900 | 285 | 8.1% |",
                 "| 2 | 60 | 100 | 1.67 |", "1.67x", "ESTIMATE", "72 min at this run's load, 36 min on 2 free cores",
                 "for 34 cells", "2.57 B params", "1.590 TFLOP per NFE", "| ddpo | 4 | 12 | 2,560,000 | 7,350 | 5.70 | 68 |",
                 "1,234 GPU-hours", "Target <= 1.10x", "Target >= 1.6x", "Target <= 5%"):
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
