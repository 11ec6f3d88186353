"""The base-model zoo: which pipelines a cell can start from, and how to load them.

Each entry says the pipeline class, the default sampling kernel, resolution, guidance, supported step counts and
where the weights come from (a hub id, or for the toy models a folder inside this package). `load_pipeline`
loads either the entry's own source or a local `save_pretrained` folder given as `path` (used offline, and for
"stand-in" runs of a real model name on a tiny pipeline from `tasks.tiny`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.registry import Registry

TOY_WEIGHTS = Path(__file__).resolve().parent / "toy" / "weights"


@dataclass(frozen=True)
class ModelSpec:
    """One base model of the zoo."""

    name: str
    """zoo name: "toy-base" | "toy-turbo" | "toy-flow" | "sd-turbo" | "sdxl-turbo" | "flux-schnell" | "sd35-large-turbo"."""
    family: str
    """"toy" | "sd" | "sdxl" | "flux" | "sd3": decides how the policy encodes prompts, conditions the denoiser and decodes."""
    source: str
    """hub id ("stabilityai/sdxl-turbo") or a local folder (the toy models' folder inside this package)."""
    pipeline_class: str
    """diffusers pipeline class name: "ToyPipeline" | "StableDiffusionPipeline" | "StableDiffusionXLPipeline"."""
    scheduler: str
    """default sampling kernel of methods.sampling: "ddim" | "euler_ancestral" | "lcm" | "flow_euler"."""
    resolution: int
    """image side in pixels of the real weights (a tiny stand-in pipeline has its own, smaller size)."""
    guidance_scale: float
    """classifier-free guidance scale used by default (<= 1 means no CFG, one denoiser call per step)."""
    step_counts: tuple[int, ...]
    """sampling step counts the model is meant for (evaluation default)."""
    default_train_steps: int
    """training step count K when a cell does not set one."""
    native_scheduler: str = ""
    """the scheduler class the weights ship with (may differ from the kernel, e.g. sd-turbo: Euler vs "ddim")."""

    @property
    def is_hub(self) -> bool:
        """True when `source` is a hub id rather than a folder of this package."""
        return self.family != "toy"


_SPECS = Registry("model")
for _spec in (
    ModelSpec(
        name="toy-base",
        family="toy",
        source=str(TOY_WEIGHTS / "toy-base"),
        pipeline_class="ToyPipeline",
        scheduler="ddim",
        resolution=32,
        guidance_scale=1.0,
        step_counts=(1, 2, 3, 4, 6, 8, 16, 50),
        default_train_steps=4,
        native_scheduler="DDIMScheduler",
    ),
    ModelSpec(
        name="toy-turbo",
        family="toy",
        source=str(TOY_WEIGHTS / "toy-turbo"),
        pipeline_class="ToyPipeline",
        scheduler="ddim",
        resolution=32,
        guidance_scale=0.0,
        step_counts=(1, 2, 3, 4, 6, 8),
        default_train_steps=4,
        native_scheduler="DDIMScheduler",
    ),
    # The toy world's rectified flow (velocity UNet, FlowMatchEulerDiscreteScheduler on FLUX's linear grid), reflowed
    # from toy-base to few steps: every method on a flow model on a 2-core CPU.
    ModelSpec(
        name="toy-flow",
        family="toy",
        source=str(TOY_WEIGHTS / "toy-flow"),
        pipeline_class="ToyFlowPipeline",
        scheduler="flow_euler",
        resolution=32,
        guidance_scale=0.0,
        step_counts=(1, 2, 3, 4, 6, 8),
        default_train_steps=4,
        native_scheduler="FlowMatchEulerDiscreteScheduler",
    ),
    # sd-turbo ships an EulerDiscreteScheduler; DDPO/SDPO-style methods need DDIM's Gaussian transition, which
    # shares its alphas_cumprod table and trailing grid (eta=0 differs from Euler only in the last step's target:
    # DDIM's final_alpha_cumprod = alphas_cumprod[0] instead of sigma = 0).
    ModelSpec(
        name="sd-turbo",
        family="sd",
        source="stabilityai/sd-turbo",
        pipeline_class="StableDiffusionPipeline",
        scheduler="ddim",
        resolution=512,
        guidance_scale=0.0,
        step_counts=(1, 2, 3, 4, 6, 8),
        default_train_steps=4,
        native_scheduler="EulerDiscreteScheduler",
    ),
    ModelSpec(
        name="sdxl-turbo",
        family="sdxl",
        source="stabilityai/sdxl-turbo",
        pipeline_class="StableDiffusionXLPipeline",
        scheduler="euler_ancestral",
        resolution=512,
        guidance_scale=0.0,
        step_counts=(1, 2, 3, 4, 6, 8),
        default_train_steps=4,
        native_scheduler="EulerAncestralDiscreteScheduler",
    ),
    # Rectified-flow transformers (velocity prediction, FlowMatchEulerDiscreteScheduler): the "flow_euler" kernel.
    # FLUX.1-schnell is timestep- and guidance-distilled (1-4 steps, no CFG, no guidance embedding; 1024 px);
    # SD3.5-Large-Turbo is ADD-distilled to 4 steps at guidance 0 (1024 px). Both use CLIP + T5 text encoders.
    ModelSpec(
        name="flux-schnell",
        family="flux",
        source="black-forest-labs/FLUX.1-schnell",
        pipeline_class="FluxPipeline",
        scheduler="flow_euler",
        resolution=1024,
        guidance_scale=0.0,
        step_counts=(1, 2, 3, 4, 6, 8),
        default_train_steps=4,
        native_scheduler="FlowMatchEulerDiscreteScheduler",
    ),
    ModelSpec(
        name="sd35-large-turbo",
        family="sd3",
        source="stabilityai/stable-diffusion-3.5-large-turbo",
        pipeline_class="StableDiffusion3Pipeline",
        scheduler="flow_euler",
        resolution=1024,
        guidance_scale=0.0,
        step_counts=(1, 2, 3, 4, 6, 8),
        default_train_steps=4,
        native_scheduler="FlowMatchEulerDiscreteScheduler",
    ),
):
    _SPECS.register(_spec.name, _spec)


class ModelUnavailableError(OSError):
    """The weights of a zoo model could not be loaded (hub unreachable, not cached, gated, or a bad local path)."""


def get(name: str) -> ModelSpec:
    """The spec of a zoo model; `tasks.registry.UnknownNameError` naming the valid ones otherwise."""
    return _SPECS.get(name)


def names() -> list[str]:
    return _SPECS.names()


def _pipeline_class(spec: ModelSpec):
    if spec.pipeline_class == "ToyPipeline":
        from tasks.toy.pipeline import ToyPipeline

        return ToyPipeline
    if spec.pipeline_class == "ToyFlowPipeline":
        from tasks.toy.flow_pipeline import ToyFlowPipeline

        return ToyFlowPipeline
    import diffusers

    return getattr(diffusers, spec.pipeline_class)


def with_trailing_spacing(scheduler):
    """The same scheduler class and config with `timestep_spacing="trailing"` (1 step starts at t=999)."""
    if scheduler.config.get("timestep_spacing") == "trailing":
        return scheduler
    return type(scheduler).from_config(scheduler.config, timestep_spacing="trailing")


def load_pipeline(name: str, *, path: str | os.PathLike | None = None, device="cpu", dtype=torch.float32):
    """Load zoo model `name` from its source, or from the local `save_pretrained` folder `path` if given.

    With a `path` nothing is fetched (`local_files_only=True`). The scheduler is switched to trailing timestep
    spacing (few-step sampling must start at t=999). Raises `ModelUnavailableError` with what to do when the
    weights cannot be found.
    """
    spec = get(name)
    cls = _pipeline_class(spec)
    if path is not None or not spec.is_hub:
        folder = Path(path if path is not None else spec.source)
        if not (folder / "model_index.json").is_file():
            what = "given path" if path is not None else "packaged toy weights"
            tiny = "tiny_flow" if spec.family in ("flux", "sd3") else "tiny"
            hint = (
                f"build a tiny stand-in with tasks.{tiny}.build_tiny_{spec.family}('{folder}')"
                if spec.family in ("sd", "sdxl", "flux", "sd3")
                else "regenerate them with `python -m bench.models build " + spec.name + "`"
            )
            raise ModelUnavailableError(
                f"model {name!r}: no diffusers pipeline folder at {folder} ({what}; expected model_index.json "
                f"written by save_pretrained). Pass an existing folder as path=..., or {hint}."
            )
        from tasks.weights import WeightsChecksumError, verify_checksums

        fix = (f"rebuild them with `python -m bench.models build {spec.name}` or restore them with "
               f"`git checkout -- {folder}`" if path is None else "restore the folder from where it was written")
        try:
            verify_checksums(folder, fix=fix)
        except WeightsChecksumError as err:
            raise ModelUnavailableError(f"model {name!r}: {err}") from None
        try:
            pipe = cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelUnavailableError(f"model {name!r}: could not load the pipeline in {folder}: {err}") from err
    else:
        try:
            pipe = cls.from_pretrained(spec.source, dtype=dtype)
        except OSError as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            raise ModelUnavailableError(
                f"model {name!r}: could not load weights of hub id {spec.source!r}"
                f"{' (HF_HUB_OFFLINE is set, so only the local cache is used)' if offline else ''}. "
                f"Either download them into the Hugging Face cache once with network access "
                f"(`hf download {spec.source}`, after `hf auth login` if the repo asks you "
                f"to accept its licence), or pass a local save_pretrained folder as path=... "
                f"(config: model.path). Cause: {type(err).__name__}: {err}"
            ) from err
    if "timestep_spacing" in pipe.scheduler.config:  # flow schedulers have no spacing: their grid starts at sigma 1
        pipe.scheduler = with_trailing_spacing(pipe.scheduler)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
