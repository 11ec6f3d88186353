"""Where a cell's time goes: model spans (the physical floor) versus everything else (ours).

    profiler = SpanProfiler()
    with profiler.instrument(), profiler.phase("train"):
        method.train(policy, task, budget, tracker)
    profiler.summary()["wall"]["phases"]["train"]  # {"elapsed": s, "seconds": {category: s}, "floor": s, ...}

The floor is the time the networks must take: denoiser forward and backward, VAE encode/decode, reward models,
text encoders, and SPO's step-aware preference model (a learned reward model: its forward and backward, in training
and in scoring, are ``preference_model``; in the paper it is a CLIP-sized network). Every other second (the
sampler's Python, log-prob maths, optimizer steps, advantages, MLflow, image grids, ...) is ours. `instrument()` patches, for the duration of the block and process-wide:

- denoiser forward: ``UNet2DModel.forward`` / ``UNet2DConditionModel.forward`` (the policy's UNet and its frozen copy);
  ``methods.spo.StepAwarePreferenceModel.forward`` likewise as ``preference_model``;
- VAE: ``AutoencoderKL.encode`` / ``decode``; text encoders: ``CLIPTextModel(WithProjection).forward`` and the toy
  ``ToyTextEncoder.forward``; rewards: ``tasks.rewards.base.Reward.__call__`` (every reward goes through it);
- tracking (ours, reported on its own): the public methods of ``bench.tracking.Store`` / ``CellRun`` / ``Tracker``,
  ``git_commit`` and ``start_mlflow_run`` / ``end_mlflow_run`` (MLflow's own run start and end);
- backward: ``torch.autograd.backward`` (``Tensor.backward`` calls it).

Accounting rules (why the numbers add up):
1. Spans are exclusive: only a span opened while no other span is open counts; a span opened inside another one
   (a reward's own text tower, a forward recomputed during backward) is part of the enclosing span. So the floor
   is a sum of disjoint intervals and can never exceed the wall time.
2. Denoiser backward. On one device the autograd engine runs ready nodes in decreasing creation order
   (sequence number), so a backward call first runs the nodes created after the denoiser call (the loss, the
   log-prob maths) and reaches the denoiser's output node only once all of them are done; from then on it runs
   the denoiser's own nodes (inputs x_t / conditioning never require grad here). Each denoiser forward made with
   grad registers a pre-hook on its output's grad_fn; a backward call is split at the first such pre-hook:
   [start, first hook) -> ``backward_other`` (ours), [first hook, end] -> ``denoiser_backward`` (floor). When a
   graph chains several denoiser calls through our transition maths (Diffusion-Sharpening's paths), the small
   element-wise transition nodes between them are counted as denoiser backward (an upper bound on the floor).
   The preference model's backward is split off the same way (credited to ``preference_model``). A backward with
   no wrapped network in its graph is all ``backward_other``.
3. Spans are recorded on the thread that created the profiler only (MLflow's system-metrics thread, the peak-
   memory sampler and joblib helpers are ignored); the backward pre-hook may fire on an autograd device thread.
4. On CUDA, pass ``sync=torch.cuda.synchronize``: spans then synchronise at their edges (GPU work is
   asynchronous, so without it a span measures kernel launches only).

Phases (``phase("train")``) are flat and exclusive: entering a phase pauses the enclosing one, so phase times sum
to the instrumented time; a span is attributed to the phase that was active when it opened.

Two clocks run side by side: wall time, and the CPU time of the profiling thread (``time.thread_time``). With one
intra-op torch thread every network runs on that thread, so on an overloaded machine (time waiting for a core is
wall time but not CPU time) the CPU-clock shares stay stable while wall-clock ones drift with the load. On CUDA
use the wall clock (GPU work is not CPU time of this thread).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

FLOOR = ("denoiser_forward", "denoiser_backward", "vae", "reward", "text_encoder", "preference_model")
"""Span categories that make up the physical floor of a cell."""
OURS = ("backward_other", "tracking")
"""Named span categories that are ours (the rest of the wall time is unattributed, also ours)."""
CATEGORIES = FLOOR + OURS
NO_PHASE = "other"
_INHERITED = object()  # marks a class attribute that was inherited (restored by deleting the patch)


class SpanProfiler:
    """Exclusive spans by (phase, category), timed on two clocks at once: wall (``clock``, default perf_counter) and
    this thread's CPU time (``cpu_clock``, default thread_time; on a shared, overloaded box the CPU clock is what
    stays reproducible). See the module docstring for the accounting rules."""

    CLOCKS = ("wall", "cpu")

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] | None = time.thread_time, sync: Callable[[], None] | None = None):
        self.clock = clock
        self.cpu_clock = cpu_clock if cpu_clock is not None else clock
        self.sync = sync
        self.seconds: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        """(phase, category) -> exclusive [wall, cpu] seconds."""
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.phase_seconds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        """phase -> exclusive [wall, cpu] seconds spent while it was the innermost phase."""
        self._thread = threading.get_ident()
        self._depth = 0
        self._phases: list[str] = []
        self._phase_start = (0.0, 0.0)
        self._backward: dict[str, Any] | None = None
        self._patches: list[tuple[Any, str, Any]] = []
        self.elapsed = [0.0, 0.0]
        """[wall, cpu] seconds inside `instrument()` (summed over uses)."""

    # ------------------------------------------------------------------------------------------- bookkeeping
    @property
    def current_phase(self) -> str:
        return self._phases[-1] if self._phases else NO_PHASE

    def now(self) -> tuple[float, float]:
        return self.clock(), self.cpu_clock()

    def _mine(self) -> bool:
        return threading.get_ident() == self._thread

    def add(self, category: str, seconds: tuple[float, float] | float, calls: int = 1) -> None:
        """Credit (wall, cpu) seconds (a float: both) of `category` to the current phase."""
        wall, cpu = (seconds, seconds) if isinstance(seconds, (int, float)) else seconds
        key = (self.current_phase, category)
        self.seconds[key][0] += wall
        self.seconds[key][1] += cpu
        self.calls[key] += calls

    @staticmethod
    def _since(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
        return end[0] - start[0], end[1] - start[1]

    @contextlib.contextmanager
    def span(self, category: str) -> Iterator[None]:
        """Time the block as `category` unless another span is already open (then it is part of that one)."""
        if not self._mine() or self._depth:
            if self._mine():
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
            else:
                yield
            return
        if self.sync is not None:
            self.sync()
        self._depth += 1
        start = self.now()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self._depth -= 1
            self.add(category, self._since(start, self.now()))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute spans to phase `name` and time it (exclusively: an enclosing phase is paused)."""
        now = self.now()
        if self._phases:
            self._credit_phase(self._phases[-1], now)
        self._phases.append(name)
        self._phase_start = now
        try:
            yield
        finally:
            now = self.now()
            self._credit_phase(self._phases.pop(), now)
            self._phase_start = now

    def _credit_phase(self, name: str, now: tuple[float, float]) -> None:
        wall, cpu = self._since(self._phase_start, now)
        self.phase_seconds[name][0] += wall
        self.phase_seconds[name][1] += cpu

    # ------------------------------------------------------------------------------------------- wrappers
    def wrap(self, func: Callable, category: str) -> Callable:
        """`func` timed as a `category` span."""
        profiler = self

        @functools.wraps(func)
        def timed(*args, **kwargs):
            with profiler.span(category):
                return func(*args, **kwargs)

        timed.__wrapped_by_perf__ = func  # type: ignore[attr-defined]
        return timed

    def wrap_model(self, forward: Callable, category: str = "denoiser_forward",
                   backward_category: str = "denoiser_backward") -> Callable:
        """A network's forward timed as `category` whose output, when it carries a graph, marks where that network's
        part of a later backward starts; that part is credited to `backward_category` (rule 2)."""
        profiler = self

        def arrived(grad_outputs):
            state = profiler._backward
            if state is not None and state["first"] is None:
                state["first"], state["category"] = profiler.now(), backward_category
            return None

        @functools.wraps(forward)
        def timed(*args, **kwargs):
            with profiler.span(category):
                out = forward(*args, **kwargs)
            tensor = _first_tensor(out)
            if tensor is not None and tensor.grad_fn is not None:
                tensor.grad_fn.register_prehook(arrived)
            return out

        timed.__wrapped_by_perf__ = forward  # type: ignore[attr-defined]
        return timed

    def wrap_backward(self, backward: Callable) -> Callable:
        """torch.autograd.backward split into ``backward_other`` and ``denoiser_backward`` (rule 2)."""
        profiler = self

        @functools.wraps(backward)
        def timed(*args, **kwargs):
            if not profiler._mine() or profiler._depth:
                return backward(*args, **kwargs)
            if profiler.sync is not None:
                profiler.sync()
            state: dict[str, Any] = {"first": None, "category": None}
            profiler._backward = state
            profiler._depth += 1
            start = profiler.now()
            try:
                return backward(*args, **kwargs)
            finally:
                if profiler.sync is not None:
                    profiler.sync()
                end = profiler.now()
                profiler._depth -= 1
                profiler._backward = None
                first = state["first"]
                if first is None:
                    profiler.add("backward_other", profiler._since(start, end))
                else:
                    profiler.add("backward_other", profiler._since(start, first))
                    profiler.add(state["category"], profiler._since(first, end), calls=0)

        timed.__wrapped_by_perf__ = backward  # type: ignore[attr-defined]
        return timed

    # ------------------------------------------------------------------------------------------- patching
    def patch(self, owner: Any, name: str, replacement: Callable) -> None:
        """Set `owner.name = replacement` until `uninstall()` (the original is restored exactly)."""
        own = vars(owner).get(name, _INHERITED) if isinstance(owner, type) else getattr(owner, name)
        self._patches.append((owner, name, own))
        setattr(owner, name, replacement)

    def install(self) -> SpanProfiler:
        """Patch the model entry points and the tracking layer (module docstring); idempotent per profiler."""
        if self._patches:
            return self
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

        for cls in (UNet2DModel, UNet2DConditionModel):
            self.patch(cls, "forward", self.wrap_model(cls.forward))
        for name in ("encode", "decode"):
            self.patch(AutoencoderKL, name, self.wrap(getattr(AutoencoderKL, name), "vae"))
        import transformers

        for cls_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            cls = getattr(transformers, cls_name)
            self.patch(cls, "forward", self.wrap(cls.forward, "text_encoder"))
        from tasks.toy.pipeline import ToyTextEncoder

        self.patch(ToyTextEncoder, "forward", self.wrap(ToyTextEncoder.forward, "text_encoder"))
        from tasks.rewards.base import Reward

        self.patch(Reward, "__call__", self.wrap(Reward.__call__, "reward"))
        from methods.spm import ConvSPM as StepAwarePreferenceModel

        spm = StepAwarePreferenceModel.forward
        self.patch(StepAwarePreferenceModel, "forward", self.wrap_model(spm, "preference_model", "preference_model"))
        self.patch(torch.autograd, "backward", self.wrap_backward(torch.autograd.backward))
        self._install_tracking()
        return self

    def _install_tracking(self) -> None:
        import inspect

        from bench import tracking

        for cls in (tracking.Store, tracking.CellRun, tracking.Tracker):
            for name, func in list(vars(cls).items()):
                if inspect.isfunction(func) and not name.startswith("_") and name not in ("tracker", "progress"):
                    self.patch(cls, name, self.wrap(func, "tracking"))
        for name in ("git_commit", "stepbench_version", "start_mlflow_run", "end_mlflow_run"):
            self.patch(tracking, name, self.wrap(getattr(tracking, name), "tracking"))

    def uninstall(self) -> None:
        while self._patches:
            owner, name, original = self._patches.pop()
            if original is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

    @contextlib.contextmanager
    def instrument(self) -> Iterator[SpanProfiler]:
        """`install()` for the block, timing it into `self.elapsed`."""
        self.install()
        start = self.now()
        try:
            yield self
        finally:
            wall, cpu = self._since(start, self.now())
            self.elapsed[0] += wall
            self.elapsed[1] += cpu
            self.uninstall()

    # ------------------------------------------------------------------------------------------- results
    def summary(self, wall: float | None = None, cpu: float | None = None) -> dict[str, Any]:
        """{"wall": {...}, "cpu": {...}}, each with "total" and "phases": per phase and in total the elapsed
        seconds, seconds per category, floor (sum of FLOOR categories), ours (elapsed - floor, of which `tracking`
        and `backward_other` are named) and overhead = ours / elapsed.

        `wall` / `cpu` (default: the instrumented time) may include time outside any phase; it goes to "other"."""
        elapsed = [self.elapsed[0] if wall is None else wall, self.elapsed[1] if cpu is None else cpu]
        out: dict[str, Any] = {}
        names = list(dict.fromkeys([*self.phase_seconds, *(p for p, _ in self.seconds), NO_PHASE]))
        for i, kind in enumerate(self.CLOCKS):
            phase_time = {name: value[i] for name, value in self.phase_seconds.items()}
            phase_time[NO_PHASE] = phase_time.get(NO_PHASE, 0.0) + max(0.0, elapsed[i] - sum(
                v[i] for v in self.phase_seconds.values()))
            phases = {name: _block(phase_time.get(name, 0.0),
                                   {c: v[i] for (p, c), v in self.seconds.items() if p == name},
                                   {c: n for (p, c), n in self.calls.items() if p == name}) for name in names}
            totals: dict[str, float] = defaultdict(float)
            calls: dict[str, int] = defaultdict(int)
            for (_, category), value in self.seconds.items():
                totals[category] += value[i]
            for (_, category), n in self.calls.items():
                calls[category] += n
            out[kind] = {"total": _block(elapsed[i], dict(totals), dict(calls)), "phases": phases}
        return out


def _block(elapsed: float, seconds: dict[str, float], calls: dict[str, int]) -> dict[str, Any]:
    floor = sum(seconds.get(c, 0.0) for c in FLOOR)
    ours = max(0.0, elapsed - floor)
    return {
        "elapsed": elapsed,
        "seconds": {c: seconds.get(c, 0.0) for c in CATEGORIES} | {c: s for c, s in seconds.items()
                                                                    if c not in CATEGORIES},
        "calls": {c: int(calls.get(c, 0)) for c in CATEGORIES if calls.get(c, 0)},
        "floor": floor,
        "ours": ours,
        "unattributed": max(0.0, ours - sum(seconds.get(c, 0.0) for c in OURS)),
        "overhead": ours / elapsed if elapsed > 0 else 0.0,
    }


def _first_tensor(out: Any):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((t for t in out if isinstance(t, torch.Tensor)), None)
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple())
    return None
