"""Where a cell's time goes: model spans (the physical floor) versus everything else (ours).

    profiler = SpanProfiler()
    with profiler.instrument(), profiler.phase("train"):
        method.train(policy, task, budget, tracker)
    profiler.summary()["wall"]["phases"]["train"]  # {"elapsed": s, "seconds": {category: s}, "floor": s, ...}

The floor is the networks' own time: denoiser forward and backward (``UNet2DModel`` / ``UNet2DConditionModel``),
VAE, rewards (``Reward.__call__``), text encoders and SPO's preference model (forward and backward). Every other
second (sampler Python, log-prob maths, optimizer steps, MLflow: ``tracking``) is ours. `instrument()` patches
those entry points, ``bench.tracking``'s public methods and ``torch.autograd.backward`` for the block.

Accounting rules:
1. Spans are exclusive: a span opened inside another one is part of the enclosing one, so the floor is a sum of
   disjoint intervals and never exceeds the wall time.
2. Backward is split: the autograd engine runs nodes in decreasing creation order, so a backward first runs the
   loss-side nodes and reaches a network's output node only once they are done. A forward made with grad puts a
   pre-hook on its output's grad_fn; [start, first hook) is ``backward_other`` (ours), the rest the network's
   backward (transition maths between chained denoiser calls counts as denoiser: an upper bound on the floor).
3. Only the thread that created the profiler records spans (MLflow's metrics thread, joblib helpers are ignored).
4. On CUDA pass ``sync=torch.cuda.synchronize`` (spans synchronise at their edges) and read the wall clock.

Phases are flat and exclusive (entering one pauses the enclosing one): they sum to the instrumented time. Two
clocks run side by side: wall, and this thread's CPU time, which stays stable on a busy box (one torch thread).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

FLOOR = ("denoiser_forward", "denoiser_backward", "vae", "reward", "text_encoder", "preference_model")  # a cell's floor
OURS = ("backward_other", "tracking")  # named categories that are ours (the rest of the time is unattributed, ours)
CATEGORIES = FLOOR + OURS
NO_PHASE = "other"
_INHERITED = object()  # marks a class attribute that was inherited (restored by deleting the patch)


class SpanProfiler:
    """Exclusive spans by (phase, category), timed on two clocks at once: wall (``clock``) and this thread's CPU
    time (``cpu_clock``). See the module docstring for the accounting rules."""

    CLOCKS = ("wall", "cpu")

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] | None = time.thread_time, sync: Callable[[], None] | None = None):
        self.clock, self.cpu_clock, self.sync = clock, cpu_clock or clock, sync
        self.seconds: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])  # (phase, category)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.phase_seconds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # while the innermost phase
        self.elapsed = [0.0, 0.0]  # [wall, cpu] inside `instrument()`, summed over uses
        self._thread, self._depth, self._phases, self._phase_start = threading.get_ident(), 0, [], (0.0, 0.0)
        self._split: list | None = None  # a backward in progress: [time of the first network pre-hook, category]
        self._patches: list[tuple[Any, str, Any]] = []

    def now(self) -> tuple[float, float]:
        return self.clock(), self.cpu_clock()

    def add(self, category: str, start: tuple[float, float], end: tuple[float, float], calls: int = 1) -> None:
        """Credit the interval [start, end) (wall, cpu) of `category` to the current phase."""
        key = (self._phases[-1] if self._phases else NO_PHASE, category)
        for i in (0, 1):
            self.seconds[key][i] += end[i] - start[i]
        self.calls[key] += calls

    @contextlib.contextmanager
    def span(self, category: str, split: bool = False) -> Iterator[None]:
        """Time the block as `category` unless another span is open or this is another thread; `split`: a backward
        pass, whose part from the first network pre-hook on is that network's (rule 2)."""
        if threading.get_ident() != self._thread or self._depth:
            yield
            return
        (self.sync or (lambda: None))()
        self._depth += 1
        self._split = [None, None] if split else None
        start = self.now()
        try:
            yield
        finally:
            (self.sync or (lambda: None))()
            end, (first, network) = self.now(), (self._split or [None, None])
            self._depth, self._split = self._depth - 1, None
            self.add(category, start, first or end)
            if first is not None:
                self.add(network, first, end, calls=0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute spans to phase `name` and time it (exclusively: an enclosing phase is paused)."""
        self._switch(name)
        try:
            yield
        finally:
            self._switch(None)

    def _switch(self, name: str | None) -> None:
        now = self.now()
        if self._phases:
            for i in (0, 1):
                self.phase_seconds[self._phases[-1]][i] += now[i] - self._phase_start[i]
        self._phases.append(name) if name is not None else self._phases.pop()
        self._phase_start = now

    def wrap(self, func: Callable, category: str, backward_category: str | None = None) -> Callable:
        """`func` timed as a `category` span. With `backward_category` (a network's forward), its output, when it
        carries a graph, marks where that network's part of a later backward starts (rule 2)."""
        def arrived(grad_outputs):
            if self._split is not None and self._split[0] is None:
                self._split[:] = [self.now(), backward_category]

        @functools.wraps(func)
        def timed(*args, **kwargs):
            with self.span(category):
                out = func(*args, **kwargs)
            tensor = _first_tensor(out) if backward_category else None
            if tensor is not None and tensor.grad_fn is not None:
                tensor.grad_fn.register_prehook(arrived)
            return out

        return timed

    def wrap_backward(self, backward: Callable) -> Callable:
        """torch.autograd.backward split into ``backward_other`` and the networks' backward (rule 2)."""
        @functools.wraps(backward)
        def timed(*args, **kwargs):
            with self.span("backward_other", split=True):
                return backward(*args, **kwargs)

        return timed

    def patch(self, owner: Any, name: str, replacement: Callable) -> None:
        """Set `owner.name = replacement` until `uninstall()` (the original is restored exactly)."""
        own = vars(owner).get(name, _INHERITED) if isinstance(owner, type) else getattr(owner, name)
        self._patches.append((owner, name, own))
        setattr(owner, name, replacement)

    def install(self) -> SpanProfiler:
        """Patch the model entry points and the tracking layer (module docstring); idempotent per profiler."""
        if self._patches:
            return self
        import transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

        from bench import tracking
        from methods.spm import ConvSPM
        from tasks.rewards.base import Reward
        from tasks.toy.pipeline import ToyTextEncoder

        for cls in (UNet2DModel, UNet2DConditionModel):
            self.patch(cls, "forward", self.wrap(cls.forward, "denoiser_forward", "denoiser_backward"))
        self.patch(ConvSPM, "forward", self.wrap(ConvSPM.forward, "preference_model", "preference_model"))
        for name in ("encode", "decode"):
            self.patch(AutoencoderKL, name, self.wrap(getattr(AutoencoderKL, name), "vae"))
        for cls in (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection, ToyTextEncoder):
            self.patch(cls, "forward", self.wrap(cls.forward, "text_encoder"))
        self.patch(Reward, "__call__", self.wrap(Reward.__call__, "reward"))
        self.patch(torch.autograd, "backward", self.wrap_backward(torch.autograd.backward))
        for cls in (tracking.Store, tracking.CellRun, tracking.Tracker):
            for name, func in list(vars(cls).items()):
                if inspect.isfunction(func) and not name.startswith("_") and name not in ("tracker", "progress"):
                    self.patch(cls, name, self.wrap(func, "tracking"))
        for name in ("git_commit", "stepbench_version", "start_mlflow_run", "end_mlflow_run"):
            self.patch(tracking, name, self.wrap(getattr(tracking, name), "tracking"))
        return self

    def uninstall(self) -> None:
        while self._patches:
            owner, name, original = self._patches.pop()
            delattr(owner, name) if original is _INHERITED else setattr(owner, name, original)

    @contextlib.contextmanager
    def instrument(self) -> Iterator[SpanProfiler]:
        """`install()` for the block, timing it into `self.elapsed`."""
        self.install()
        start = self.now()
        try:
            yield self
        finally:
            end = self.now()
            self.elapsed = [self.elapsed[i] + end[i] - start[i] for i in (0, 1)]
            self.uninstall()

    def summary(self, wall: float | None = None, cpu: float | None = None) -> dict[str, Any]:
        """{"wall": {...}, "cpu": {...}}, each with "total" and "phases": per phase and in total the elapsed seconds,
        seconds and calls per category, floor (sum of FLOOR categories), ours (elapsed - floor; `tracking` and
        `backward_other` named, the rest unattributed) and overhead = ours / elapsed. `wall` / `cpu` (default: the
        instrumented time) may include time outside any phase; it goes to "other"."""
        elapsed = [self.elapsed[0] if wall is None else wall, self.elapsed[1] if cpu is None else cpu]
        names = list(dict.fromkeys([*self.phase_seconds, *(p for p, _ in self.seconds), NO_PHASE]))
        out: dict[str, Any] = {}
        for i, kind in enumerate(self.CLOCKS):
            phase_time = {name: value[i] for name, value in self.phase_seconds.items()}
            phase_time[NO_PHASE] = phase_time.get(NO_PHASE, 0.0) + max(
                0.0, elapsed[i] - sum(v[i] for v in self.phase_seconds.values()))
            out[kind] = {"total": self._block(i, elapsed[i]),
                         "phases": {n: self._block(i, phase_time.get(n, 0.0), n) for n in names}}
        return out

    def _block(self, clock: int, elapsed: float, phase: str | None = None) -> dict[str, Any]:
        """Seconds and calls per category of one phase (None: all), floor, ours and overhead on one clock."""
        seconds: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
        calls: dict[str, int] = {}
        for (p, c), value in self.seconds.items():
            if phase in (None, p):
                seconds[c] = seconds.get(c, 0.0) + value[clock]
                calls[c] = calls.get(c, 0) + self.calls[(p, c)]
        floor = sum(seconds[c] for c in FLOOR)
        ours = max(0.0, elapsed - floor)
        return {"elapsed": elapsed, "seconds": seconds, "calls": {c: n for c, n in calls.items() if n}, "floor": floor,
                "ours": ours, "overhead": ours / elapsed if elapsed > 0 else 0.0,
                "unattributed": max(0.0, ours - sum(seconds[c] for c in OURS))}


def _first_tensor(out: Any):
    """The tensor a network returned (a tensor, the first tensor of a tuple, or a diffusers output's sample)."""
    out = getattr(out, "sample", out)
    if isinstance(out, (tuple, list)):
        out = next((t for t in out if isinstance(t, torch.Tensor)), None)
    return out if isinstance(out, torch.Tensor) else None
