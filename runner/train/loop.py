"""The loop: step, evaluate, log, checkpoint. No hydra, fsspec or TensorBoard imports here.

Per step the loop does no host-device synchronisation: losses accumulate in a device tensor and are read
(``.item()``) only every ``log_every`` steps. The loop asks ``hooks`` (not globals) whether to stop early
and what to do after a checkpoint, so the same loop serves local runs, torchrun and SLURM.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from runner import distributed
from runner.checkpoint.errors import CheckpointError
from runner.checkpoint.state import TrainState
from runner.config import TrainerConfig
from runner.errors import RunStopped
from runner.train.metrics import Sink
from runner.train.optim import Schedule, set_lr

log = logging.getLogger(__name__)

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "amp_fp16": torch.float16}


@dataclass
class Hooks:
    #: Called at each step boundary; True on any rank stops every rank after a checkpoint.
    should_stop: Callable[[], bool] = lambda: False
    #: Saves a checkpoint of the state (returns its location); set by the caller. With ``block=True``
    #: (final save, stop request) it returns only once the checkpoint is committed, even if async.
    save: Callable[..., str] = lambda state, block=False: ""
    #: Called at every step boundary: raises a failed background save on the training thread.
    check: Callable[[], None] = lambda: None
    #: Blocks until a save in flight (async) is committed, raising its failure.
    wait: Callable[[], None] = lambda: None
    #: Called before the optimizer step changes the weights: an async save still copying them finishes.
    before_update: Callable[[], None] = lambda: None
    #: Called after each checkpoint is committed.
    after_save: Callable[[str], None] = lambda path: None


@dataclass
class Outcome:
    step: int
    last_eval: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global gradient norm (over every rank's shard when parameters are sharded)."""
    if any(isinstance(p.grad, DTensor) for p in params):
        return whole(torch.nn.utils.clip_grad_norm_(params, float("inf")))  # computes, never scales
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def whole(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a ``DTensor`` (FSDP: a norm replicated on every rank), else ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


#: An evaluation shows a progress bar once it has taken this long (a short one stays silent).
EVAL_BAR_DELAY_S = 2.0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Any],
    device: torch.device,
    precision: str,
    max_batches: int,
    show_progress: bool = False,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    total = len(batches) if isinstance(batches, Sized) else None
    if max_batches:
        total = min(total, max_batches) if total is not None else max_batches
        batches = itertools.islice(batches, max_batches)
    bar = tqdm(
        batches,
        total=total,
        disable=not show_progress,
        delay=EVAL_BAR_DELAY_S,
        leave=False,
        dynamic_ncols=True,
        desc="eval",
        unit="batch",
    )
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += labels.numel()
    bar.close()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "top1": correct / count}


@dataclass
class Context:
    """Where the loop runs and where its results go (everything but the state and the config)."""

    device: torch.device
    #: Samples per optimizer step over all ranks (for samples/s).
    global_batch: int
    sink: Sink
    hooks: Hooks = field(default_factory=Hooks)
    #: Progress bars (rank 0 only).
    show_progress: bool = True


@dataclass
class _Window:
    """Running sums between two log steps; ``loss_sum`` and ``count`` are saved with a checkpoint, so a
    resumed run logs the same values as an uninterrupted one."""

    loss_sum: torch.Tensor
    count: int = 0
    step_s: float = 0.0
    data_s: float = 0.0

    def saved(self) -> dict[str, Any]:
        return {"loss_sum": float(self.loss_sum.item()), "count": self.count}


class Loop:
    """``fit()`` trains ``state`` to ``cfg.max_steps``: per step :meth:`train_step`, then the cadences
    (:meth:`maybe_log`, :meth:`maybe_eval`, :meth:`maybe_save`). ``forward`` is what the loss is computed
    with (the model, possibly compiled or DDP-wrapped); ``state.model`` is what gets clipped and evaluated."""

    def __init__(
        self,
        state: TrainState,
        forward: nn.Module,
        schedule: Schedule,
        evals: Iterable[Any],
        cfg: TrainerConfig,
        ctx: Context,
    ) -> None:
        self.state, self.forward, self.schedule, self.evals, self.cfg, self.ctx = (
            state,
            forward,
            schedule,
            evals,
            cfg,
            ctx,
        )
        self.params = [p for p in state.model.parameters() if p.requires_grad]
        self.ddp = isinstance(forward, nn.parallel.DistributedDataParallel)
        device = ctx.device
        self.window = _Window(
            torch.tensor(float(state.window.get("loss_sum", 0.0)), dtype=torch.float32, device=device),
            int(state.window.get("count", 0)),
        )
        self.step_loss = torch.zeros((), dtype=torch.float32, device=device)  # reused: no allocation per step
        self.last_norm: torch.Tensor | None = None
        self.outcome = Outcome(step=state.step, last_eval=dict(state.last_eval))

    def fit(self) -> Outcome:
        """Train from ``state.step`` to ``cfg.max_steps``; returns where it stopped and the last eval."""
        state, cfg = self.state, self.cfg
        state.model.train()
        bar = tqdm(
            total=cfg.max_steps,
            initial=state.step,
            disable=not self.ctx.show_progress,
            dynamic_ncols=True,
            mininterval=1.0,
            desc="train",
            unit="step",
        )
        try:
            while state.step < cfg.max_steps:
                _check(self.ctx.hooks, cfg)
                started = time.perf_counter()
                finite = self.train_step()
                # A skipped step still consumes its batch and its place in the schedule, so step counts,
                # cadences and the data position stay those of an uninterrupted run.
                state.step += 1
                if finite:  # the logged mean loss is over the steps that updated the weights
                    self.window.loss_sum += self.step_loss
                    self.window.count += 1
                self.window.step_s += time.perf_counter() - started
                final = state.step >= cfg.max_steps
                self.maybe_log(final, bar)
                state.optimizer.zero_grad(set_to_none=True)
                self.maybe_eval(final)
                stop = distributed.any_true(self.ctx.hooks.should_stop())
                self.maybe_save(final, stop)
                bar.update(1)
                self.outcome.step = state.step
                if stop and not final:
                    log.warning("stopping at step %d on request (checkpoint saved)", state.step)
                    self.outcome.stopped_early = True
                    break
        finally:
            bar.close()
        return self.outcome

    def train_step(self) -> bool:
        """One optimizer step over ``grad_accum_steps`` micro-batches; False if it was skipped (non-finite)."""
        state, cfg, hooks = self.state, self.cfg, self.ctx.hooks
        optimizer, scaler = state.optimizer, state.scaler
        set_lr(optimizer, self.schedule(state.step))
        self.step_loss.zero_()
        for micro in range(cfg.grad_accum_steps):
            self.step_loss += self.forward_backward(last_micro=micro == cfg.grad_accum_steps - 1)
        hooks.before_update()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.grad_clip_norm > 0:
            self.last_norm = whole(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip_norm))
        norm = self.last_norm if cfg.grad_clip_norm > 0 else None
        if not _finite(self.step_loss, norm, self.params, scaler is not None):
            self._skip_nonfinite()
            return False
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return True

    def forward_backward(self, last_micro: bool) -> torch.Tensor:
        """Loss of the next micro-batch (scaled by the accumulation), backpropagated; DDP all-reduces the
        gradients on the last micro-batch only."""
        cfg, device = self.cfg, self.ctx.device
        waited = time.perf_counter()
        images, labels = next(self.state.data)
        self.window.data_s += time.perf_counter() - waited
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        no_sync = cast(Any, self.forward).no_sync() if self.ddp and not last_micro else contextlib.nullcontext()
        with no_sync:
            with autocast(device, cfg.precision):
                logits = self.forward(images)
            loss = F.cross_entropy(logits.float(), labels) / cfg.grad_accum_steps
            scaler = self.state.scaler
            (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()

    def _skip_nonfinite(self) -> None:
        """``trainer.on_nonfinite``: stop (save the last good state, raise) or skip this update."""
        state = self.state
        state.optimizer.zero_grad(set_to_none=True)
        if self.cfg.on_nonfinite == "stop":
            _stop_nonfinite(state, self.step_loss, self.ctx.hooks, self.window)
        state.skipped_steps += 1
        log.warning(
            "step %d: non-finite loss or gradients (loss %s); update skipped, %d skipped so far "
            "(trainer.on_nonfinite=skip)",
            state.step + 1,
            float(self.step_loss),
            state.skipped_steps,
        )

    def maybe_log(self, final: bool, bar: Any) -> None:
        """Every ``log_every`` steps (and the last): the window's mean loss and rates to the sink."""
        state, window = self.state, self.window
        if not (state.step % self.cfg.log_every == 0 or final):
            return
        norm = self.last_norm if self.last_norm is not None else grad_norm(self.params)
        # NOTE: a collective at log steps only (same steps on every rank): the logged loss is the global
        # batch's, so a 2-rank run logs the same curve as one process with the whole batch.
        mean_loss = (distributed.all_mean(window.loss_sum) / max(window.count, 1)).item()
        step_time = window.step_s / max(window.count, 1)
        values = {
            "loss": mean_loss,
            "lr": float(state.optimizer.param_groups[0]["lr"]),
            "grad_norm": float(norm),
            "samples_per_s": self.ctx.global_batch / step_time if step_time > 0 else 0.0,
            "step_time_s": step_time,
            "data_wait_frac": window.data_s / window.step_s if window.step_s > 0 else 0.0,
            "skipped_steps": float(state.skipped_steps),
        }
        self.ctx.sink.log(state.step, values)
        bar.set_postfix(loss=f"{mean_loss:.4f}", sps=_rate(values["samples_per_s"]), refresh=False)
        if not math.isfinite(mean_loss):
            log.warning("step %d: loss is %s", state.step, mean_loss)
        window.loss_sum.zero_()
        window.count, window.step_s, window.data_s = 0, 0.0, 0.0

    def maybe_eval(self, final: bool) -> None:
        """Every ``eval_every`` steps (and the last): evaluate, log, remember it in the state."""
        state, cfg = self.state, self.cfg
        if not (state.step % cfg.eval_every == 0 or final):
            return
        show = self.ctx.show_progress
        result = evaluate(state.model, self.evals, self.ctx.device, cfg.precision, cfg.eval_batches, show)
        self.outcome.last_eval = result
        state.last_eval = dict(result)
        self.ctx.sink.log(state.step, result, prefix="eval")
        log.info("step %d: eval loss %.4f, top-1 %.2f%%", state.step, result["loss"], 100 * result["top1"])

    def maybe_save(self, final: bool, stop: bool) -> None:
        """Every ``ckpt_every`` steps, at the end, and when asked to stop: a checkpoint (see :func:`_save`)."""
        if self.state.step % self.cfg.ckpt_every == 0 or final or stop:
            self.state.window = self.window.saved()
            _save(self.state, self.ctx.hooks, self.cfg, last=final or stop)


def _rate(per_s: float) -> str:
    """Samples/s for the progress bar: whole numbers, or two significant digits below 10 (a ViT-B/16 on a CPU
    trains at about 1 sample/s, which rounds to a misleading 0 or 1)."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2g}"


def _finite(step_loss: torch.Tensor, norm: torch.Tensor | None, params: list[nn.Parameter], amp_scaler: bool) -> bool:
    """Whether this step's loss and gradients are finite, agreed by every rank.

    NOTE: this costs one scalar device-to-host copy per step (the loop otherwise syncs only at log steps).
    Checking only at log steps would be free, but by then a NaN update has been applied and may have been
    checkpointed: the "last good state" would be gone. The copy waits for backward to finish, which on a
    GPU costs the launch overlap of one step (well under 1% for steps of 100 ms and more); on CPU it is
    free. We reuse the norm that gradient clipping already computed; without clipping we compute it.
    Gradients are all-reduced, so the norm agrees across DDP ranks; the loss is per-rank, hence any_true.
    With amp_fp16 the GradScaler already skips steps whose scaled gradients overflow (a normal part of
    finding the scale), so there only the loss is checked.
    """
    if amp_scaler:
        bad = ~torch.isfinite(step_loss)
    else:
        if norm is None:
            norm = grad_norm(params)
        bad = ~(torch.isfinite(step_loss) & torch.isfinite(norm.to(step_loss.device)))
    return not distributed.any_true(bool(bad.item()))


def _stop_nonfinite(state: TrainState, step_loss: torch.Tensor, hooks: Hooks, window: _Window) -> None:
    """``trainer.on_nonfinite=stop``: the weights are still those of the last good step; save them and stop.

    The saved data position is past the offending batch, so a resume does not replay it.
    """
    log.error(
        "step %d: non-finite loss or gradients (loss %s); trainer.on_nonfinite=stop: saving the last good "
        "state (step %d) and stopping",
        state.step + 1,
        float(step_loss),
        state.step,
    )
    state.window = window.saved()
    path = hooks.save(state)
    hooks.after_save(path)
    raise RunStopped(
        f"non-finite loss or gradients at step {state.step + 1}; the last good state is saved in {path}. "
        "Lower opt.lr or set trainer.grad_clip_norm, or set trainer.on_nonfinite=skip to skip such steps"
    )


def _failed(e: CheckpointError, cfg: TrainerConfig, last: bool) -> None:
    """One failed save, per ``trainer.on_save_error``: a warning and training goes on, or an error."""
    if cfg.on_save_error == "warn" and not last:
        log.warning(
            "%s; training continues without it (trainer.on_save_error=warn); the previous checkpoint is kept", e
        )
        return
    hint = "" if last else ", or set trainer.on_save_error=warn to keep training without this checkpoint"
    raise CheckpointError(f"{e}. The previous checkpoint is kept; free space in the run directory{hint}") from e


def _check(hooks: Hooks, cfg: TrainerConfig, block: bool = False) -> None:
    """A background (async) save that failed surfaces here, under the same ``trainer.on_save_error`` policy.

    With ``block`` it first waits for the save in flight, so its outcome is reported as its own (and not
    mistaken for the failure of the save about to start).
    """
    try:
        hooks.wait() if block else hooks.check()
    except CheckpointError as e:
        _failed(e, cfg, last=False)


def _save(state: TrainState, hooks: Hooks, cfg: TrainerConfig, last: bool) -> None:
    """Save per ``trainer.on_save_error``; the last save of a run (end or stop) must always succeed."""
    _check(hooks, cfg, block=last or cfg.ckpt_in_flight == "wait")
    try:
        # NOTE: the last save (end of run, or the requeue signal) blocks until committed, even when async.
        path = hooks.save(state, block=last)
    except CheckpointError as e:
        _failed(e, cfg, last)
        return
    hooks.after_save(path)
