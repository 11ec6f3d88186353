"""SPO's step-aware preference model (SPM): scores a noisy state by the image it is heading to, at any timestep t
(Liang et al., arXiv 2406.04314 §3; spec dpo-spo-pso.md §3.2). One file, one job: SPO (methods/spo.py) only asks it
for scores.

Trained the paper's way (`train_spm`), once per (model, reward), and cached as a file:
    pairs (x0_w, x0_l, c)   <- a fixed preference set of clean images: initial-model samples labelled by the task reward
                               (preference_data.BaseSamplePreferences; the paper: Pick-a-Pic v1's human labels)
    t ~ U{0..999}, eps ~ N(0, I) shared by the pair; x_t^* = sqrt(abar_t) x0^* + sqrt(1 - abar_t) eps
    x0_hat^* <- the initial model's clean prediction at (x_t^*, t)       (no grad; the paper: DDIM pred_original_sample)
    loss = CE(softmax([s(x0_hat^w, t, c), s(x0_hat^l, t, c)]), (1, 0)) = softplus(s_l - s_w)      (PickScore's criterion)
Its pairwise accuracy on the pairs of held-out prompts (1 in 8 of the training prompts) is measured per timestep band
and overall; SPO refuses an SPM that is not above chance by `min_margin` (`check_accuracy`).

Two models behind one scoring call `score(x_t, x0_pred, t, cond) -> (N,)`:
- `ConvSPM`: the toy-scale network (3 conv stages over the x0-prediction latent with FiLM modulation from
  [sinusoidal(t), prompt vector], the analogue of the paper's adaLN-modulated CLIP), trained here in seconds on a CPU.
- `ReleasedSPM`: the released checkpoints (HF `SPO-Diffusion-Models/Step-Aware_Preference_Models`:
  `sd-v1-5_step-aware_preference_model.bin`, `sdxl_step-aware_preference_model.bin`), a CLIP ViT-H/14 (PickScore_v1)
  whose vision blocks carry adaLN modulation from a timestep embedder: score = logit_scale.exp() * cos(f_img(x0_hat
  decoded, t), f_txt(c)). `load_released_spm` builds transformers' CLIPModel from the PickScore config, attaches the
  modulation modules where the published state dict names them (keys under "model."), and loads it strictly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

RELEASED_FILES = {"sd15": "sd-v1-5_step-aware_preference_model.bin", "sdxl": "sdxl_step-aware_preference_model.bin"}
"""The released SPM files of the paper (one per base model); both are the same PickScore CLIP-H layout."""
RELEASED_REPO = "SPO-Diffusion-Models/Step-Aware_Preference_Models"


# ---------------------------------------------------------------------------------------------------------------
# The toy-scale SPM
# ---------------------------------------------------------------------------------------------------------------


def prompt_vectors(cond) -> torch.Tensor:
    """One vector per prompt from a policy Conditioning: SDXL's pooled embedding, else the token states mean-pooled
    (SD), else the toy encoder's vector itself: (B, D) float32, no grad."""
    tensors = cond.tensors
    if "pooled" in tensors:
        vec = tensors["pooled"]
    else:
        vec = tensors["embeds"]
        if vec.ndim == 3:
            vec = vec.mean(dim=1)
    return vec.detach().float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ConvSPM(nn.Module):
    """score(x0_pred, t, prompt) -> a logit; higher = preferred. Reads the x0-prediction only, as the paper's SPM reads
    the decoded x0-prediction (x_t is accepted by `score` and ignored). Three stride-2 3x3 conv stages, each with
    GroupNorm and a FiLM (scale, shift) from [sinusoidal(t), projected prompt vector] (zero-initialised, like the
    paper's adaLN), global average pooling and a linear head on [features, embedding]."""

    def __init__(self, latent_channels: int, prompt_dim: int, width: int = 32, embed_dim: int = 64):
        super().__init__()
        self.config = dict(latent_channels=latent_channels, prompt_dim=prompt_dim, width=width, embed_dim=embed_dim)
        self.embed_dim = embed_dim
        self.prompt_proj = nn.Linear(prompt_dim, embed_dim)
        width2 = 2 * embed_dim
        self.embed = nn.Sequential(nn.Linear(width2, width2), nn.SiLU(), nn.Linear(width2, width2))
        chans = [latent_channels, width, 2 * width, 2 * width]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1) for i in range(3))
        self.norms = nn.ModuleList(nn.GroupNorm(8, chans[i + 1]) for i in range(3))
        self.films = nn.ModuleList(nn.Linear(width2, 2 * chans[i + 1]) for i in range(3))
        for film in self.films:
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        self.head = nn.Linear(chans[-1] + width2, 1)

    def forward(self, x0_pred: torch.Tensor, t: torch.Tensor, prompt_vec: torch.Tensor) -> torch.Tensor:
        """Logits (B,) for x0_pred (B, C, h, w), integer t (B,), prompt_vec (B, D)."""
        emb = self.embed(torch.cat([timestep_embedding(t, self.embed_dim), self.prompt_proj(prompt_vec)], dim=1))
        h = x0_pred.float()
        for conv, norm, film in zip(self.convs, self.norms, self.films):
            scale, shift = film(emb).chunk(2, dim=1)
            h = nn.functional.silu(norm(conv(h)) * (1 + scale[..., None, None]) + shift[..., None, None])
        return self.head(torch.cat([h.mean(dim=(2, 3)), emb], dim=1)).squeeze(1)

    def score(self, x_t: torch.Tensor, x0_pred: torch.Tensor, t: int, cond) -> torch.Tensor:
        t_vec = torch.full((len(x0_pred),), int(t), dtype=torch.long, device=x0_pred.device)
        return self(x0_pred, t_vec, prompt_vectors(cond).to(x0_pred.device))

    def save(self, path: str | Path, info: dict[str, Any]) -> Path:
        """Write atomically (two workers may train the same cache entry): safetensors-free torch file of the config,
        weights and the training record `info` (held-out accuracy, data source)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"config": self.config, "state": self.state_dict(), "info": info}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> tuple[ConvSPM, dict[str, Any]]:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(**blob["config"])
        model.load_state_dict(blob["state"])
        return model.eval().requires_grad_(False), blob.get("info", {})


# ---------------------------------------------------------------------------------------------------------------
# Training the paper's way
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SPMSettings:
    """What an SPM is trained from and how (SPO's spm_* config fields); hashed into the cache key."""

    samples_per_prompt: int = 8
    views_per_pair: int = 4
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    width: int = 32
    flip: bool = True
    sample_steps: int = 4
    seed: int = 0


def cache_path(cache_dir: str | Path, model: str, reward: str, settings: SPMSettings) -> Path:
    """One file per (model, reward, settings): `<cache_dir>/<model>--<reward>--<hash>.pt`."""
    key = json.dumps({"model": model, "reward": reward, **settings.__dict__}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{model}--{reward}--{digest}.pt"


def _x0_predictions(policy, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """Clean-sample predictions of the initial model at the VP-form states x_t (B, C, h, w), timesteps t (B,)."""
    from methods.preference_data import _flow_s, alphas_cumprod, is_flow

    with policy.reference():
        out = policy.predict(x_t, t.to(x_t.device), cond).float()
    if is_flow(policy.scheduler):  # x0 = x_s - s v
        return x_t - _flow_s(policy.scheduler, t.to(x_t.device)) * out
    abar = alphas_cumprod(policy.scheduler, t.to(x_t.device))
    kind = policy.scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * x_t - (1 - abar).sqrt() * out
    if kind == "sample":
        return out
    raise ValueError(f"unsupported prediction_type {kind!r}; expected epsilon, v_prediction or sample")


def make_views(policy, data, rows: list[int], views_per_pair: int, generator: torch.Generator,
               batch_size: int = 128) -> dict[str, torch.Tensor]:
    """For each pair of `rows` of a preference set, `views_per_pair` (t, eps) draws: t ~ U{0..999}, eps shared by
    winner and loser; returns x0-predictions x0_w, x0_l (V, C, h, w), t (V,), prompt vectors (V, D), group (V,) =
    the pair's prompt. Costs 2 V denoiser calls."""
    from methods.preference_data import add_noise

    num_train = int(policy.scheduler.config.num_train_timesteps)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("x0_w", "x0_l", "t", "prompt")}
    prompts_all: list[str] = []
    reps = [r for r in rows for _ in range(views_per_pair)]
    for start in range(0, len(reps), batch_size):
        chunk = reps[start:start + batch_size]
        prompts, x0_w, x0_l = data.latent_batch(chunk, policy)
        t = torch.randint(0, num_train, (len(chunk),), generator=generator)
        eps = torch.randn(x0_w.shape, generator=generator).to(x0_w.device)
        tt = torch.cat([t, t]).to(x0_w.device)
        x_t = add_noise(policy.scheduler, torch.cat([x0_w, x0_l]), torch.cat([eps, eps]), tt)
        cond = policy.encode_prompts(prompts + prompts)
        with torch.no_grad():
            pred = _x0_predictions(policy, x_t, tt, cond).cpu()
        n = len(chunk)
        out["x0_w"].append(pred[:n])
        out["x0_l"].append(pred[n:])
        out["t"].append(t)
        out["prompt"].append(prompt_vectors(cond).cpu()[:n])
        prompts_all += prompts
    views = {k: torch.cat(v) for k, v in out.items()}
    order = {p: i for i, p in enumerate(dict.fromkeys(prompts_all))}
    views["group"] = torch.tensor([order[p] for p in prompts_all])
    return views


def pairwise_loss(s_w: torch.Tensor, s_l: torch.Tensor) -> torch.Tensor:
    """PickScore's criterion with label (1, 0): -log softmax([s_w, s_l])_0 = softplus(s_l - s_w), mean over pairs.
    Worked values: s_w = s_l -> ln 2 = 0.693147; s_w - s_l = 2 -> 0.126928."""
    return nn.functional.softplus(s_l - s_w).mean()


T_BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))
"""Timestep bands of the logged held-out accuracy (the paper validates at t in {0, 251, 501, 701, 951})."""


@torch.no_grad()
def pairwise_accuracy(model: ConvSPM, views: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of views with s_w > s_l (ties count 1/2), overall ("all") and per timestep band ("t0-250", ...),
    with the number of views ("n")."""
    s_w = model(views["x0_w"], views["t"], views["prompt"])
    s_l = model(views["x0_l"], views["t"], views["prompt"])
    right = (s_w > s_l).float() + 0.5 * (s_w == s_l).float()
    out = {"all": float(right.mean()) if len(right) else float("nan"), "n": float(len(right))}
    for lo, hi in T_BANDS:
        mask = (views["t"] >= lo) & (views["t"] < hi)
        if mask.any():
            out[f"t{lo}-{hi}"] = float(right[mask].mean())
    return out


def fit(views: dict[str, torch.Tensor], settings: SPMSettings, latent_channels: int,
        generator: torch.Generator) -> tuple[ConvSPM, list[float]]:
    """Train a ConvSPM on `make_views` output with the pairwise loss (Adam); (model, per-epoch mean losses)."""
    with torch.random.fork_rng(devices=[]):  # the init comes from `generator`, the global RNG is left alone
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        model = ConvSPM(latent_channels, views["prompt"].shape[1], width=settings.width)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n, history = len(views["t"]), []
    for _ in range(settings.epochs):
        order, total = torch.randperm(n, generator=generator), 0.0
        for start in range(0, n, settings.batch_size):
            idx = order[start:start + settings.batch_size]
            x_w, x_l = views["x0_w"][idx], views["x0_l"][idx]
            if settings.flip:  # the same flip for both members of a pair
                mask = (torch.rand(len(idx), generator=generator) < 0.5)[:, None, None, None]
                x_w, x_l = torch.where(mask, x_w.flip(-1), x_w), torch.where(mask, x_l.flip(-1), x_l)
            t, vec = views["t"][idx], views["prompt"][idx]
            value = pairwise_loss(model(x_w, t, vec), model(x_l, t, vec))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += float(value.detach()) * len(idx)
        history.append(total / max(n, 1))
    return model.eval().requires_grad_(False), history


def train_spm(policy, prompts: list[str], reward, settings: SPMSettings) -> tuple[ConvSPM, dict[str, Any]]:
    """The whole recipe: a base-sample preference set over `prompts` (1 prompt in 8 held out), noised views, the
    pairwise fit, held-out accuracy. Returns (model, info) with info = source, accuracies, losses and the compute
    spent (outside any cell's budget: the SPM is a reward model trained once, as the paper trains it before SPO)."""
    from methods.common import Budget
    from methods.preference_data import BaseSamplePreferences

    gen = torch.Generator().manual_seed(settings.seed)
    spent = Budget(None)
    data = BaseSamplePreferences(per_prompt=settings.samples_per_prompt, num_steps=settings.sample_steps)
    data.build(policy, prompts, reward, spent, gen)
    unique = list(dict.fromkeys(prompts))
    held = {p for i, p in enumerate(unique) if i % 8 == 7}
    rows_train = [i for i in range(len(data)) if data.prompts_of([i])[0] not in held]
    rows_val = [i for i in range(len(data)) if data.prompts_of([i])[0] in held]
    if not rows_train or not rows_val:
        raise ValueError(f"SPM: {len(rows_train)} training and {len(rows_val)} held-out pairs from {len(unique)} "
                         "prompts; need both (more prompts or samples_per_prompt)")
    train_views = make_views(policy, data, rows_train, settings.views_per_pair, gen)
    val_views = make_views(policy, data, rows_val, settings.views_per_pair, gen)
    x0_nfe = 2 * (len(train_views["t"]) + len(val_views["t"])) * int(policy.nfe_per_predict)
    model, history = fit(train_views, settings, policy.latent_shape[0], gen)
    info = {"source": data.source, "pairs_train": len(rows_train), "pairs_heldout": len(rows_val),
            "heldout_prompts": len(held), "heldout_accuracy": pairwise_accuracy(model, val_views),
            "train_accuracy": pairwise_accuracy(model, train_views), "loss_first": history[0],
            "loss_last": history[-1], "sample_nfe": spent.sample_nfe, "x0_nfe": x0_nfe,
            "reward_calls": spent.reward_calls, "settings": settings.__dict__}
    return model, info


def check_accuracy(info: dict[str, Any], min_margin: float) -> None:
    """Refuse an SPM whose held-out pairwise accuracy is not above chance (0.5) by `min_margin`: one clear line."""
    acc = info["heldout_accuracy"]["all"]
    if not acc > 0.5 + min_margin:
        raise ValueError(f"SPO refuses its SPM: held-out pairwise accuracy {acc:.3f} on "
                         f"{int(info['heldout_accuracy']['n'])} views is not above chance 0.5 by spm_min_margin="
                         f"{min_margin} (train accuracy {info['train_accuracy']['all']:.3f}; {info['source']})")


# ---------------------------------------------------------------------------------------------------------------
# The released checkpoints (PickScore CLIP-H with timestep adaLN)
# ---------------------------------------------------------------------------------------------------------------


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ReleasedSPM(nn.Module):
    """The paper's SPM around a transformers CLIPModel (`self.model`, so state-dict keys start with "model." as in
    the released .bin). Added modules, named as the published layout names them:
    - model.t_embedder.mlp = [Linear(256, H), SiLU, Linear(H, H)] on a sinusoidal embedding (dim 256) of t;
    - model.vision_model.encoder.layers[i].adaLN_modulation = [SiLU, Linear(H, 6H)] -> shift/scale/gate of the
      attention and MLP branches;
    - model.vision_model.adaLN_modulation = [SiLU, Linear(H, 2H)] -> shift/scale of the pooled output.
    With zero weights and gate biases 1 it reproduces the plain CLIP score (PickScore) exactly."""

    FREQ_DIM = 256

    def __init__(self, clip_config):
        super().__init__()
        from transformers import CLIPModel

        self.model = CLIPModel(clip_config)
        hidden = clip_config.vision_config.hidden_size
        self.model.t_embedder = nn.Module()
        self.model.t_embedder.mlp = nn.Sequential(nn.Linear(self.FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        for layer in self.model.vision_model.encoder.layers:
            layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.model.vision_model.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.reset_modulation()

    @torch.no_grad()
    def reset_modulation(self) -> None:
        """The paper's initialisation: every modulation output 0 except the two gates (1), so the model is CLIP."""
        hidden = self.model.config.vision_config.hidden_size
        for layer in self.model.vision_model.encoder.layers:
            linear = layer.adaLN_modulation[1]
            linear.weight.zero_()
            linear.bias.zero_()
            linear.bias[2 * hidden:3 * hidden] = 1.0
            linear.bias[5 * hidden:] = 1.0
        self.model.vision_model.adaLN_modulation[1].weight.zero_()
        self.model.vision_model.adaLN_modulation[1].bias.zero_()

    def image_features(self, pixel_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels (B, 3, S, S) and timesteps (B,) -> projected image features (B, P)."""
        vision = self.model.vision_model
        freq = timestep_embedding(t.float(), self.FREQ_DIM)
        time_cond = self.model.t_embedder.mlp(freq.to(pixel_values.dtype))
        h = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer in vision.encoder.layers:
            shift1, scale1, gate1, shift2, scale2, gate2 = layer.adaLN_modulation(time_cond).chunk(6, dim=1)
            attn = layer.self_attn(hidden_states=_modulate(layer.layer_norm1(h), shift1, scale1))[0]
            h = h + gate1.unsqueeze(1) * attn
            h = h + gate2.unsqueeze(1) * layer.mlp(_modulate(layer.layer_norm2(h), shift2, scale2))
        pooled = vision.post_layernorm(h[:, 0])
        shift, scale = vision.adaLN_modulation(time_cond).chunk(2, dim=1)
        return self.model.visual_projection(pooled * (1 + scale) + shift)

    def score_pixels(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """logit_scale.exp() * cos(image features at t, text features): (B,)."""
        img = self.image_features(pixel_values, t)
        txt = self.model.get_text_features(input_ids=input_ids)
        txt = getattr(txt, "pooler_output", txt)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (img * txt).sum(dim=-1)


def load_released_spm(path: str | Path, clip_config) -> ReleasedSPM:
    """A released SPM checkpoint (`RELEASED_FILES`, a torch state dict with keys "model.<CLIPModel key>" plus the
    modulation modules) into a ReleasedSPM built from `clip_config` (PickScore_v1's CLIPConfig, or a path to its
    folder). Strict: a missing or unexpected key is an error naming the first few."""
    from transformers import CLIPConfig

    if isinstance(clip_config, (str, Path)):
        clip_config = CLIPConfig.from_pretrained(str(clip_config), local_files_only=True)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released SPM checkpoint {path} does not exist; get it with `hf download "
                                f"{RELEASED_REPO} {RELEASED_FILES['sdxl']}` (or {RELEASED_FILES['sd15']})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = ReleasedSPM(clip_config)
    expected = set(model.state_dict())
    # position_ids buffers are stored by some transformers versions and not others: not weights, ignore them
    got = {k for k in state if not k.endswith("position_ids")}
    expected = {k for k in expected if not k.endswith("position_ids")}
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(f"{path} is not a released SPM of this layout: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model.eval().requires_grad_(False)
