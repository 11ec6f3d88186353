"""GPU memory/speed settings (bench/accel.py) and data-parallel training of one cell with `accelerate launch`,
checked on the CPU: two processes on the gloo backend end with identical adapters although each drew its own
data, their gradients were averaged (against a hand computation), and only rank 0 logged to MLflow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from helpers import free_port

from bench import accel

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- memory / speed


@pytest.fixture(scope="module")
def tiny_sd():
    from tasks.tiny import build_tiny_sd

    return build_tiny_sd


def test_bf16_autocast_reaches_the_lora_matmuls_and_log_probs_stay_float32(tiny_sd):
    from methods import sampling
    from methods.policy import Policy
    from tasks import models as zoo

    def policy(precision):
        p = Policy(tiny_sd(), zoo.get("sd-turbo"), lora_rank=2)
        with torch.no_grad():  # non-zero adapters, so they take part in the output
            for name, param in p.unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        accel.autocast_denoiser(p, precision)
        return p

    fp32, bf16 = policy("fp32"), policy("bf16")
    seen = []
    lora_a = next(m for n, m in bf16.unet.named_modules() if n.endswith("lora_A.default"))
    lora_a.register_forward_hook(lambda mod, inputs, out: seen.append(out.dtype))
    noise = torch.randn(2, *bf16.latent_shape, generator=torch.Generator().manual_seed(0))
    traj = sampling.sample(bf16, ["a red cat", "two dogs"], 2, noise=noise, eta=1.0,
                           generator=torch.Generator().manual_seed(0))
    assert seen and set(seen) == {torch.bfloat16}
    assert traj.log_probs.dtype == torch.float32 and torch.isfinite(traj.log_probs[:, :1]).all()
    assert traj.latents.dtype == torch.float32
    # gradients reach the float32 adapters through the bf16 forward
    log_prob = sampling.transition_log_prob(bf16, traj, 0)
    log_prob.sum().backward()
    grads = [p.grad for p in bf16.trainable_parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # bf16 is close to float32 but not identical (the autocast really ran)
    x = noise[:1]
    with torch.no_grad():
        cond = fp32.encode_prompts(["a red cat"])
        out32 = fp32.predict(x, torch.tensor([999]), cond)
        out16 = bf16.predict(x, torch.tensor([999]), bf16.encode_prompts(["a red cat"]))
    assert out16.dtype == torch.float32
    assert 0 < (out16 - out32).abs().max() < 0.1 * out32.abs().max()


def test_adam_8bit_swaps_the_methods_optimizer_and_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    from bench.validate import ConfigError, check_config
    from methods.common import build_optimizer

    class AdamW8bit(torch.optim.AdamW):
        pass

    class Adam8bit(torch.optim.Adam):
        pass

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit, Adam8bit=Adam8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    params = [torch.nn.Parameter(torch.zeros(3))]
    config = types.SimpleNamespace(optimizer="adamw", lr=1e-3)
    with accel.optimizers(adam_8bit=True):
        assert type(build_optimizer(params, config)) is AdamW8bit
        assert type(build_optimizer(params, types.SimpleNamespace(optimizer="adam", lr=1e-3))) is Adam8bit
    assert type(build_optimizer(params, config)) is torch.optim.AdamW  # restored
    with accel.optimizers(adam_8bit=False):
        assert type(build_optimizer(params, config)) is torch.optim.AdamW

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(accel.MissingExtraError, match=r"pip install 'stepbench\[gpu\]'"):
        accel.bitsandbytes()
    from bench import grid as grids

    cfg = grids._plain(grids.compose(["adam_8bit=true", "method=ddpo"]))
    with pytest.raises(ConfigError, match="adam_8bit=true needs bitsandbytes"):
        check_config(cfg)
    cfg = grids._plain(grids.compose(["precision=fp8", "method=ddpo"]))
    with pytest.raises(ConfigError, match="unknown precision 'fp8'; available: fp32, bf16, fp16"):
        check_config(cfg)


def test_offloaded_reward_sits_on_the_cpu_except_while_scoring():
    class FakeReward:
        name, scale = "fake", "units"

        def __init__(self):
            self.device, self.moves, self.seen = torch.device("cpu"), [], []

        def to(self, device=None, dtype=None):
            self.device = torch.device(device)
            self.moves.append(str(self.device))
            return self

        def __call__(self, images, prompts):
            self.seen.append((str(self.device), str(images.device)))
            return torch.arange(len(prompts), dtype=torch.float32)

    reward = FakeReward()
    wrapped = accel.place_reward(reward, "meta", offload=True)
    assert isinstance(wrapped, accel.OffloadedReward) and wrapped.name == "fake" and wrapped.scale == "units"
    scores = wrapped(torch.zeros(2, 3, 4, 4), ["a", "b"])
    assert reward.seen == [("meta", "meta")] and reward.moves == ["cpu", "meta", "cpu"]
    assert reward.device == torch.device("cpu") and scores.device == torch.device("cpu")
    plain = FakeReward()
    assert accel.place_reward(plain, "cpu", offload=True) is plain  # nothing to offload on the CPU


# --------------------------------------------------------------------------------------------- data parallel


SYNC_SCRIPT = textwrap.dedent("""
    import sys, torch
    from bench import accel
    out = sys.argv[1]
    dp = accel.data_parallel()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    torch.manual_seed(100 + dp.rank)  # each rank's own data
    batches = [torch.randn(5, 4) for _ in range(2)]
    if dp.rank == 1:
        with torch.no_grad():
            model.weight.add_(1.0)  # broadcast must undo this
    params = list(model.parameters())
    with dp.training(params) as sync:
        opt = torch.optim.SGD(params, lr=0.1)
        for x in batches:  # two backward passes accumulate into one step
            (model(x) ** 2).mean().backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
    torch.save({"grads": grads, "weights": [p.detach().clone() for p in params], "syncs": sync.syncs,
                "batches": batches}, out)
""")


def test_gradient_sync_averages_every_backward_across_two_gloo_ranks(tmp_path):
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", SYNC_SCRIPT, str(tmp_path / f"rank{rank}.pt")], env=env,
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["syncs"] == ranks[1]["syncs"] == 2
    # by hand: rank 0's initial model, gradient of the sum of both backward losses, averaged over ranks
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    per_rank = []
    for r in ranks:
        model.zero_grad()
        for x in r["batches"]:
            (model(x) ** 2).mean().backward()
        per_rank.append([p.grad.clone() for p in model.parameters()])
    expected = [(a + b) / 2 for a, b in zip(*per_rank)]
    assert not torch.allclose(per_rank[0][0], per_rank[1][0])  # the ranks' own gradients differ
    for r in ranks:
        for got, want in zip(r["grads"], expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(ranks[0]["weights"], ranks[1]["weights"]):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_accelerate_launch_trains_one_smoke_cell_on_two_gloo_processes(tiny_toy, tmp_path):
    from safetensors.torch import load_file

    from bench import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()),
            "-m", "bench.run", "method=ddpo", "recipe=smoke", "train_steps=2", "budget.nfe=48", f"model.path={tiny_toy}",
            "reward=jpeg-compressibility", "eval.rewards=[]",  # a reward that varies between random-model images
            "eval.n=4", "eval.val_n=4", "eval.batch_size=4", "eval.steps=[1,2]", f"tracking.uri={uri}",
            "tracking.system_metrics=false",
            "progress=false", "with_base=false", f"hydra.run.dir={tmp_path}/outputs"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]

    lines = re.findall(r"data-parallel rank (\d)/2: training seed (\d+), (\d+) gradient all-reduces, adapters sha1 "
                       r"([0-9a-f]{40})", log)
    assert sorted(r for r, *_ in lines) == ["0", "1"], log[-4000:]
    by_rank = {r: (seed, int(syncs), digest) for r, seed, syncs, digest in lines}
    assert by_rank["0"][0] != by_rank["1"][0]  # each rank drew its own data...
    assert by_rank["0"][1] == by_rank["1"][1] > 0  # ...and averaged its gradients after every backward...
    assert by_rank["0"][2] == by_rank["1"][2]  # ...so both end with the same adapters
    assert log.count("run  ddpo/toy-turbo/jpeg-compressibility/k2/s0") == 1  # only rank 0 opened a run

    runs = tracking.load_runs(uri, "adhoc")
    assert len(runs) == 1 and runs.status.iloc[0] == "FINISHED"
    run = runs.iloc[0]
    assert run["tags.world_size"] == "2"
    assert 24 < run["metrics.cost/train_nfe"] <= 48  # both ranks' NFEs, within the cell's budget
    adapter = load_file(tracking.artifact_path(uri, run.run_id, "adapter/adapter.safetensors"))

    class Saved:
        def adapter_state_dict(self):
            return adapter

    assert accel.adapter_digest(Saved()) == by_rank["0"][2]
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained (B starts at zero)
