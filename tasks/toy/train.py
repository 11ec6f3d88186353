"""The recipe that builds the toy world's two checkpoints, and the measurement printed beside them.

1. `toy-base`: v-prediction on the cosine schedule, trained on procedurally rendered images of the
   pretraining prompts, 10% caption dropout (for guidance), EMA weights kept. It is sampled without
   guidance by default (guidance above ~2 hurts this model, see `TurboRecipe.teacher_guidance`).
2. `toy-turbo`: "reflow in VP space" distillation with guidance baked in. The base samples (noise z ->
   image x0) pairs with mild guidance (1.5) and 16 DDIM steps; the student, initialised from the base, regresses
   v on the straight path between z and x0 at timesteps that are half uniform and half on the 1/2/4/8-step
   trailing grids, so that one step from pure noise already lands on a clean image.
3. `toy-flow`: the same distillation as a rectified flow (the few-step flow-matching family: FLUX.1-schnell,
   SD3.5-Turbo). The student, initialised from toy-base's weights, regresses the velocity v = z - x0 on the
   straight path x_s = (1 - s) x0 + s z between the teacher's (noise, image) pairs, at sigmas half uniform and half
   on FLUX's 1/2/4/8-step grids (linspace(1, 1/N, N)); it samples with FlowMatchEulerDiscreteScheduler.

Everything is seeded; on CPU with one thread a rebuild reproduces the shipped weights.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tasks.weights import record_checksums

from . import verify, world
from .flow_pipeline import ToyFlowPipeline, build_flow_scheduler, linear_sigmas
from .pipeline import ToyPipeline, ToyTextEncoder, build_scheduler, build_unet

WEIGHTS = Path(__file__).parent / "weights"
BASE_GUIDANCE = 1.0  # toy-base is sampled without classifier-free guidance (see TurboRecipe.teacher_guidance)


@dataclass
class BaseRecipe:
    steps: int = 1500
    """Optimizer steps (4,000 for the first, 54-prompt world; 1,500 here so that a rebuild fits in about an hour
    on two cores shared with other jobs)."""
    batch_size: int = 64
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 5%)."""
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    hard_fraction: float = 0.25
    """Share of two-object prompts in the pretraining stream."""
    channels: tuple[int, ...] = (16, 32, 64)
    bf16: bool = True
    """bfloat16 autocast for the UNet forward/backward (1.5x faster on AVX512-BF16 CPUs; weights stay fp32)."""
    seed: int = 0


@dataclass
class TurboRecipe:
    pairs: int = 1024
    """Teacher (noise, image) pairs (4,096 for the first world; 1,024 and `steps` 300 here so that the rebuild fits
    in an hour on two cores shared with other jobs)."""
    teacher_steps: int = 16
    teacher_guidance: float = 1.5
    """Classifier-free guidance of the teacher's samples, baked into the student. Measured on toy-base
    after 2,000 steps (16 DDIM steps, held-out prompts): `all` 0.76 without guidance, 0.77 at 1.5, 0.06 at
    3.0 and 0.00 at 6.0 -- strong guidance pushes this tiny v-prediction model off its image manifold."""
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 50
    ema_decay: float = 0.995
    grid_fraction: float = 0.5
    """Share of training timesteps drawn from the 1/2/4/8-step trailing grids (rest uniform)."""
    bf16: bool = True
    seed: int = 1


@dataclass
class FlowRecipe(TurboRecipe):
    """toy-flow's recipe: toy-turbo's (the same teacher pairs from toy-base, same seed, grid share of the training
    sigmas from the 1/2/4/8-step grids), with more and faster optimizer steps: toy-base's v-prediction weights must
    first learn the flow parameterisation (x_s, v = z - x0). The build took about 3 min on a quiet 2-core box."""

    steps: int = 400
    lr: float = 5e-4


@dataclass
class Recipe:
    base: BaseRecipe = field(default_factory=BaseRecipe)
    turbo: TurboRecipe = field(default_factory=TurboRecipe)
    flow: FlowRecipe = field(default_factory=FlowRecipe)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def _prompt_stream(rng: np.random.Generator, n: int, hard_fraction: float) -> list[str]:
    pretraining = world.pretraining_prompts()
    singles, pairs = [p for p in pretraining if " and " not in p], [p for p in pretraining if " and " in p]
    hard = rng.random(n) < hard_fraction
    return [pairs[rng.integers(len(pairs))] if h else singles[rng.integers(len(singles))] for h in hard]


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _pipeline(unet, encoder, scheduler) -> ToyPipeline:
    pipe = ToyPipeline(unet=copy.deepcopy(unet).eval(), text_encoder=copy.deepcopy(encoder).eval(),
                       scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_base(recipe: BaseRecipe, progress: bool = True, checkpoints: Path | None = None,
               every: int = 500) -> ToyPipeline:
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    unet = build_unet(tuple(recipe.channels))
    encoder = ToyTextEncoder(out_dim=recipe.channels[0] * 4)
    scheduler = build_scheduler()
    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup, recipe.steps))
    ema_unet, ema_encoder = copy.deepcopy(unet), copy.deepcopy(encoder)
    abar = scheduler.alphas_cumprod
    bar = tqdm(range(recipe.steps), desc="toy-base", disable=not progress)
    for step in bar:
        prompts = _prompt_stream(rng, recipe.batch_size, recipe.hard_fraction)
        x0 = torch.from_numpy(world.render_batch(prompts, rng, flip=True)) * 2 - 1
        drop = rng.random(len(prompts)) < recipe.caption_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop)]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(prompts),))
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        with _autocast(recipe.bf16):
            pred = unet(x_t, t, class_labels=encoder.encode(prompts)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_encoder, encoder, decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoints is not None and (step + 1) % every == 0:
            _pipeline(ema_unet, ema_encoder, scheduler).save_pretrained(Path(checkpoints) / f"base-{step + 1}")
    return _pipeline(ema_unet, ema_encoder, scheduler)


@torch.no_grad()
def teacher_pairs(teacher: ToyPipeline, recipe: TurboRecipe, progress: bool = True):
    """(prompts, z, x0) sampled by the teacher with guidance."""
    gen = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    prompts = _prompt_stream(rng, recipe.pairs, BaseRecipe.hard_fraction)
    zs, xs = [], []
    batch = 128
    for i in tqdm(range(0, recipe.pairs, batch), desc="teacher pairs", disable=not progress):
        z = torch.randn((min(batch, recipe.pairs - i), 3, world.SIZE, world.SIZE), generator=gen)
        with _autocast(recipe.bf16):
            img = teacher(prompts[i : i + batch], num_inference_steps=recipe.teacher_steps,
                          guidance_scale=recipe.teacher_guidance, latents=z).images
        zs.append(z)
        xs.append(img * 2 - 1)
    return prompts, torch.cat(zs), torch.cat(xs)


def train_turbo(teacher: ToyPipeline, recipe: TurboRecipe, progress: bool = True,
                checkpoints: Path | None = None, every: int = 500) -> ToyPipeline:
    prompts, z, x0 = teacher_pairs(teacher, recipe, progress)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    unet, encoder = copy.deepcopy(teacher.unet).train(), copy.deepcopy(teacher.text_encoder).train()
    scheduler = build_scheduler()
    abar = scheduler.alphas_cumprod
    grid = sorted({int(t) for n in (1, 2, 4, 8) for t in _trailing(n)})
    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup, recipe.steps))
    ema_unet, ema_encoder = copy.deepcopy(unet), copy.deepcopy(encoder)
    bar = tqdm(range(recipe.steps), desc="toy-turbo", disable=not progress)
    for step in bar:
        idx = torch.from_numpy(rng.integers(0, len(prompts), recipe.batch_size))
        flip = torch.from_numpy(rng.random(recipe.batch_size) < 0.5).view(-1, 1, 1, 1)
        zb, xb = z[idx], x0[idx]
        zb, xb = torch.where(flip, zb.flip(-1), zb), torch.where(flip, xb.flip(-1), xb)
        on_grid = torch.from_numpy(rng.random(recipe.batch_size) < recipe.grid_fraction)
        t = torch.where(on_grid, torch.tensor(grid)[torch.from_numpy(rng.integers(0, len(grid), recipe.batch_size))],
                        torch.from_numpy(rng.integers(0, 1000, recipe.batch_size)))
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * xb + (1 - a).sqrt() * zb
        target = a.sqrt() * zb - (1 - a).sqrt() * xb
        with _autocast(recipe.bf16):
            pred = unet(x_t, t, class_labels=encoder.encode([prompts[i] for i in idx.tolist()])).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema_unet, unet, min(recipe.ema_decay, (1 + step) / (10 + step)))
        _ema_update(ema_encoder, encoder, min(recipe.ema_decay, (1 + step) / (10 + step)))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoints is not None and (step + 1) % every == 0:
            _pipeline(ema_unet, ema_encoder, scheduler).save_pretrained(Path(checkpoints) / f"turbo-{step + 1}")
    return _pipeline(ema_unet, ema_encoder, scheduler)


def train_flow(teacher: ToyPipeline, recipe: FlowRecipe, progress: bool = True) -> ToyFlowPipeline:
    """Reflow into a rectified flow: v_theta(x_s, s) -> z - x0 on the teacher's pairs, from toy-base's weights."""
    prompts, z, x0 = teacher_pairs(teacher, recipe, progress)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    unet, encoder = copy.deepcopy(teacher.unet).train(), copy.deepcopy(teacher.text_encoder).train()
    grid = torch.tensor(sorted({float(s) for n in (1, 2, 4, 8) for s in linear_sigmas(n)}), dtype=torch.float32)
    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup, recipe.steps))
    ema_unet, ema_encoder = copy.deepcopy(unet), copy.deepcopy(encoder)
    for step in tqdm(range(recipe.steps), desc="toy-flow", disable=not progress):
        idx = torch.from_numpy(rng.integers(0, len(prompts), recipe.batch_size))
        flip = torch.from_numpy(rng.random(recipe.batch_size) < 0.5).view(-1, 1, 1, 1)
        zb, xb = z[idx], x0[idx]
        zb, xb = torch.where(flip, zb.flip(-1), zb), torch.where(flip, xb.flip(-1), xb)
        on_grid = torch.from_numpy(rng.random(recipe.batch_size) < recipe.grid_fraction)
        uniform = torch.from_numpy(1 - rng.random(recipe.batch_size)).float()  # (0, 1]
        s = torch.where(on_grid, grid[torch.from_numpy(rng.integers(0, len(grid), recipe.batch_size))], uniform)
        x_s = (1 - s.view(-1, 1, 1, 1)) * xb + s.view(-1, 1, 1, 1) * zb
        with _autocast(recipe.bf16):
            pred = unet(x_s, s * 1000, class_labels=encoder.encode([prompts[i] for i in idx.tolist()])).sample
        loss = torch.nn.functional.mse_loss(pred.float(), zb - xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema_unet, unet, min(recipe.ema_decay, (1 + step) / (10 + step)))
        _ema_update(ema_encoder, encoder, min(recipe.ema_decay, (1 + step) / (10 + step)))
    pipe = ToyFlowPipeline(unet=copy.deepcopy(ema_unet).eval(), text_encoder=copy.deepcopy(ema_encoder).eval(),
                           scheduler=build_flow_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _trailing(n: int) -> list[int]:
    return [int(round(t)) - 1 for t in np.arange(1000, 0, -1000 / n)]


@torch.no_grad()
def measure(pipe: ToyPipeline, steps: list[int], n: int = 1024, guidance: float = 0.0, seed: int = 0,
            prompts: list[str] | None = None, progress: bool = True) -> dict:
    """Verifier rewards at each step count over n fixed-seed samples, balanced over prompts
    (default: the single-object test prompts)."""
    prompts = prompts or world.all_prompts("test")
    table = {}
    for s in steps:
        gen = torch.Generator().manual_seed(seed)
        sums = dict.fromkeys(verify.KEYS, 0.0)
        for i in tqdm(range(0, n, 256), desc=f"measure S={s}", disable=not progress, leave=False):
            batch = [prompts[j % len(prompts)] for j in range(i, min(n, i + 256))]
            z = torch.randn((len(batch), 3, world.SIZE, world.SIZE), generator=gen)
            img = pipe(batch, num_inference_steps=s, guidance_scale=guidance, latents=z).images
            for k, v in verify.score(img, batch).items():
                sums[k] += float(v.sum())
        table[str(s)] = {k: round(v / n, 4) for k, v in sums.items()}
    return table


# measured.json key -> (prompt split, hard, share of n): `rewards` is the test split the README quotes
MEASURED_SPLITS = {"rewards": ("test", False, 1.0), "rewards_val": ("val", False, 0.5),
                   "rewards_hard": ("test", True, 0.5)}


def _measure_splits(pipe: ToyPipeline, steps: list[int], n: int, guidance: float, progress: bool,
                    test_only: list[int] = ()) -> dict:
    """Rewards per split at `steps`; `test_only` step counts (the base's 50, the expensive ones) on the test split
    alone. The test split gets n samples per step count, the others n/2 (they are not quoted)."""
    out = {"splits": {}}
    for key, (split, hard, share) in MEASURED_SPLITS.items():
        prompts = world.all_prompts(split, hard=hard)
        count = int(n * share)
        out["splits"][key] = f"toy{'-hard' if hard else ''}/{split}: {len(prompts)} prompts, n={count}"
        at = [*steps, *test_only] if key == "rewards" else steps
        out[key] = measure(pipe, at, count, guidance=guidance, prompts=prompts, progress=progress)
    return out


def build(which: str = "toy-turbo", out: Path = WEIGHTS, recipe: Recipe | None = None, n_measure: int = 1024,
          progress: bool = True, checkpoints: Path | None = None) -> dict:
    """Train `toy-base` (and `toy-turbo` or `toy-flow` from it), save them with their recipe and measured rewards.
    toy-flow starts from the toy-base weights in `out` (built first if missing)."""
    if which not in ("toy-base", "toy-turbo", "toy-flow"):
        raise ValueError(f"unknown toy model {which!r}; available: toy-base, toy-turbo, toy-flow")
    recipe = recipe or Recipe()
    report = {}
    t0 = time.time()
    base_dir = Path(out) / "toy-base"
    if which == "toy-base" or not (base_dir / "model_index.json").exists():
        base = train_base(recipe.base, progress, checkpoints)
        base.save_pretrained(base_dir)
        (base_dir / "measured.json").unlink(missing_ok=True)
        report["toy-base"] = {"seconds": round(time.time() - t0, 1)}
    else:
        base = ToyPipeline.from_pretrained(base_dir)
        base.set_progress_bar_config(disable=True)
    if not (base_dir / "measured.json").exists():
        entry = report.setdefault("toy-base", {})
        entry.update({"recipe": asdict(recipe.base), "guidance": BASE_GUIDANCE, "n": n_measure,
                      **_measure_splits(base, [1, 2, 4, 8], n_measure, BASE_GUIDANCE, progress, test_only=[50])})
        (base_dir / "measured.json").write_text(json.dumps(entry, indent=2))
    if which == "toy-turbo":
        t1 = time.time()
        turbo = train_turbo(base, recipe.turbo, progress, checkpoints)
        turbo_dir = Path(out) / "toy-turbo"
        turbo.save_pretrained(turbo_dir)
        report["toy-turbo"] = {"seconds": round(time.time() - t1, 1), "recipe": asdict(recipe.turbo),
                               "guidance": 0.0, "n": n_measure,
                               **_measure_splits(turbo, [1, 2, 4, 8], n_measure, 0.0, progress)}
        (turbo_dir / "measured.json").write_text(json.dumps(report["toy-turbo"], indent=2))
    if which == "toy-flow":
        t1 = time.time()
        flow = train_flow(base, recipe.flow, progress)
        flow_dir = Path(out) / "toy-flow"
        flow.save_pretrained(flow_dir)
        report["toy-flow"] = {"seconds": round(time.time() - t1, 1), "recipe": asdict(recipe.flow),
                              "guidance": 0.0, "n": n_measure,
                              **_measure_splits(flow, [1, 2, 4, 8], n_measure, 0.0, progress)}
        (flow_dir / "measured.json").write_text(json.dumps(report["toy-flow"], indent=2))
    for folder in (base_dir, Path(out) / "toy-turbo", Path(out) / "toy-flow"):
        if (folder / "model_index.json").is_file():
            record_checksums(folder)  # sha256 of each weight file, verified at every load (tasks.weights)
    return report
