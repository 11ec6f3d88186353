"""Stand-in runs: a real grid (sdxl-turbo, sd-turbo, flux-schnell, sd35-large-turbo) on the CPU with tiny random-weight models of the real classes.

    python -m bench.standin sdxl-turbo                    # build (once) and print the overrides + environment
    python -m bench.standin sdxl-turbo --write spec.json  # ... also as JSON (what `nox -s bench-sdxl-turbo -- --stand-in` reads)

Built under ``--root`` (default ``.stepbench-standin/``), offline and seeded: ``models/<model>/``, a save_pretrained
folder of the tiny pipeline (tasks.tiny; tasks.tiny_flow for FLUX / SD3), which the grid loads through ``model.path``;
``hub/``, a private Hugging Face
cache of tiny reward models under the REAL hub ids in the published checkpoint layouts (PickScore, HPSv2, ImageReward,
the LAION aesthetic MLP on CLIP ViT-L/14, their tokenizers), so with ``HF_HUB_CACHE`` there and ``HF_HUB_OFFLINE=1``
the reward code runs its real path (hub id -> cache -> checkpoint conversion); ``mlflow.db``, the stand-in's own store.
The overrides keep every method and training step count of the grid with its first reward and seed, recipe=standin,
tiny budgets and evaluation n, float32 on the CPU, two joblib workers. The numbers are meaningless: a stand-in run
checks that the SD/SDXL/FLUX/SD3 code path runs end to end.
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
import transformers
import yaml
from torch import nn

import tasks.models as zoo
from bench.grid import CONF_DIR
from tasks.rewards import aesthetic, clipscore, hpsv2, imagereward, pickscore
from tasks.tiny import BUILDERS as VP_BUILDERS
from tasks.tiny_flow import BUILDERS as FLOW_BUILDERS

DEFAULT_ROOT = Path(".stepbench-standin")
BUILDERS = {**VP_BUILDERS, **FLOW_BUILDERS}
VERSION = "2"  # bump when the assets change: existing folders are rebuilt
MODELS = ("sd-turbo", "sdxl-turbo", "flux-schnell", "sd35-large-turbo")
_COMMIT = hashlib.sha1(f"stepbench-standin-v{VERSION}".encode()).hexdigest()  # the private cache's refs/main

# Tiny sizes. Heads follow the real models where the conversion code hard-codes them (ViT-H/14: 16 vision and
# 16 text heads in tasks.rewards.hpsv2; BLIP ViT-L: 16 vision heads in tasks.rewards.imagereward).
IMAGE_SIZE, PATCH = 32, 8
CLIP_WIDTH, EMBED_DIM, CONTEXT = 32, 16, 16
BLIP_WIDTH, BERT_WIDTH, BERT_POSITIONS = 48, 32, 40
AESTHETIC_HIDDEN = (1024, 128, 64, 16)  # the published predictor's hidden sizes (input: the CLIP embed dim)


@dataclass
class StandIn:
    """A built stand-in for one zoo model: where things are, and how to point a grid run at them."""

    model: str
    root: Path
    model_path: Path
    hub_cache: Path
    repos: dict[str, Path] = field(default_factory=dict)  # hub id -> snapshot folder in the private cache

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
        """Hydra overrides that run grid `grid` (default: the model's name) as a stand-in: every method and K of the
        grid file, its first reward and seed; `budget_nfe` and `eval_n` (per split) replace the papers' sizes."""
        params = ((grid_file(grid or self.model).get("hydra") or {}).get("sweeper") or {}).get("params") or {}
        first = {key: str(params[key]).split(",")[0] for key in ("reward", "seed") if key in params}
        out = [
            f"model.path={self.model_path.resolve()}",
            "device=cpu", "dtype=float32", "threads=1", "progress=false",
            "recipe=standin",
            f"budget.nfe={int(budget_nfe)}", "budget.reward_calls=null",
            f"eval.n={int(eval_n)}", f"eval.val_n={int(eval_n)}", f"eval.batch_size={int(eval_n)}",
            f"eval.grid_images={min(int(eval_n), 4)}",
            f"tracking.uri={self.tracking_uri}", "tracking.system_metrics=false",
            "precision=fp32", "tf32=false", "adam_8bit=false", "offload_rewards=false",  # bench/accel.py: CPU values
        ]
        out += [f"{key}={value}" for key, value in first.items()]
        if workers > 1:
            out += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={int(workers)}"]
        return out

    def as_dict(self, grid: str | None = None, **kwargs) -> dict:
        return {"model": self.model, "root": str(self.root.resolve()), "model_path": str(self.model_path.resolve()),
                "hub_cache": str(self.hub_cache.resolve()), "tracking_uri": self.tracking_uri,
                "overrides": self.overrides(grid, **kwargs), "env": self.env(),
                "report": ["--tracking-uri", self.tracking_uri]}


def grid_file(grid: str) -> dict:
    """bench/conf/grid/<grid>.yaml as written."""
    path = CONF_DIR / "grid" / f"{grid}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no grid file {path}")
    return yaml.safe_load(path.read_text()) or {}


def _fresh(folder: Path) -> bool:
    """True if `folder` holds assets of this VERSION (then nothing is rebuilt)."""
    marker = folder / ".stepbench-standin"
    return marker.is_file() and marker.read_text().strip() == VERSION


def _mark(folder: Path) -> None:
    (folder / ".stepbench-standin").write_text(VERSION + "\n")


def build_pipeline(model: str, folder: Path) -> Path:
    """The tiny pipeline of `model`'s family (tasks.tiny) as a save_pretrained folder."""
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
    symbols = string.ascii_lowercase + string.digits
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})  # eos last, as in CLIP
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT)


def clip_model(vocab_size: int, bos: int, eos: int, seed: int):
    """A tiny transformers CLIPModel (the class PickScore and CLIP ViT-L/14 load into), logit scale 100."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CONTEXT,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=2,
                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH),
        projection_dim=EMBED_DIM, logit_scale_init_value=math.log(100.0),
    )
    return transformers.CLIPModel(config).eval()


def _encoder_blocks(width: int, ln: tuple[str, str], attn, mlp: tuple[str, str]):
    """Two pre-norm transformer blocks named as a checkpoint names them (OpenCLIP: ln_1/attn/ln_2/mlp.c_fc/c_proj
    with nn.MultiheadAttention's in_proj; timm ViT: norm1/attn.qkv/attn.proj/norm2/mlp.fc1/fc2)."""
    return nn.ModuleList(nn.ModuleDict({ln[0]: nn.LayerNorm(width), "attn": attn(), ln[1]: nn.LayerNorm(width), "mlp":
                                        nn.ModuleDict({mlp[0]: nn.Linear(width, 2 * width),
                                                       mlp[1]: nn.Linear(2 * width, width)})}) for _ in range(2))


def openclip_state_dict(vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """An OpenCLIP ViT CLIP state dict (the HPSv2 checkpoint's layout) at tiny widths, from torch modules."""
    torch.manual_seed(seed)
    w, grid = CLIP_WIDTH, IMAGE_SIZE // PATCH

    def blocks():
        return nn.ModuleDict(dict(resblocks=_encoder_blocks(w, ("ln_1", "ln_2"), lambda: nn.MultiheadAttention(w, 4),
                                                            ("c_fc", "c_proj"))))

    model = nn.ModuleDict(dict(
        visual=nn.ModuleDict(dict(conv1=nn.Conv2d(3, w, PATCH, PATCH, bias=False), ln_pre=nn.LayerNorm(w),
                                  transformer=blocks(), ln_post=nn.LayerNorm(w))),
        token_embedding=nn.Embedding(vocab_size, w), transformer=blocks(), ln_final=nn.LayerNorm(w)))
    return model.state_dict() | {
        "visual.class_embedding": torch.randn(w) * 0.1, "visual.positional_embedding": torch.randn(grid**2 + 1, w) * 0.1,
        "visual.proj": torch.randn(w, EMBED_DIM) * 0.3, "positional_embedding": torch.randn(CONTEXT, w) * 0.1,
        "text_projection": torch.randn(w, EMBED_DIM) * 0.3, "logit_scale": torch.tensor(math.log(100.0)),
        "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)}


def mlp_head_state_dict(in_features: int, seed: int) -> dict[str, torch.Tensor]:
    """The LAION aesthetic predictor's (and ImageReward's) MLP: Linear/Dropout x3, Linear, Linear (keys
    layers.0/2/4/6/7)."""
    torch.manual_seed(seed)
    dims = [in_features, *AESTHETIC_HIDDEN, 1]
    linears = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
    return nn.ModuleDict(dict(layers=nn.Sequential(*[m for lin in linears[:3] for m in (lin, nn.Dropout())],
                                                   *linears[3:]))).state_dict()


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *string.ascii_lowercase,
              *[f"##{c}" for c in string.ascii_lowercase], *string.digits]


def bert_tokenizer():
    """A real BertTokenizer (WordPiece) over letters: words split into a letter and '##' continuations."""
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_WORDS)}, model_max_length=512)


def bert_config():
    """The tiny BERT of ImageReward's text encoder (and of the bert-base-uncased folder's config.json)."""
    return transformers.BertConfig(vocab_size=len(BERT_WORDS), hidden_size=BERT_WIDTH, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=2 * BERT_WIDTH,
                                   max_position_embeddings=BERT_POSITIONS, type_vocab_size=2)


def imagereward_state_dict(seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """ImageReward.pt's layout at tiny widths (blip.visual_encoder.*: a timm ViT; blip.text_encoder.*: BLIP's med
    BERT with cross-attention, whose keys are transformers' BlipTextModel's; mlp.*) and its med_config.json."""
    torch.manual_seed(seed)
    w, h, grid = BLIP_WIDTH, BERT_WIDTH, IMAGE_SIZE // PATCH
    vit = nn.ModuleDict(dict(patch_embed=nn.ModuleDict(dict(proj=nn.Conv2d(3, w, PATCH, PATCH))), norm=nn.LayerNorm(w),
                             blocks=_encoder_blocks(w, ("norm1", "norm2"), lambda: nn.ModuleDict(
                                 dict(qkv=nn.Linear(w, 3 * w), proj=nn.Linear(w, w))), ("fc1", "fc2"))))
    med_config = {**bert_config().to_dict(), "architectures": ["BertModel"], "add_cross_attention": True,
                  "encoder_width": w}
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings")
    text = transformers.BlipTextConfig(**{k: med_config[k] for k in sizes}, encoder_hidden_size=w, is_decoder=True)
    bert = transformers.BlipTextModel(text, add_pooling_layer=False)
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {"blip.visual_encoder.cls_token": torch.randn(1, 1, w) * 0.1,
              "blip.visual_encoder.pos_embed": torch.randn(1, grid**2 + 1, w) * 0.1}
    state |= {f"blip.text_encoder.{k}": v for k, v in bert.state_dict().items()}
    # BLIP's contrastive heads are in the published file too (ImageReward does not use them)
    state |= {"blip.vision_proj.weight": torch.randn(8, w), "blip.vision_proj.bias": torch.zeros(8),
              "blip.text_proj.weight": torch.randn(8, h), "blip.text_proj.bias": torch.zeros(8)}
    return state | {f"mlp.{k}": v for k, v in mlp_head_state_dict(h, seed + 1).items()}, med_config


def build_reward_cache(hub_cache: Path) -> dict[str, Path]:
    """Tiny reward models under the real hub ids (the reward modules' own constants) in a private HF cache; returns
    {hub id: snapshot folder}."""
    ids = [pickscore.MODEL_ID, clipscore.MODEL_ID, pickscore.PROCESSOR_ID, hpsv2.HPS_REPO, aesthetic.MLP_REPO,
           imagereward.REPO, imagereward.TOKENIZER_ID]
    snapshots = {repo: snapshot_dir(hub_cache, repo) for repo in ids}
    if _fresh(hub_cache):
        return snapshots
    tokenizer = clip_tokenizer()
    vocab, bos, eos = len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    # PickScore_v1 and CLIP ViT-L/14: transformers CLIPModel folders; the CLIP-H tokenizer PickScore and HPSv2 use
    # (+ its model config, which AutoTokenizer reads first)
    for repo, seed in ((pickscore.MODEL_ID, 1), (clipscore.MODEL_ID, 2), (pickscore.PROCESSOR_ID, 3)):
        model = clip_model(vocab, bos, eos, seed)
        (model.config if repo == pickscore.PROCESSOR_ID else model).save_pretrained(snapshots[repo])
        tokenizer.save_pretrained(snapshots[repo])
    for offset, filename in enumerate(hpsv2.HPS_FILES.values()):  # OpenCLIP state dicts, v2.0 and v2.1
        torch.save({"state_dict": openclip_state_dict(vocab, 10 + offset), "epoch": 1},
                   snapshots[hpsv2.HPS_REPO] / filename)
    torch.save(mlp_head_state_dict(EMBED_DIM, 20), snapshots[aesthetic.MLP_REPO] / aesthetic.MLP_FILE)
    state, med_config = imagereward_state_dict(30)
    torch.save(state, snapshots[imagereward.REPO] / imagereward.CHECKPOINT)
    (snapshots[imagereward.REPO] / imagereward.MED_CONFIG).write_text(json.dumps(med_config, indent=2))
    bert_tokenizer().save_pretrained(snapshots[imagereward.TOKENIZER_ID])
    bert_config().save_pretrained(snapshots[imagereward.TOKENIZER_ID])
    _mark(hub_cache)
    return snapshots


def build(model: str, root: str | Path = DEFAULT_ROOT) -> StandIn:
    """Build (or reuse) the stand-in assets of zoo model `model` under `root`. Seconds; idempotent."""
    if model not in MODELS:
        raise ValueError(f"no stand-in for model {model!r}; available: {', '.join(MODELS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return StandIn(model=model, root=root, model_path=build_pipeline(model, root / "models" / model),
                   hub_cache=root / "hub", repos=build_reward_cache(root / "hub"))


def grid_model(grid: str) -> str:
    """The zoo model a grid file selects (`override /model: <name>` in its defaults)."""
    for entry in grid_file(grid).get("defaults") or []:
        for key, value in (entry.items() if isinstance(entry, dict) else ()):
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
