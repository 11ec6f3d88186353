"""Where a number came from: the CPU, the torch build and the float settings a cell ran under, as MLflow run tags.

Why: the on-policy RL rows' trained weights depend on floating-point rounding, so the same seed and config gave
SDPO +0.050 on a Xeon box and +0.015 on an AMD EPYC box (issue 14). A result can only be compared with another run
of the same provenance; reports and ``replicate`` read these tags to say which machine a verdict came from.

    tags = provenance_tags(cfg)     # {"provenance.cpu_model": "AMD EPYC", "provenance.torch_version": "2.13.0+cpu", ...}

Call it after the cell has set its threads and backends (bench.cell does, just before training), so the tags
record what the computation actually used.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

PREFIX = "provenance."
# CPU features that change which kernels torch picks (and so the rounding of float32/bf16 arithmetic).
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "neon", "asimd")
# torch's compile-time settings (torch.__config__.show(), "Build settings:") that select the math libraries.
BUILD_SETTINGS = ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_MKLDNN", "USE_OPENMP", "USE_CUDA", "USE_CUDNN",
                  "USE_ROCM", "CUDA_VERSION", "CUDNN_VERSION")
# environment variables that change threading or the CPU ISA torch and oneDNN dispatch to
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
            "MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG")


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """CPU model name, logical core count and the kernel-relevant feature flags (from /proc/cpuinfo on Linux,
    else the platform module)."""
    model, flags = "", set()
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {
        "cpu_model": model or platform.processor() or platform.machine() or "unknown",
        "cpu_count": str(os.cpu_count() or 0),
        "cpu_flags": ",".join(f for f in CPU_FLAGS if f in flags) or "unknown",
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def build_settings(config_text: str) -> dict[str, str]:
    """The BUILD_SETTINGS entries of torch.__config__.show()'s "Build settings: K=V, ..." line."""
    match = re.search(r"Build settings:(.*)", config_text)
    pairs = dict(re.findall(r"([A-Z_]+)=([^,]*)", match.group(1))) if match else {}
    return {key.lower(): pairs[key].strip() for key in BUILD_SETTINGS if key in pairs}


def torch_info() -> dict[str, str]:
    """The torch build: version, CUDA/CPU, MKL and oneDNN availability and versions, the CPU kernel level in use."""
    import torch

    out = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "torch_mkl": str(torch.backends.mkl.is_available()),
        "torch_mkldnn": str(torch.backends.mkldnn.is_available()),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    config = torch.__config__.show()
    for name, pattern in (("torch_mkl_version", r"Math Kernel Library Version ([\d.]+)"),
                          ("torch_onednn_version", r"MKL-DNN (v[\d.]+)")):
        found = re.search(pattern, config)
        if found:
            out[name] = found.group(1)
    out |= {f"torch_build.{key}": value for key, value in build_settings(config).items()}
    return out


def float_settings(cfg: dict[str, Any] | None = None) -> dict[str, str]:
    """The settings that decide float rounding: matmul precision, TF32, oneDNN fp32 precision, deterministic
    algorithms, threads, and the cell's own dtype / autocast precision."""
    import torch

    out = {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": str(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": str(torch.backends.cudnn.allow_tf32),
        "cudnn_deterministic": str(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": str(torch.backends.cudnn.benchmark),
        "deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()),
        "num_threads": str(torch.get_num_threads()),
        "num_interop_threads": str(torch.get_num_interop_threads()),
    }
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if mkldnn_matmul is not None and hasattr(mkldnn_matmul, "fp32_precision"):
        out["mkldnn_matmul_fp32_precision"] = str(mkldnn_matmul.fp32_precision)
    if cfg is not None:
        out |= {"dtype": str(cfg.get("dtype")), "precision": str(cfg.get("precision", "fp32")),
                "tf32": str(cfg.get("tf32", True)), "device": str(cfg.get("device"))}
    out |= {f"env.{name}": os.environ[name] for name in ENV_VARS if name in os.environ}
    return out


def provenance_tags(cfg: dict[str, Any] | None = None) -> dict[str, str]:
    """Every provenance fact, as ``provenance.<name>`` string tags."""
    facts = cpu_info() | torch_info() | float_settings(cfg)
    return {PREFIX + key: str(value) for key, value in facts.items()}
