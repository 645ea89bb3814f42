"""What the training loop calls for the model: eagerly, ``torch.compile``d, or replayed as a CUDA graph.

At the paper's batch of 16 a ResNet-50 training step launches several hundred small kernels (forward, backward,
autocast's casts); issuing them one by one from Python can take the host about as long as the GPU takes to run them,
so the GPU waits. A CUDA graph records the forward and backward kernels once and replays them with one launch each:
the host's cost per step no longer depends on the model, and the GPU stays busy. The same operations run on the same
inputs, but the results are not bit-identical to eager on an H100 (the kernels recorded under capture may round
differently; the measured drift is in docs/protocol.md); ``--cuda_graph off`` is eager.

Only full training batches take the fast path: the smaller last batch of an epoch and every evaluation run the same
module eagerly, so one capture (or one compilation) serves the whole run. The loss, LL's selection and the optimiser
stay eager: they differ per method and are a small part of the step.

Start worker processes before the capture, never after: a forked child that frees memory the capture holds aborts
(the trainer's loader workers start with the first epoch, before its first step).
"""

from __future__ import annotations

import time

import torch


class GraphCaptureError(Exception):
    """``--cuda_graph on`` and the training step cannot be captured; the message says why and what to use instead."""


def cuda_graph_reason(device: torch.device, distributed: bool) -> str | None:
    """Why the training step cannot be replayed as a CUDA graph here (None: it can)."""
    if device.type != "cuda":
        return f"--cuda_graph on needs a CUDA device (this run uses {device.type})"
    if distributed:
        return "--cuda_graph on is not supported under torchrun (DistributedDataParallel's gradient hooks)"
    return None


class _Call(torch.nn.Module):
    """``module(x)`` as a module of its own, so that the graph's wrapper replaces this one's ``forward`` (not the
    model's) and still finds the model's parameters."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class FastTrainStep(torch.nn.Module):
    """The model for full training batches of ``batch_size``: compiled (``compile``) and/or replayed as a CUDA graph
    (``cuda_graph``) captured on the first such batch; anything else (the last batch, evaluation) runs ``module``
    eagerly. Parameters stay the model's own.

    The capture runs the step a few times on that batch (``torch.cuda.make_graphed_callables``' warm-up); BatchNorm's
    running statistics are put back afterwards, so they have seen exactly the batches of an eager run. The first fast
    step's cost (compilation and/or capture) is timed once, with a synchronisation at each end, and printed:
    ``warmup_s``. The graph's outputs live in its own memory and are overwritten by the next replay: the loop uses a
    step's logits within that step only."""

    def __init__(
        self,
        module: torch.nn.Module,
        batch_size: int,
        *,
        compile: bool,
        cuda_graph: bool,
        required: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.eager = module
        self.compiled = torch.compile(module, dynamic=False) if compile else None
        self.batch_size, self.use_graph, self.required, self.verbose = batch_size, cuda_graph, required, verbose
        self._graphed = None  # the captured callable (not a registered submodule: no second copy in state_dict)
        self.calls = 0
        self.started = 0.0
        self.warmup_s: float | None = None

    @property
    def what(self) -> str:
        parts = ([] if self.compiled is None else ["torch.compile"]) + (["CUDA graph"] if self.use_graph else [])
        return " + ".join(parts) or "eager"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] != self.batch_size:
            return self.eager(x)
        fast = self.compiled if self.compiled is not None else self.eager
        if not self.use_graph:
            self._time_first_calls(x)
            return fast(x)
        if self._graphed is None:
            started = time.perf_counter()
            try:
                self._capture(fast, x)
            except (RuntimeError, AssertionError) as err:  # an operation that cannot be captured
                why = str(err).splitlines()[0] if str(err) else type(err).__name__
                if self.required:
                    raise GraphCaptureError(
                        f"The training step could not be captured as a CUDA graph ({why}). Run with --cuda_graph auto "
                        "(which then trains without it) or --cuda_graph off."
                    ) from err
                self.use_graph = False
                print(
                    f"CUDA graph: the training step could not be captured ({why}); it runs without (--cuda_graph "
                    "off skips the attempt)",
                    flush=True,
                )
                if self.compiled is not None:  # the attempt compiled the step: its time is the compilation's
                    self._report(time.perf_counter() - started)
                return fast(x)
        return self._graphed(x)

    def _time_first_calls(self, x: torch.Tensor) -> None:
        """Compilation only: the first compiled step, from its forward to the next one's (synchronises twice), unless a
        warm-up was already timed."""
        if self.compiled is None or self.warmup_s is not None:
            return
        self.calls += 1
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        if self.calls == 1:
            self.started = time.perf_counter()
        else:
            self._report(time.perf_counter() - self.started)

    def _capture(self, fast: torch.nn.Module, x: torch.Tensor) -> None:
        """Record the forward and backward of ``fast`` on (a copy of) ``x``; synchronises, once per run."""
        started = time.perf_counter()
        saved = [b.detach().clone() for b in self.eager.buffers()]
        kind = x.device.type
        # make_graphed_callables refuses autocast's weight cache; without it autocast casts the same weights the same
        # way, once per use, so the kernels and the values are the same.
        amp = torch.autocast(
            kind, dtype=torch.get_autocast_dtype(kind), enabled=torch.is_autocast_enabled(kind), cache_enabled=False
        )
        try:
            with amp:
                graphed = torch.cuda.make_graphed_callables(_Call(fast), (x.detach().clone(),))
        finally:
            with torch.no_grad():  # the warm-up's BatchNorm updates are undone
                for buffer, value in zip(self.eager.buffers(), saved, strict=True):
                    buffer.copy_(value)
        self.__dict__["_graphed"] = graphed
        # The capture's warm-up creates the parameters' gradient accumulators on its own side stream, and the captured
        # graph keeps them, so autograd warns once that the replayed backward feeds them from the default stream. It
        # orders the streams itself (the values are right; the measured rates include that cost): not the user's to fix.
        if hasattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch"):
            torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self._report(time.perf_counter() - started)

    def _report(self, seconds: float) -> None:
        self.warmup_s = seconds
        if self.verbose:
            print(f"{self.what}: the first fast training step took {seconds:.1f} s", flush=True)


def make_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """The official optimiser over parameter groups that carry their own lr: Adam without weight decay, or SGD with
    momentum 0.9 and weight decay 1e-3. Adam on CUDA is torch's fused implementation (``fused_adam``)."""
    groups = [{**group, "params": list(group["params"])} for group in groups]  # a generator is read once, here
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=True if fused_adam(groups) else None)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=1e-3)


def fused_adam(groups: list[dict]) -> bool:
    """Whether Adam runs fused: when every parameter is on CUDA. The same update as the default implementation, in
    one kernel for all parameters instead of several passes over them: 1.03x the training rate of the paper's COCO
    setting on an H100, rounded differently (docs/performance.md). A CPU run keeps the default, so CPU results repeat
    as before; a resumed run keeps the implementation its checkpoint was saved with (the optimiser's state holds it)."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_cuda for p in params)
