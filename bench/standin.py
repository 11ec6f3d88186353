"""Stand-in runs: a real grid (sdxl-turbo, sd-turbo) on the CPU with tiny random-weight models of the real classes.

    python -m bench.standin sdxl-turbo                    # build (once) and print the overrides + environment
    python -m bench.standin sdxl-turbo --write spec.json  # ... also as JSON (what `nox -s bench-sdxl-turbo -- --stand-in` reads)

What gets built under ``--root`` (default ``.stepbench-standin/``), all offline and seeded:

- ``models/<model>/``: a ``save_pretrained`` folder of ``tasks.tiny`` (StableDiffusionXLPipeline with two text
  encoders, pooled embeds and the 6 added time ids; StableDiffusionPipeline), ~1M-parameter UNet, 32x32 px.
  The grid points at it with ``model.path=...``, the override a user with local weights would give.
- ``hub/``: a private Hugging Face cache holding tiny random-weight reward models under the REAL hub ids, in
  the published checkpoint layouts: PickScore (transformers CLIPModel), HPSv2 (an OpenCLIP ViT state dict in
  ``HPS_v2_compressed.pt``, converted by tasks.rewards.hpsv2), ImageReward (BLIP ViT + med BERT +
  MLP keys in ``ImageReward.pt`` with ``med_config.json``), the LAION aesthetic MLP (``aesthetic-model.pth``,
  keys layers.0/2/4/6/7) on a CLIP "ViT-L/14", CLIP tokenizers, a BERT tokenizer. With ``HF_HUB_CACHE`` pointing
  there and ``HF_HUB_OFFLINE=1`` the reward code runs exactly its real path (hub id -> cache -> checkpoint
  conversion), which is also how the evaluation rewards (named in ``eval.rewards``, no path option) load.
- ``mlflow.db`` (+ ``mlruns/``): the stand-in's own MLflow store, so stand-in runs never mix with real ones.

The overrides shrink what makes the real grid expensive and keep its structure: every method of the grid, its
training step counts, the first training reward and seed, recipe=standin (the smoke recipe's tiny batches plus what
the real grids' recipe, paper_nfe, sets for learned rewards), tiny budgets and evaluation n, float32 on the CPU,
two joblib workers. Random weights mean the numbers are meaningless: a stand-in run checks that the SD/SDXL code
path runs end to end, not what it scores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_ROOT = Path(".stepbench-standin")
VERSION = "1"  # bump when the assets change: existing folders are rebuilt
MODELS = ("sd-turbo", "sdxl-turbo")
# A fake commit id for the private cache's refs/main (the cache layout needs one; nothing checks it).
_COMMIT = hashlib.sha1(f"stepbench-standin-v{VERSION}".encode()).hexdigest()

# Tiny sizes. Heads follow the real models where the conversion code hard-codes them (ViT-H/14: 16 vision and
# 16 text heads in tasks.rewards.hpsv2; BLIP ViT-L: 16 vision heads in tasks.rewards.imagereward).
IMAGE_SIZE, PATCH = 32, 8
CLIP_WIDTH, EMBED_DIM, CONTEXT = 32, 16, 16
BLIP_WIDTH, BERT_WIDTH, BERT_POSITIONS = 48, 32, 40
AESTHETIC_HIDDEN = (1024, 128, 64, 16)  # the published predictor's hidden sizes (input: the CLIP embed dim)


def _reward_ids() -> dict[str, str]:
    """The hub ids the real rewards load by default (read from the reward modules, so they stay in sync)."""
    from tasks.rewards import aesthetic, clipscore, hpsv2, imagereward, pickscore

    return {
        "pickscore": pickscore.MODEL_ID, "clip_h_tokenizer": pickscore.PROCESSOR_ID, "hps": hpsv2.HPS_REPO,
        "clip_l": clipscore.MODEL_ID, "aesthetic_mlp": aesthetic.MLP_REPO, "imagereward": imagereward.REPO,
        "bert_tokenizer": imagereward.TOKENIZER_ID,
    }


@dataclass
class StandIn:
    """A built stand-in for one zoo model: where things are, and how to point a grid run at them."""

    model: str
    root: Path
    model_path: Path
    hub_cache: Path
    repos: dict[str, Path] = field(default_factory=dict)
    """hub id -> snapshot folder in the private cache."""

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    def env(self) -> dict[str, str]:
        """Environment for every process of the run: the private cache, offline, one thread."""
        return {"HF_HUB_CACHE": str(self.hub_cache.resolve()), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                # the tiny tokenizers truncate real prompts at 16 tokens: diffusers would warn on every batch
                "DIFFUSERS_VERBOSITY": "error"}

    def overrides(self, grid: str | None = None, *, budget_nfe: int = 256, eval_n: int = 8, workers: int = 2) -> list[str]:
        """Hydra overrides that run grid `grid` (default: the model's name) as a stand-in.

        The sweep keeps every method and training step count of the grid file and takes its first reward and
        seed; `budget_nfe` and `eval_n` replace the papers' budgets and evaluation size (per split: val and test)."""
        params = grid_sweep(grid or self.model)
        first = {key: params[key].split(",")[0] for key in ("reward", "seed") if key in params}
        out = [
            f"model.path={self.model_path.resolve()}",
            "device=cpu", "dtype=float32", "threads=1", "progress=false",
            "recipe=standin",
            f"budget.nfe={int(budget_nfe)}", "budget.reward_calls=null",
            f"eval.n={int(eval_n)}", f"eval.val_n={int(eval_n)}", f"eval.batch_size={int(eval_n)}",
            f"eval.grid_images={min(int(eval_n), 4)}",
            f"tracking.uri={self.tracking_uri}", "tracking.system_metrics=false",
        ]
        out += [f"{key}={value}" for key, value in first.items()]
        out += _accel_overrides()
        if workers > 1:
            out += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={int(workers)}"]
        return out

    def as_dict(self, grid: str | None = None, **kwargs) -> dict:
        return {"model": self.model, "root": str(self.root.resolve()), "model_path": str(self.model_path.resolve()),
                "hub_cache": str(self.hub_cache.resolve()), "tracking_uri": self.tracking_uri,
                "overrides": self.overrides(grid, **kwargs), "env": self.env(),
                "report": ["--tracking-uri", self.tracking_uri]}


def _accel_overrides() -> list[str]:
    """CPU values for the GPU speed settings, for the keys the config schema has (see bench/accel.py)."""
    from bench.conf.schema import StepbenchConfig

    have = set(StepbenchConfig.__dataclass_fields__)
    wanted = {"precision": "fp32", "tf32": "false", "adam_8bit": "false", "offload_rewards": "false"}
    return [f"{key}={value}" for key, value in wanted.items() if key in have]


def grid_sweep(grid: str) -> dict[str, str]:
    """The `hydra.sweeper.params` of bench/conf/grid/<grid>.yaml as written (comma-separated strings)."""
    import yaml

    from bench.grid import CONF_DIR

    path = CONF_DIR / "grid" / f"{grid}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no grid file {path}")
    data = yaml.safe_load(path.read_text()) or {}
    params = ((data.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return {str(k): str(v) for k, v in params.items()}


# --------------------------------------------------------------------------------------------- builders


def _fresh(folder: Path) -> bool:
    """True if `folder` holds assets of this VERSION (then nothing is rebuilt)."""
    marker = folder / ".stepbench-standin"
    return marker.is_file() and marker.read_text().strip() == VERSION


def _mark(folder: Path) -> None:
    (folder / ".stepbench-standin").write_text(VERSION + "\n")


def build_pipeline(model: str, folder: Path) -> Path:
    """The tiny pipeline of `model`'s family (tasks.tiny) as a save_pretrained folder."""
    import tasks.models as zoo
    from tasks.tiny import BUILDERS

    spec = zoo.get(model)
    if spec.family not in BUILDERS:
        raise ValueError(f"no tiny stand-in for model {model!r} (family {spec.family!r}); "
                         f"stand-ins exist for {', '.join(MODELS)}")
    if not _fresh(folder):
        folder.mkdir(parents=True, exist_ok=True)
        BUILDERS[spec.family](folder, seed=0)
        _mark(folder)
    return folder


def snapshot_dir(hub_cache: Path, repo_id: str) -> Path:
    """`<cache>/models--org--name/snapshots/<commit>/`, with refs/main pointing at it (the HF cache layout)."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(_COMMIT)
    snapshot = repo / "snapshots" / _COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def clip_tokenizer():
    """A real CLIPTokenizer (byte-level BPE with '</w>' word ends) over letters and digits, without merges."""
    from transformers import CLIPTokenizer

    symbols = string.ascii_lowercase + string.digits
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})  # eos last, as in CLIP
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT)


def clip_model(vocab_size: int, bos: int, eos: int, seed: int):
    """A tiny transformers CLIPModel (the class PickScore and CLIP ViT-L/14 load into), logit scale 100."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CONTEXT,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=2,
                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH),
        projection_dim=EMBED_DIM, logit_scale_init_value=math.log(100.0),
    )
    return CLIPModel(config).eval()


def openclip_state_dict(vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors with OpenCLIP ViT key names and shapes (the HPSv2 checkpoint's layout), tiny widths."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    width, hidden, grid = CLIP_WIDTH, 2 * CLIP_WIDTH, IMAGE_SIZE // PATCH
    state = {
        "visual.conv1.weight": rnd(width, 3, PATCH, PATCH), "visual.class_embedding": rnd(width),
        "visual.positional_embedding": rnd(grid * grid + 1, width),
        "visual.ln_pre.weight": 1 + rnd(width), "visual.ln_pre.bias": rnd(width),
        "visual.ln_post.weight": 1 + rnd(width), "visual.ln_post.bias": rnd(width),
        "visual.proj": rnd(width, EMBED_DIM, scale=0.3),
        "token_embedding.weight": rnd(vocab_size, width, scale=0.5), "positional_embedding": rnd(CONTEXT, width),
        "ln_final.weight": 1 + rnd(width), "ln_final.bias": rnd(width),
        "text_projection": rnd(width, EMBED_DIM, scale=0.3), "logit_scale": torch.tensor(math.log(100.0)),
        "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1),
    }
    for prefix in ("visual.transformer.resblocks.", "transformer.resblocks."):
        for i in range(2):
            p = f"{prefix}{i}."
            state.update({
                p + "ln_1.weight": 1 + rnd(width), p + "ln_1.bias": rnd(width),
                p + "attn.in_proj_weight": rnd(3 * width, width, scale=0.3), p + "attn.in_proj_bias": rnd(3 * width),
                p + "attn.out_proj.weight": rnd(width, width, scale=0.3), p + "attn.out_proj.bias": rnd(width),
                p + "ln_2.weight": 1 + rnd(width), p + "ln_2.bias": rnd(width),
                p + "mlp.c_fc.weight": rnd(hidden, width, scale=0.3), p + "mlp.c_fc.bias": rnd(hidden),
                p + "mlp.c_proj.weight": rnd(width, hidden, scale=0.3), p + "mlp.c_proj.bias": rnd(width),
            })
    return state


def mlp_head_state_dict(in_features: int, seed: int) -> dict[str, torch.Tensor]:
    """The 5-Linear MLP layout of the LAION aesthetic predictor and ImageReward (keys layers.0/2/4/6/7)."""
    gen = torch.Generator().manual_seed(seed)
    dims = [in_features, *AESTHETIC_HIDDEN, 1]
    state = {}
    for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        state[f"layers.{index}.weight"] = torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in)
        state[f"layers.{index}.bias"] = torch.randn(d_out, generator=gen) * 0.1
    return state


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *string.ascii_lowercase,
              *[f"##{c}" for c in string.ascii_lowercase], *string.digits]


def bert_tokenizer():
    """A real BertTokenizer (WordPiece) over letters: words split into a letter and '##' continuations."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(BERT_WORDS)}, model_max_length=512)


def imagereward_state_dict(seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """ImageReward.pt's layout (blip.visual_encoder.* timm ViT, blip.text_encoder.* med BERT with cross-attention,
    mlp.layers.*) at tiny widths, and the med_config.json that goes beside it."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    v, t, w, h = "blip.visual_encoder.", "blip.text_encoder.", BLIP_WIDTH, BERT_WIDTH
    grid = IMAGE_SIZE // PATCH
    state = {v + "cls_token": rnd(1, 1, w), v + "pos_embed": rnd(1, grid * grid + 1, w),
             v + "patch_embed.proj.weight": rnd(w, 3, PATCH, PATCH), v + "patch_embed.proj.bias": rnd(w),
             v + "norm.weight": 1 + rnd(w), v + "norm.bias": rnd(w)}
    for i in range(2):
        p = f"{v}blocks.{i}."
        state.update({p + "norm1.weight": 1 + rnd(w), p + "norm1.bias": rnd(w),
                      p + "attn.qkv.weight": rnd(3 * w, w, scale=0.3), p + "attn.qkv.bias": rnd(3 * w),
                      p + "attn.proj.weight": rnd(w, w, scale=0.3), p + "attn.proj.bias": rnd(w),
                      p + "norm2.weight": 1 + rnd(w), p + "norm2.bias": rnd(w),
                      p + "mlp.fc1.weight": rnd(2 * w, w, scale=0.3), p + "mlp.fc1.bias": rnd(2 * w),
                      p + "mlp.fc2.weight": rnd(w, 2 * w, scale=0.3), p + "mlp.fc2.bias": rnd(w)})
    vocab = len(BERT_WORDS)
    state.update({t + "embeddings.word_embeddings.weight": rnd(vocab, h, scale=0.5),
                  t + "embeddings.position_embeddings.weight": rnd(BERT_POSITIONS, h),
                  t + "embeddings.LayerNorm.weight": 1 + rnd(h), t + "embeddings.LayerNorm.bias": rnd(h),
                  t + "embeddings.position_ids": torch.arange(BERT_POSITIONS)[None]})
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        for block, kv_width in (("attention", h), ("crossattention", w)):
            q = f"{p}{block}."
            state.update({q + "self.query.weight": rnd(h, h, scale=0.3), q + "self.query.bias": rnd(h),
                          q + "self.key.weight": rnd(h, kv_width, scale=0.3), q + "self.key.bias": rnd(h),
                          q + "self.value.weight": rnd(h, kv_width, scale=0.3), q + "self.value.bias": rnd(h),
                          q + "output.dense.weight": rnd(h, h, scale=0.3), q + "output.dense.bias": rnd(h),
                          q + "output.LayerNorm.weight": 1 + rnd(h), q + "output.LayerNorm.bias": rnd(h)})
        state.update({p + "intermediate.dense.weight": rnd(2 * h, h, scale=0.3), p + "intermediate.dense.bias": rnd(2 * h),
                      p + "output.dense.weight": rnd(h, 2 * h, scale=0.3), p + "output.dense.bias": rnd(h),
                      p + "output.LayerNorm.weight": 1 + rnd(h), p + "output.LayerNorm.bias": rnd(h)})
    # BLIP's contrastive heads are in the published file too (ImageReward does not use them).
    state.update({"blip.vision_proj.weight": rnd(8, w), "blip.vision_proj.bias": rnd(8),
                  "blip.text_proj.weight": rnd(8, h), "blip.text_proj.bias": rnd(8)})
    state.update({f"mlp.{k}": v_ for k, v_ in mlp_head_state_dict(h, seed + 1).items()})
    med_config = {"architectures": ["BertModel"], "hidden_size": h, "num_attention_heads": 4,
                  "num_hidden_layers": 2, "intermediate_size": 2 * h, "vocab_size": vocab,
                  "max_position_embeddings": BERT_POSITIONS, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
                  "add_cross_attention": True, "encoder_width": w, "pad_token_id": 0, "type_vocab_size": 2}
    return state, med_config


def build_reward_cache(hub_cache: Path) -> dict[str, Path]:
    """Tiny reward models under the real hub ids in a private HF cache; returns {hub id: snapshot folder}."""
    from transformers import BertConfig

    ids = _reward_ids()
    snapshots = {repo: snapshot_dir(hub_cache, repo) for repo in dict.fromkeys(ids.values())}
    if _fresh(hub_cache):
        return snapshots
    tokenizer = clip_tokenizer()
    vocab, bos, eos = len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id

    # PickScore_v1 and CLIP ViT-L/14: transformers CLIPModel folders (config.json + model.safetensors + tokenizer).
    for key, seed in (("pickscore", 1), ("clip_l", 2)):
        folder = snapshots[ids[key]]
        clip_model(vocab, bos, eos, seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K: the tokenizer PickScore and HPSv2 use (+ its model config, which
    # AutoTokenizer reads first).
    folder = snapshots[ids["clip_h_tokenizer"]]
    tokenizer.save_pretrained(folder)
    clip_model(vocab, bos, eos, 3).config.save_pretrained(folder)
    # xswu/HPSv2: OpenCLIP state dicts wrapped as {"state_dict": ...}, v2.0 and v2.1 files.
    from tasks.rewards.hpsv2 import HPS_FILES

    for offset, filename in enumerate(HPS_FILES.values()):
        torch.save({"state_dict": openclip_state_dict(vocab, 10 + offset), "epoch": 1},
                   snapshots[ids["hps"]] / filename)
    # trl-lib/ddpo-aesthetic-predictor: the LAION predictor MLP on the CLIP ViT-L/14 embedding.
    from tasks.rewards.aesthetic import MLP_FILE

    torch.save(mlp_head_state_dict(EMBED_DIM, 20), snapshots[ids["aesthetic_mlp"]] / MLP_FILE)
    # THUDM/ImageReward: ImageReward.pt + med_config.json; bert-base-uncased: the BERT tokenizer.
    from tasks.rewards.imagereward import CHECKPOINT, MED_CONFIG

    state, med_config = imagereward_state_dict(30)
    torch.save(state, snapshots[ids["imagereward"]] / CHECKPOINT)
    (snapshots[ids["imagereward"]] / MED_CONFIG).write_text(json.dumps(med_config, indent=2))
    folder = snapshots[ids["bert_tokenizer"]]
    bert_tokenizer().save_pretrained(folder)
    BertConfig(vocab_size=len(BERT_WORDS), hidden_size=BERT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=2 * BERT_WIDTH, max_position_embeddings=BERT_POSITIONS).save_pretrained(folder)
    _mark(hub_cache)
    return snapshots


def build(model: str, root: str | Path = DEFAULT_ROOT) -> StandIn:
    """Build (or reuse) the stand-in assets of zoo model `model` under `root`. Seconds; idempotent."""
    if model not in MODELS:
        raise ValueError(f"no stand-in for model {model!r}; available: {', '.join(MODELS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model_path = build_pipeline(model, root / "models" / model)
    hub_cache = root / "hub"
    repos = build_reward_cache(hub_cache)
    return StandIn(model=model, root=root, model_path=model_path, hub_cache=hub_cache, repos=repos)


def grid_model(grid: str) -> str:
    """The zoo model a grid file selects (`override /model: <name>` in its defaults)."""
    import yaml

    from bench.grid import CONF_DIR

    data = yaml.safe_load((CONF_DIR / "grid" / f"{grid}.yaml").read_text()) or {}
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.replace("override", "").strip().lstrip("/") == "model":
                    return str(value)
    raise ValueError(f"grid {grid!r} does not select a model (defaults: - override /model: <name>)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.standin", description=__doc__.split("\n")[0])
    parser.add_argument("grid", help="a real-model grid: " + ", ".join(MODELS))
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help=f"where to build (default {DEFAULT_ROOT})")
    parser.add_argument("--budget-nfe", type=int, default=256, help="training NFEs per cell (default 256)")
    parser.add_argument("--eval-n", type=int, default=8, help="evaluation samples per step count (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="joblib workers (default 2; 1 = in-process)")
    parser.add_argument("--write", metavar="JSON", help="also write {overrides, env, tracking_uri, ...} to this file")
    args = parser.parse_args(argv)
    try:
        standin = build(grid_model(args.grid), args.root)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    spec = standin.as_dict(args.grid, budget_nfe=args.budget_nfe, eval_n=args.eval_n, workers=args.workers)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(json.dumps(spec, indent=2) + "\n")
    env = " ".join(f"{k}={v}" for k, v in spec["env"].items())
    print(f"stand-in for {args.grid}: tiny {standin.model} pipeline in {standin.model_path}, tiny reward models in "
          f"the private HF cache {standin.hub_cache}, MLflow store {standin.tracking_uri}")
    print(f"run it:  env {env} python -m bench.run -m grid={args.grid} {' '.join(spec['overrides'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
