"""The plan of a grid before anything runs: cells, NFEs, an estimate of GPU-hours, and a preflight check.

    python -m bench.plan -m grid=sdxl-turbo                 # plan + preflight (CUDA, weights); exit 3 if not ready
    python -m bench.plan -m grid=sdxl-turbo seed=0 --no-check
    python -m bench.plan --count-flops sdxl-turbo           # recount the FLOP constants below (meta device, ~10 s)

The nox sessions ``bench-sdxl-turbo`` / ``bench-sd-turbo`` run this first: it composes a handful of configs (no model
loaded, no MLflow), prints the plan, then checks that the cells' CUDA device, pipeline weights (``model.path`` or the
Hugging Face cache) and reward weights are here; anything missing is listed with the way to provide it (exit 3).

Compute estimate: training NFEs = ``budget.nfe`` (an upper bound; none for a method whose class says ``trains =
False``); evaluation NFEs = samples per S (every evaluated split) x the sum over S of the method Config's own
``eval_cost`` (S, or N*S for best-of-N search) x 2 with classifier-free guidance. FLOPs: the UNet's forward per NFE
at 512 px (64x64 latent, 77 tokens, batch 1), counted with ``torch.utils.flop_counter`` on the meta device from the
real configs (their parameter counts match the published 2,567,463,684 for SDXL and 865,910,724 for SD 2.1); a
training NFE costs TRAIN_NFE_FACTOR x that (sampling forwards 1x, forward+backward 3x). Each evaluation image adds a
VAE decode and a forward of every scoring reward model, each K-step training trajectory (~ training NFEs / 2K) a
decode and a training-reward forward. GPU-hours = FLOPs / (peak x utilisation) on an H100-class GPU (flags); text
encoders, optimizer steps and data movement are not counted. bench.perf's on-paper estimate is this plan.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from huggingface_hub import constants, snapshot_download, try_to_load_from_cache
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import methods
import tasks.models as zoo
from bench import grid as grids
from bench.validate import ConfigError, check_overrides, method_fields
from tasks.rewards import aesthetic, clipscore, hpsv2, imagereward, pickscore
from tasks.rewards.base import _looks_like_path

PEAK_TFLOPS = 989.4  # H100 SXM5, dense bf16 tensor cores (1979 TFLOP/s with 2:4 sparsity, half of it dense)
UTILISATION = 0.40   # model-FLOPs utilisation assumed for diffusion training/inference at 512 px
TRAIN_NFE_FACTOR = 2.0
# TFLOP per call at 512 px (FLUX, SD3.5: their 1024 px and transformer), counted by `count_flops` (UNet or
# transformer: one NFE, batch 1; VAE: one decode of one image).
UNET_TFLOP = {"sd-turbo": 0.804, "sdxl-turbo": 1.589, "flux-schnell": 69.47, "sd35-large-turbo": 31.12}
VAE_DECODE_TFLOP = {"sd-turbo": 2.515, "sdxl-turbo": 2.515, "flux-schnell": 10.47, "sd35-large-turbo": 10.47}
# TFLOP per scored image: CLIP ViT-H/14 (PickScore, HPSv2) 0.335 image + 0.047 text; CLIP ViT-L/14 0.162 image
# + 0.013 text (CLIPScore; the aesthetic predictor uses the image tower only); ImageReward's BLIP ViT-L/16 0.123
# + its 35-token BERT with cross-attention ~0.015. Counted the same way from the transformers configs.
REWARD_TFLOP = {"pickscore": 0.382, "hpsv2": 0.382, "clipscore": 0.175, "aesthetic": 0.162, "imagereward": 0.138}
NOT_READY = 3  # exit status when the preflight finds something missing

# The real UNet / VAE configs (diffusers UNet2DConditionModel / AutoencoderKL keyword arguments; everything not
# listed is the class default). SDXL-Turbo has SDXL's UNet, SD-Turbo SD 2.1's; both use the SD VAE layout.
REAL_UNET = {
    "sdxl-turbo": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    "sd-turbo": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024, use_linear_projection=True),
}
REAL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512)
# The rectified-flow transformers (FluxTransformer2DModel / SD3Transformer2DModel kwargs of the hub configs; 11.9B and
# 8.1B parameters) at 1024 px (a 128x128 latent, 16 channels, in their VAE), with their text tokens per prompt
# (FLUX.1-schnell: 256 T5; SD3: 77 CLIP + 256 T5). `count_flops` counts them like the UNets.
REAL_TRANSFORMER = {
    "flux-schnell": ("FluxTransformer2DModel", 256, dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))),
    "sd35-large-turbo": ("SD3Transformer2DModel", 333, dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm")),
}
FLOW_VAE = {**REAL_VAE, "latent_channels": 16, "sample_size": 1024, "use_quant_conv": False,
            "use_post_quant_conv": False}



@dataclass
class CellPlan:
    """One cell of the grid (base cells once per (model, reward, seed, eval settings))."""

    run_name: str
    method: str
    model: str
    reward: str
    train_steps: int
    seed: int
    train_nfe: int
    eval_nfe: int
    eval_images: int  # images decoded at evaluation (incl. search candidates)
    scored_images: int  # image-reward forwards at evaluation (incl. verifier calls of a search)
    tflop: float
    device: str
    cell_id: str = ""  # bench.grid.cell_id: the key of the cell's results (one planned cell per key)


@dataclass
class Plan:
    grid: str
    cells: list[CellPlan] = field(default_factory=list)
    configs: list[dict] = field(default_factory=list)  # one composed config per group of jobs (what preflight checks)
    not_applicable: list[str] = field(default_factory=list)  # run names of cells whose method cannot train at their K
    peak_tflops: float = PEAK_TFLOPS
    utilisation: float = UTILISATION

    @property
    def gpu_hours(self) -> float:
        return sum(c.tflop for c in self.cells) / (self.peak_tflops * self.utilisation) / 3600.0

    def as_dict(self) -> dict:
        return {"grid": self.grid, "cells": [asdict(c) for c in self.cells], "not_applicable": self.not_applicable,
                "gpu_hours": self.gpu_hours, "peak_tflops": self.peak_tflops, "utilisation": self.utilisation,
                "total_nfe": sum(c.train_nfe + c.eval_nfe for c in self.cells)}


def eval_nfe_per_image(method: dict, num_steps: int) -> tuple[int, int, int]:
    """(denoiser calls, decoded images, verifier calls) per evaluation image at S = num_steps, without CFG: the
    method Config's own ``eval_cost`` (inference scaling's search), else plain sampling: S calls, 1 image."""
    cost = getattr(methods.make_config(method["name"], **method_fields(method)), "eval_cost", None)
    return cost(num_steps) if cost is not None else (num_steps, 1, 0)


def cell_plan(cfg: dict, flops: dict[str, float] | None = None) -> CellPlan:
    """NFEs and TFLOPs of one composed cell config."""
    method, reward, steps = cfg["method"], cfg["reward"]["name"], cfg["eval"]["steps"]
    scale = cfg["policy"].get("guidance_scale")
    cfg_factor = 2 if float(zoo.get(cfg["model"]["name"]).guidance_scale if scale is None else scale) > 1.0 else 1
    k = grids.cell_train_steps(cfg)
    train_nfe = int(cfg["budget"]["nfe"]) if methods.trains(method["name"]) else 0
    n = sum(split_n for _, split_n, _ in grids.eval_splits(cfg))  # samples per S over every evaluated split
    calls, images, verify = (sum(c) for c in zip(*(eval_nfe_per_image(method, int(s)) for s in steps)))
    eval_nfe, eval_images, verifier_calls = n * calls * cfg_factor, n * images, n * verify
    scorers = list(dict.fromkeys([reward, *cfg["eval"]["rewards"]]))
    flops = flops or model_flops(cfg)
    unet, vae = flops["unet"], flops["vae_decode"]
    trajectories = train_nfe / (2 * max(k, 1))
    tflop = (train_nfe * TRAIN_NFE_FACTOR * unet + trajectories * (vae + REWARD_TFLOP.get(reward, 0.0))
             + eval_nfe * unet + eval_images * vae + n * len(steps) * sum(REWARD_TFLOP.get(r, 0.0) for r in scorers)
             + verifier_calls * REWARD_TFLOP.get(method.get("verifier") or reward, 0.0))
    return CellPlan(run_name=grids.cell_run_name(cfg), method=method["name"], model=cfg["model"]["name"],
                    reward=reward, train_steps=k, seed=grids.cell_seed(cfg), train_nfe=train_nfe, eval_nfe=eval_nfe,
                    eval_images=eval_images, scored_images=n * len(steps) * len(scorers) + verifier_calls,
                    tflop=tflop, device=str(cfg["device"]), cell_id=grids.cell_id(cfg))


def cell_work(cfg: dict) -> float:
    """A cell's length for scheduling (bench.schedule), in NFE-equivalents of its model: training NFEs at
    TRAIN_NFE_FACTOR plus evaluation NFEs. No FLOP count needed, so it ranks toy cells too."""
    cell = cell_plan(cfg, flops={"unet": 0.0, "vae_decode": 0.0})
    return cell.train_nfe * TRAIN_NFE_FACTOR + cell.eval_nfe


_FLOPS_CACHE: dict[tuple, dict[str, float]] = {}


def model_flops(cfg: dict) -> dict[str, float]:
    """TFLOP of one UNet NFE and one VAE decode for the cell's model: the constants for the hub weights, a meta
    count of the local folder's own configs when `model.path` is given (a stand-in is much smaller)."""
    name, path = cfg["model"]["name"], cfg["model"].get("path")
    if (name, path) not in _FLOPS_CACHE:
        if zoo.get(name).family == "toy":  # pixel-space UNet2DModel: no FLOP model here
            _FLOPS_CACHE[name, path] = {"unet": 0.0, "vae_decode": 0.0}
        elif path is not None and any((Path(path) / d / "config.json").is_file() for d in ("unet", "transformer")):
            _FLOPS_CACHE[name, path] = count_flops(Path(path))
        else:
            _FLOPS_CACHE[name, path] = {"unet": UNET_TFLOP.get(name, 0.0), "vae_decode": VAE_DECODE_TFLOP.get(name, 0.0)}
    return _FLOPS_CACHE[name, path]


def count_flops(source: str | Path) -> dict[str, float]:
    """Forward TFLOPs of the UNet (one NFE, batch 1, 77 tokens) and of one VAE decode, counted with
    torch.utils.flop_counter on the meta device (nothing is allocated). `source`: a zoo name of REAL_UNET, or a
    save_pretrained pipeline folder (its unet/ and vae/ config.json)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    if str(source) in REAL_TRANSFORMER or (Path(source) / "transformer" / "config.json").is_file():
        return count_transformer_flops(source)
    if isinstance(source, Path) or str(source) not in REAL_UNET:
        folder = Path(source)
        unet_cfg = UNet2DConditionModel.load_config(folder / "unet")
        vae_cfg = AutoencoderKL.load_config(folder / "vae") if (folder / "vae").is_dir() else None
    else:
        unet_cfg, vae_cfg = dict(REAL_UNET[str(source)]), dict(REAL_VAE)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        side = int(unet.config.sample_size)
        x = torch.zeros(1, int(unet.config.in_channels), side, side)
        text = torch.zeros(1, 77, int(unet.config.cross_attention_dim))
        added = None
        if unet.config.addition_embed_type == "text_time":
            time_dim = int(unet.config.addition_time_embed_dim)
            pooled = int(unet.config.projection_class_embeddings_input_dim) - 6 * time_dim
            added = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor([999]), encoder_hidden_states=text, added_cond_kwargs=added)
        out = {"unet": counter.get_total_flops() / 1e12, "unet_params": sum(p.numel() for p in unet.parameters()),
               "vae_decode": 0.0}
        if vae_cfg is not None:
            vae = AutoencoderKL.from_config(vae_cfg)
            with FlopCounterMode(display=False) as counter:
                vae.decode(torch.zeros(1, int(vae.config.latent_channels), side, side))
            out["vae_decode"] = counter.get_total_flops() / 1e12
    return out


def count_transformer_flops(source: str | Path) -> dict[str, float]:
    """`count_flops` for the flow transformers (FLUX: 2x2-packed latent tokens; SD3: patches), batch 1, with the
    model's text tokens (a folder: 16, the tiny tokenizers' length), and one decode of their 16-channel VAE."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if str(source) in REAL_TRANSFORMER:
        cls_name, tokens, cfg = REAL_TRANSFORMER[str(source)]
        vae_cfg = dict(FLOW_VAE)
    else:
        cfg = json.loads((Path(source) / "transformer" / "config.json").read_text())
        cls_name, tokens = cfg["_class_name"], 16
        vae_cfg = diffusers.AutoencoderKL.load_config(Path(source) / "vae")
    side = int(vae_cfg["sample_size"]) // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    with torch.device("meta"):
        model = getattr(diffusers, cls_name).from_config(cfg)
        c = model.config
        kw = dict(encoder_hidden_states=torch.zeros(1, tokens, c.joint_attention_dim), timestep=torch.ones(1),
                  pooled_projections=torch.zeros(1, c.pooled_projection_dim))
        if cls_name == "FluxTransformer2DModel":
            n = (side // 2) ** 2
            kw.update(hidden_states=torch.zeros(1, n, c.in_channels), img_ids=torch.zeros(n, 3),
                      txt_ids=torch.zeros(tokens, 3), guidance=torch.ones(1) if c.guidance_embeds else None)
        else:
            kw.update(hidden_states=torch.zeros(1, c.in_channels, side, side))
        with FlopCounterMode(display=False) as counter:
            model(**kw)
        out = {"unet": counter.get_total_flops() / 1e12, "unet_params": sum(p.numel() for p in model.parameters())}
        vae = diffusers.AutoencoderKL.from_config(vae_cfg)
        with FlopCounterMode(display=False) as counter:
            vae.decode(torch.zeros(1, int(vae.config.latent_channels), side, side))
        out["vae_decode"] = counter.get_total_flops() / 1e12
    return out


def _key(line: str) -> str:
    return line.lstrip("+~").split("=", 1)[0]


# Overrides that never change a cell's NFEs or FLOPs: jobs differing only in these share one composed config.
_NFE_NEUTRAL = ("seed", "reward", "train_steps", "tracking", "progress", "threads", "with_base")


def plan(overrides: list[str], multirun: bool = True, *, peak_tflops: float = PEAK_TFLOPS,
         utilisation: float = UTILISATION) -> Plan:
    """Compose the grid's jobs (one config per group of jobs that differ only in NFE-neutral keys) -> Plan."""
    check_overrides(overrides)
    # Base cells: the explicit base jobs plus the base of every trained job (bench.cell runs it first), once each.
    unique: dict[tuple, list[str]] = {}
    for job in grids.expand(overrides, multirun):
        is_base = "method=base" in job
        if is_base or not any(o.lower() == "with_base=false" for o in job):
            base = [o for o in job if not _key(o).startswith(("method", "train_steps", "budget"))] + ["method=base"]
            unique.setdefault(("base", *sorted(o for o in base if _key(o) != "grid")), base)
        if not is_base:
            unique.setdefault(("cell", *sorted(job)), job)
    groups: dict[tuple, dict] = {}
    result = Plan(grid=grids.grid_choice(overrides), peak_tflops=peak_tflops, utilisation=utilisation)
    planned: set[str] = set()  # cell ids: a cell shared across seeds or K (base, best-of-N) is planned once
    with contextlib.ExitStack() as stack:
        if not GlobalHydra.instance().is_initialized():  # one initialisation for every compose (~0.3 s each)
            stack.enter_context(initialize_config_dir(config_dir=str(grids.CONF_DIR), version_base="1.3"))
        for job in unique.values():
            group = tuple(sorted(o for o in job if not _key(o).startswith(_NFE_NEUTRAL)))
            if group not in groups:
                groups[group] = grids._plain(grids.compose(job))
                result.configs.append(groups[group])
            cfg = copy.deepcopy(groups[group])  # with the job's own NFE-neutral values (seed, reward name, K)
            for key, _, value in (line.lstrip("+~").partition("=") for line in job):
                if key == "seed":
                    cfg["seed"] = int(value)
                elif key == "train_steps":
                    cfg["train_steps"] = None if value == "null" else int(value)
                elif key == "reward":
                    cfg["reward"]["name"] = value  # options: the command line's (reward/<name>.yaml files have none)
            cfg = grids.canonical(cfg)
            if grids.not_applicable(cfg) is not None:
                result.not_applicable.append(grids.cell_run_name(cfg))
            elif grids.cell_id(cfg) not in planned:
                planned.add(grids.cell_id(cfg))
                result.cells.append(cell_plan(cfg))
    return result


def format_plan(p: Plan) -> str:
    cells, by_method = p.cells, {}
    for c in cells:
        by_method.setdefault(c.method, []).append(c)
    base = sum(c.method == "base" for c in cells)
    search = sum(not methods.trains(c.method) and c.method != "base" for c in cells)
    lines = [f"plan of grid {p.grid} (MLflow experiment stepbench/{p.grid}): {len(cells)} cells "
             f"({base} base + {search} inference scaling + {len(cells) - base - search} trained; the untrained "
             f"cells run once for every seed and K)"]
    if p.not_applicable:
        lines.append(f"  n/a: {len(p.not_applicable)} more cells of "
                     f"{', '.join(sorted({name.split('/')[0] for name in p.not_applicable}))} at a K their method "
                     f"cannot train at (not run, not counted), e.g. {p.not_applicable[0]}")
    if p.configs:
        cfg, rewards = p.configs[0], sorted({c.reward for c in cells})
        lines.append(f"  model {', '.join(sorted({c.model for c in cells}))}; training rewards {', '.join(rewards)}; "
                     f"K = {sorted({c.train_steps for c in cells if c.method != 'base'})}; seeds "
                     f"{sorted({c.seed for c in cells})}; device {cfg['device']}, dtype {cfg['dtype']}")
        per_split = ", ".join(f"{split} n = {n} (noise seed {seed})" for split, n, seed in grids.eval_splits(cfg))
        lines.append(f"  evaluation: S = {list(cfg['eval']['steps'])}; per S on {cfg['eval']['prompts']}: {per_split}; "
                     f"scored by {', '.join(dict.fromkeys([*rewards, *cfg['eval']['rewards']]))}")
    head = f"  {'method':<18} {'cells':>6} {'train NFE/cell':>15} {'eval NFE/cell':>14} {'total NFE':>16} {'GPU-h':>9}"
    lines += [head, "  " + "-" * (len(head) - 2)]
    hours = 1.0 / (p.peak_tflops * p.utilisation) / 3600.0
    for method, group in [*by_method.items(), ("total", cells)]:
        total = sum(c.train_nfe + c.eval_nfe for c in group)
        per_cell = (f"{max(c.train_nfe for c in group):>15,} {max(c.eval_nfe for c in group):>14,}"
                    if method != "total" else f"{'':>15} {'':>14}")
        lines.append(f"  {method:<18} {len(group):>6} {per_cell} {total:>16,} {sum(c.tflop for c in group) * hours:>9,.1f}")
    for key, cfg in {(c["model"]["name"], c["model"].get("path")): c for c in p.configs}.items():
        flops = model_flops(cfg)
        if not flops["unet"]:
            lines.append(f"  assumed throughput: none for {key[0]} (a CPU-sized model; GPU-hours are not estimated)")
            continue
        net, px = ("transformer", 1024) if key[0] in REAL_TRANSFORMER else ("UNet", 512)
        where = f" (the local folder {key[1]})" if key[1] else f" at {px} px"
        lines.append(f"  assumed throughput: the {key[0]} {net}{where} costs {flops['unet']:.3g} TFLOP per NFE (forward, "
                     f"batch 1, counted on the meta device), a VAE decode {flops['vae_decode']:.3g} TFLOP per image; "
                     f"a training NFE counts {TRAIN_NFE_FACTOR:g}x (sampling forwards 1x, forward+backward 3x); "
                     f"reward models per scored image: "
                     f"{', '.join(f'{k} {v:g}' for k, v in REWARD_TFLOP.items())} TFLOP.")
    lines.append(f"  GPU: H100-class, {p.peak_tflops:g} TFLOP/s dense bf16 peak at {p.utilisation:.0%} utilisation = "
                 f"{p.peak_tflops * p.utilisation:,.0f} TFLOP/s -> {p.gpu_hours:,.1f} GPU-hours "
                 f"(~{p.gpu_hours / 24:,.1f} GPU-days; {p.gpu_hours / 8:,.1f} h on 8 GPUs). Training NFEs are the "
                 f"budget (an upper bound).")
    return "\n".join(lines)


@dataclass
class Missing:
    """One thing a grid needs that is not on this machine."""

    what: str  # who needs it: "CUDA", "model sdxl-turbo", "reward pickscore (PickScore model)", ...
    detail: str = ""  # CUDA / local-path problems: the full message
    repo: str | None = None  # hub repository to download (absent from the cache)
    filename: str | None = None  # a single file of `repo` (None: the whole repository)
    local: str | None = None  # the config override that points at a local copy instead


def _cached_snapshot(repo: str) -> Path | None:
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return None


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json"))


def _incomplete(folder: Path) -> list[str]:
    """Components of a pipeline folder whose files are missing (an interrupted download, a partial copy)."""
    missing = []
    for component, value in json.loads((folder / "model_index.json").read_text()).items():
        if component.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        sub = folder / component
        if component in ("unet", "vae", "text_encoder", "text_encoder_2") and not (sub.is_dir() and _has_weights(sub)):
            missing.append(f"{component}/ weights")
        elif component.startswith("tokenizer") and not any((sub / f).is_file() for f in _TOKENIZER_FILES):
            missing.append(f"{component}/ files")
    return missing


def check_pipeline(model: str, path: str | None) -> Missing | None:
    """None if the pipeline's weights are here (model.path, or the Hugging Face cache)."""
    spec = zoo.get(model)
    who = f"model {model}"
    if path is not None:
        folder = Path(path)
        if not (folder / "model_index.json").is_file():
            return Missing(who, f"model.path={path} is not a diffusers save_pretrained folder (no model_index.json "
                                f"there); point it at the folder holding model_index.json, unet/, vae/, ...")
        parts = _incomplete(folder)
        return Missing(who, f"model.path={path} lacks {', '.join(parts)}") if parts else None
    if not spec.is_hub:
        return None if (Path(spec.source) / "model_index.json").is_file() else Missing(who, f"{spec.source} is missing")
    snapshot = _cached_snapshot(spec.source)
    if snapshot is None or not (snapshot / "model_index.json").is_file() or _incomplete(snapshot):
        return Missing(who, repo=spec.source, local=f"model.path=/path/to/{spec.source.split('/')[-1]}")
    return None


def _reward_needs(name: str, options: dict) -> list[tuple[str, str, str, str]]:
    """(option, default hub repo, kind, what) for each weight source a reward loads, from the reward modules' own
    constants; kind is "model" (a save_pretrained folder with weights), "tokenizer" (a folder without) or a file name
    inside the repo. [] for weight-free rewards (jpeg, toy verifiers)."""
    version = inspect.signature(hpsv2.HPSv2Reward.__init__).parameters["version"].default
    hps_file = hpsv2.HPS_FILES.get(options.get("version", version), hpsv2.HPS_FILES[version])
    return {"pickscore": [("path", pickscore.MODEL_ID, "model", "PickScore model"),
                          ("processor_path", pickscore.PROCESSOR_ID, "tokenizer", "CLIP-H tokenizer")],
            "hpsv2": [("path", hpsv2.HPS_REPO, hps_file, "HPS checkpoint"),
                      ("tokenizer_path", hpsv2.TOKENIZER_ID, "tokenizer", "OpenCLIP ViT-H-14 tokenizer")],
            "imagereward": [("path", imagereward.REPO, imagereward.CHECKPOINT, "ImageReward checkpoint"),
                            ("tokenizer_path", imagereward.TOKENIZER_ID, "tokenizer", "BERT tokenizer")],
            "aesthetic": [("clip_path", aesthetic.CLIP_ID, "model", "CLIP ViT-L/14"),
                          ("path", aesthetic.MLP_REPO, aesthetic.MLP_FILE, "aesthetic MLP")],
            "clipscore": [("path", clipscore.MODEL_ID, "model", "CLIP ViT-L/14")]}.get(name, [])


def check_reward(name: str, options: dict, *, training: bool) -> list[Missing]:
    """What reward `name` (loaded with `options`) would not find; [] when every weight file is here."""
    problems = []
    for option, repo, kind, what in _reward_needs(name, options):
        who, given = f"reward {name} ({what})", options.get(option)
        if given is not None:
            if Path(str(given)).expanduser().exists():
                continue
            if _looks_like_path(str(given)):
                problems.append(Missing(who, f"reward.options.{option}={given} does not exist"))
                continue
            repo = str(given)  # a hub id given as the option
        folder = kind in ("model", "tokenizer")
        found = _cached_snapshot(repo) if folder else try_to_load_from_cache(repo, kind)
        if kind == "model":
            ok = found is not None and (found / "config.json").is_file() and _has_weights(found)
        elif kind == "tokenizer":
            ok = found is not None and any((found / f).is_file() for f in _TOKENIZER_FILES)
        else:
            ok = isinstance(found, str) and Path(found).is_file()
        if not ok:
            local = f"+reward.options.{option}=/path/to/{repo.split('/')[-1] if folder else kind}" if training else None
            problems.append(Missing(who, repo=repo, filename=None if folder else kind, local=local))
    return problems


def check_cuda(devices: list[str], grid: str = "<grid>") -> Missing | None:
    """None if every CUDA device the cells ask for exists here."""
    wanted = [d for d in devices if str(d).startswith("cuda")]
    if not wanted:
        return None
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = (f"this torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (driver? CUDA_VISIBLE_DEVICES?)")
        return Missing("CUDA", f"the grid runs on device={wanted[0]}, but {why}. Run it on a GPU machine with a CUDA "
                               f"build of torch (nox: STEPBENCH_TORCH=\"torch --index-url "
                               f"https://download.pytorch.org/whl/cu124\"), or check the code path on this CPU with "
                               f"the tiny stand-in: nox -s bench-{grid} -- --stand-in")
    for d in wanted:
        index = d.split(":", 1)[1] if ":" in d else "0"
        if int(index) >= count:
            return Missing("CUDA", f"device={d} requested but only {count} CUDA device(s) are visible")
    return None


def preflight(p: Plan) -> list[Missing]:
    """Everything the plan's cells need that is not here (empty when the grid can start)."""
    found = [check_cuda(sorted({str(c["device"]) for c in p.configs}), p.grid)]
    found += [check_pipeline(*key) for key in dict.fromkeys((c["model"]["name"], c["model"].get("path"))
                                                              for c in p.configs)]
    wanted: dict[tuple, tuple[str, dict, bool]] = {}
    option_sets = dict.fromkeys(json.dumps(c["reward"].get("options") or {}, sort_keys=True) for c in p.configs)
    for cell in p.cells:  # training rewards, with the options the run gives them
        for text in option_sets:
            wanted.setdefault((cell.reward, text), (cell.reward, json.loads(text), True))
    for cfg in p.configs:  # evaluation rewards load without options
        for name in cfg["eval"]["rewards"]:
            if not any(key[0] == name for key in wanted):
                wanted.setdefault((name, "{}"), (name, {}, False))
    problems = [m for m in found if m is not None]
    for name, options, training in wanted.values():
        problems.extend(check_reward(name, options, training=training))
    return problems


def format_missing(grid: str, problems: list[Missing]) -> str:
    """The preflight's message: each problem, then the exact commands that provide the missing weights."""
    lines = [f"error: grid {grid} cannot start here; nothing was loaded or logged. Missing:"]
    lines += [f"  - {m.what}: {m.detail}" for m in problems if m.repo is None]
    downloads: dict[tuple, list[Missing]] = {}
    for m in problems:
        if m.repo is not None:
            downloads.setdefault((m.repo, m.filename), []).append(m)
    if downloads:
        lines.append(f"  - weights not in the Hugging Face cache ({constants.HF_HUB_CACHE}):")
        for (repo, filename), who in downloads.items():
            target = f"{repo} {filename}" if filename else repo
            lines.append(f"      {target:<58} needed by {', '.join(dict.fromkeys(m.what for m in who))}")
        lines.append("    download them once, on a machine with network access (the same HF_HOME / HF_HUB_CACHE as "
                     "the run):")
        lines += [f"      hf download {repo}" + (f" {filename}" if filename else "") for repo, filename in downloads]
        lines.append("    (huggingface_hub < 1.0: `huggingface-cli download ...` instead of `hf download ...`; run "
                     "`hf auth login` / `huggingface-cli login` first if a repository asks you to accept its licence)")
        local: dict[str, dict[str, None]] = {}
        for m in (m for ms in downloads.values() for m in ms if m.local):
            local.setdefault(m.what.split(" (")[0], {})[m.local] = None
        if local:
            lines.append("    or point the config at local copies (save_pretrained folders, checkpoint files):")
            for owner, values in local.items():
                scope = (f" (with {owner.replace('reward ', 'reward=')} as the one training reward)"
                         if owner.startswith("reward") else "")
                lines.append(f"      {owner}{scope}: {' '.join(values)}")
        lines.append("    (evaluation rewards in eval.rewards load by hub id from the cache; HF_HUB_OFFLINE=1 keeps "
                     "every process off the network)")
    lines.append("`python -m bench.plan ... --no-check` prints the plan without this check.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--multirun", action="store_true", help="plan the sweep (as bench.run -m)")
    parser.add_argument("--no-check", action="store_true", help="print the plan only, skip the preflight")
    parser.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help=f"GPU peak (default {PEAK_TFLOPS:g})")
    parser.add_argument("--utilisation", type=float, default=UTILISATION, help=f"default {UTILISATION:g}")
    parser.add_argument("--count-flops", metavar="MODEL_OR_FOLDER",
                        help="count UNet/VAE TFLOPs of a zoo model's real config or a pipeline folder, then exit")
    args, overrides = parser.parse_known_args(argv)
    if args.count_flops:
        counted = count_flops(args.count_flops if args.count_flops in REAL_UNET else Path(args.count_flops))
        print(json.dumps(counted))
        return 0
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    try:
        p = plan(overrides, args.multirun, peak_tflops=args.peak_tflops, utilisation=args.utilisation)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(format_plan(p), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(p.as_dict(), indent=1) + "\n")
    if args.no_check:
        return 0
    problems = preflight(p)
    if problems:
        print(format_missing(p.grid, problems), file=sys.stderr, flush=True)
        return NOT_READY
    print(f"preflight: ready (devices {', '.join(sorted({str(c['device']) for c in p.configs}))}; weights found)",
          flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
