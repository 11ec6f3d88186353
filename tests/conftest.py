import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory):
    """A random-weight ToyPipeline (~70k params, seed 0) saved like the shipped weights: a `model.path` stand-in
    (the shipped toy weights are not needed to test the plumbing). One per test module."""
    from tasks.toy.pipeline import ToyPipeline, ToyTextEncoder, build_scheduler, build_unet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("toy") / "tiny-toy"
    ToyPipeline(build_unet((8, 16, 16)), ToyTextEncoder(width=16, out_dim=32), build_scheduler()).save_pretrained(path)
    return path
