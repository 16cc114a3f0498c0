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
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


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


def fit(
    state: TrainState,
    forward: nn.Module,
    schedule: Schedule,
    eval_batches: Iterable[Any],
    cfg: TrainerConfig,
    device: torch.device,
    sink: Sink,
    hooks: Hooks,
    global_batch: int,
    show_progress: bool = True,
) -> Outcome:
    """Train ``state`` from ``state.step`` to ``cfg.max_steps``; returns where it stopped and the last eval."""
    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = isinstance(forward, nn.parallel.DistributedDataParallel)
    model.train()

    loss_sum = torch.tensor(float(state.window.get("loss_sum", 0.0)), dtype=torch.float32, device=device)
    step_loss = torch.zeros((), dtype=torch.float32, device=device)  # reused: no allocation per step
    count = int(state.window.get("count", 0))
    timing = {"step": 0.0, "data": 0.0}
    last_norm: torch.Tensor | None = None

    bar = tqdm(
        total=cfg.max_steps,
        initial=state.step,
        disable=not show_progress,
        dynamic_ncols=True,
        mininterval=1.0,
        desc="train",
        unit="step",
    )
    outcome = Outcome(step=state.step, last_eval=dict(state.last_eval))
    try:
        while state.step < cfg.max_steps:
            _check(hooks, cfg)
            started = time.perf_counter()
            set_lr(optimizer, schedule(state.step))
            step_loss.zero_()
            for micro in range(cfg.grad_accum_steps):
                waited = time.perf_counter()
                images, labels = next(state.data)
                timing["data"] += time.perf_counter() - waited
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                last_micro = micro == cfg.grad_accum_steps - 1
                no_sync = cast(Any, forward).no_sync() if ddp and not last_micro else contextlib.nullcontext()
                with no_sync:
                    with autocast(device, cfg.precision):
                        logits = forward(images)
                    loss = F.cross_entropy(logits.float(), labels) / cfg.grad_accum_steps
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += loss.detach()

            hooks.before_update()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.grad_clip_norm > 0:
                last_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
            finite = _finite(step_loss, last_norm if cfg.grad_clip_norm > 0 else None, params, scaler is not None)
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                if cfg.on_nonfinite == "stop":
                    _stop_nonfinite(state, step_loss, hooks, loss_sum, count)
                state.skipped_steps += 1
                log.warning(
                    "step %d: non-finite loss or gradients (loss %s); update skipped, %d skipped so far "
                    "(trainer.on_nonfinite=skip)",
                    state.step + 1,
                    float(step_loss),
                    state.skipped_steps,
                )
            elif scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            # A skipped step still consumes its batch and its place in the schedule, so step counts,
            # cadences and the data position stay those of an uninterrupted run.
            state.step += 1
            if finite:  # the logged mean loss is over the steps that updated the weights
                loss_sum += step_loss
                count += 1
            timing["step"] += time.perf_counter() - started
            final = state.step >= cfg.max_steps

            if state.step % cfg.log_every == 0 or final:
                norm = last_norm if last_norm is not None else grad_norm(params)
                # NOTE: a collective at log steps only (same steps on every rank): the logged loss is the
                # global batch's, so a 2-rank run logs the same curve as one process with the whole batch.
                mean_loss = (distributed.all_mean(loss_sum) / max(count, 1)).item()
                step_time = timing["step"] / max(count, 1)
                values = {
                    "loss": mean_loss,
                    "lr": float(optimizer.param_groups[0]["lr"]),
                    "grad_norm": float(norm),
                    "samples_per_s": global_batch / step_time if step_time > 0 else 0.0,
                    "step_time_s": step_time,
                    "data_wait_frac": timing["data"] / timing["step"] if timing["step"] > 0 else 0.0,
                    "skipped_steps": float(state.skipped_steps),
                }
                sink.log(state.step, values)
                bar.set_postfix(loss=f"{mean_loss:.4f}", sps=_rate(values["samples_per_s"]), refresh=False)
                if not math.isfinite(mean_loss):
                    log.warning("step %d: loss is %s", state.step, mean_loss)
                loss_sum.zero_()
                count = 0
                timing = {"step": 0.0, "data": 0.0}
            optimizer.zero_grad(set_to_none=True)

            if state.step % cfg.eval_every == 0 or final:
                outcome.last_eval = evaluate(
                    model, eval_batches, device, cfg.precision, cfg.eval_batches, show_progress=show_progress
                )
                state.last_eval = dict(outcome.last_eval)
                sink.log(state.step, outcome.last_eval, prefix="eval")
                log.info(
                    "step %d: eval loss %.4f, top-1 %.2f%%",
                    state.step,
                    outcome.last_eval["loss"],
                    100 * outcome.last_eval["top1"],
                )

            stop = distributed.any_true(hooks.should_stop())
            if state.step % cfg.ckpt_every == 0 or final or stop:
                state.window = {"loss_sum": float(loss_sum.item()), "count": count}
                _save(state, hooks, cfg, last=final or stop)
            bar.update(1)
            outcome.step = state.step
            if stop and not final:
                log.warning("stopping at step %d on request (checkpoint saved)", state.step)
                outcome.stopped_early = True
                break
    finally:
        bar.close()
    return outcome


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


def _stop_nonfinite(
    state: TrainState, step_loss: torch.Tensor, hooks: Hooks, loss_sum: torch.Tensor, count: int
) -> None:
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
    state.window = {"loss_sum": float(loss_sum.item()), "count": count}
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
