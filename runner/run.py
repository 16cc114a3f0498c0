"""One run, from a composed config to a trained, checkpointed model: ``run(cfg) -> objective``.

Order matters: validate before anything touches disk; find the checkpoints it may resume from; build and
load the newest intact one (:mod:`runner.checkpoint.resume`) and say so on the first lines; start the syncer; train;
close resources on every path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from runner import build, distributed, history
from runner.checkpoint.layout import CKPT_DIR
from runner.checkpoint.manifest import CheckpointRef
from runner.checkpoint.resume import find_resume, load_newest
from runner.checkpoint.save import Checkpointer, clean_partial
from runner.checkpoint.state import TrainState
from runner.config import ConfigError, TrainerConfig, validate
from runner.launch.requeue import Preemption
from runner.naming import SECRET_KEY, remove_if_empty
from runner.sync import syncer as sync
from runner.train.data import TrainStream, eval_loader
from runner.train.loop import Hooks, fit
from runner.train.metrics import Sink, make_sink

log = logging.getLogger("runner")

_SECRET = SECRET_KEY
REDACTED = "***"


def redact(obj: Any) -> Any:
    """A copy with every value under a secret-looking key replaced by ``***``."""
    if isinstance(obj, dict):
        return {k: (REDACTED if _SECRET.search(str(k)) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def config_hash(cfg: DictConfig) -> str:
    """Hash of what is trained (model, opt, sched, data, seed): not of cadence or storage settings."""
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "opt", "sched", "data")}
    keep["seed"] = int(cfg.trainer.seed)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device: cuda requested but no CUDA device is visible; use trainer.device=cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("trainer.precision: bf16 is not supported on this GPU; use amp_fp16 or fp32")


def _add_log_file(run_dir: str, rank: int) -> None:
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    handler = logging.FileHandler(os.path.join(run_dir, "logs", f"rank{rank}.log"))
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)
    if rank != 0:  # Only rank 0 talks on the console; every rank keeps its own file.
        for h in logging.getLogger().handlers:
            if h is not handler and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)


def _save_config(cfg: DictConfig, run_dir: str) -> None:
    from runner.storage.local import atomic_write

    folder = os.path.join(run_dir, ".hydra")
    container = redact(OmegaConf.to_container(cfg, resolve=True))
    atomic_write(os.path.join(folder, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(container)).encode())
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    # NOTE: the whole override is searched, not just its key: `storage.client_kwargs={api_token: x}`.
    safe = [o if not _SECRET.search(o) else f"{o.split('=', 1)[0]}={REDACTED}" for o in overrides]
    atomic_write(os.path.join(folder, "overrides.yaml"), OmegaConf.to_yaml(OmegaConf.create(safe)).encode())


def run(cfg: DictConfig) -> float:
    run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.path.join("outputs", cfg.name)
    env = distributed.detect()
    try:
        validate(cfg)
        trainer: TrainerConfig = OmegaConf.to_object(cfg.trainer)  # type: ignore[assignment]
        device = pick_device(trainer.device, env.local_rank)
        check_precision(trainer.precision, device)
        build.check_targets(cfg)
    except Exception:
        remove_if_empty(run_dir, os.getcwd())
        raise
    name = str(cfg.name)
    if trainer.max_steps == 0:
        remove_if_empty(run_dir, os.getcwd())
        log.info("run %r: config valid; trainer.max_steps=0 (dry run), so nothing to train", name)
        return float("nan")
    plugin = build.build_storage(cfg)

    plan = find_resume(trainer, run_dir, plugin, name)
    os.makedirs(run_dir, exist_ok=True)
    remote = plugin.remote(name) if plan.checked and trainer.resume.strip() != "none" else None
    if remote is not None:
        # NOTE: before this rank opens its log file, and before rank 0 opens metrics.jsonl and TensorBoard: a
        # resumed process appends to the history it fetched, so the first sync cannot overwrite it.
        try:
            history.fetch(remote, run_dir, env.rank, replace=bool(plan.remote))
        except history.HistoryError:
            remove_if_empty(run_dir, os.getcwd())
            raise
    # NOTE: before the download and the resume message, so a requeued job's own log file says where it
    # continued from.
    _add_log_file(run_dir, env.rank)
    if env.rank == 0:
        _save_config(cfg, run_dir)

    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    distributed.init(env, device, trainer.dist_timeout_s)
    folder = os.path.join(run_dir, CKPT_DIR)
    if env.rank == 0:
        clean_partial(folder)
        if trainer.resume.strip() == "none":
            _set_aside(run_dir)

    def announce(ref: CheckpointRef) -> None:
        if env.rank == 0:
            log.info(
                "run %r: resuming from step %d (checkpoint %s). To start fresh instead: trainer.resume=none "
                "or another name=...",
                name,
                ref.step,
                ref.source,
            )

    try:
        parts, state, ref = load_newest(plan, folder, lambda: _build_state(cfg, trainer, device), announce)
    except BaseException:
        distributed.shutdown(together=False)
        raise
    if env.rank == 0 and ref is None:
        log.info("run %r: starting fresh in %s", name, run_dir)
    if ref is not None:  # NOTE: every rank, in its own log file: each says what it loaded
        log.info("loaded checkpoint at step %d", state.step)
    world, rank = distributed.world_size(), distributed.rank()
    global_batch = trainer.batch_size * world * trainer.grad_accum_steps
    eval_batch = trainer.eval_batch_size or 2 * trainer.batch_size
    log.info(
        "model %s: %.2fM parameters; global batch %d = %d per rank x %d ranks x %d accumulation; "
        "eval batch %d per rank; device %s",
        cfg.model.get("_target_"),
        sum(p.numel() for p in parts.model.parameters()) / 1e6,
        global_batch,
        trainer.batch_size,
        world,
        trainer.grad_accum_steps,
        eval_batch,
        device,
    )
    # Rank 0 mirrors the run directory; local retention waits for each checkpoint to be confirmed there.
    syncer = None
    if env.rank == 0:
        protect = {ref.step} if ref is not None else set()
        syncer = sync.for_run(plugin, name, run_dir, trainer.keep_latest_k, protect, owner=config_hash(cfg))
        if syncer is not None and not plan.checked:
            syncer.guard(resumed_step=ref.step if ref is not None else None)
    ckpt = Checkpointer(run_dir, trainer.keep_latest_k, config_hash(cfg), uploaded=syncer.confirmed if syncer else None)
    _maybe_async(ckpt, trainer, env.world_size, device)
    if syncer is not None:
        syncer.start()
    # NOTE: after init, so a signal during the rendezvous is still seen at the first step boundary.
    preemption = Preemption.install(env.rank)
    requeue: Preemption | None = None
    clean = False  # set on every normal return: ranks then leave the process group together
    # NOTE: on the requeue signal fit() saves and returns; the final blocking sync in `finally` below
    # then runs before the job is handed back to SLURM.
    sink = None
    forward: torch.nn.Module | None = None
    try:
        if state.step >= trainer.max_steps:
            top1 = state.last_eval.get("top1", float("nan"))
            log.info(
                "run %r is already complete at step %d (eval top-1 %.2f%%); nothing to do",
                name,
                state.step,
                100 * top1,
            )
            clean = True
            return float(top1)

        if rank == 0:
            history.rewind(run_dir, state.step)
        # NOTE: TensorBoard hides events of replayed steps from earlier event files (its purge_step).
        sink = make_sink(run_dir, rank, purge_step=state.step + 1)
        forward = parts.model
        if trainer.compile:
            forward = torch.compile(forward)  # type: ignore[assignment]
        if world > 1:
            forward = torch.nn.parallel.DistributedDataParallel(
                forward, device_ids=[device.index] if device.type == "cuda" else None
            )
        evals = eval_loader(parts.data.eval, eval_batch, rank, world, parts.data.num_workers)
        hooks = Hooks(
            save=ckpt.save,
            check=ckpt.check,
            wait=ckpt.wait,
            before_update=ckpt.fence,
            should_stop=preemption.requested if preemption else Hooks.should_stop,
        )
        if syncer is not None:
            hooks.after_save = _sync_metrics(syncer, state, sink)
        started = time.perf_counter()
        outcome = fit(
            state,
            forward,
            parts.schedule,
            evals,
            trainer,
            device,
            sink,
            hooks,
            global_batch,
            show_progress=rank == 0,
        )
        if outcome.stopped_early:
            log.warning("run %r: checkpoint saved at step %d on the requeue signal", name, outcome.step)
            requeue, clean = preemption, True
            return float("nan")  # Not reached on SLURM: the requeue below ends the process.
        top1 = outcome.last_eval.get("top1", float("nan"))
        chance = 1.0 / parts.data.num_classes
        log.info(
            "finished at step %d in %.1fs: eval top-1 %.2f%% (chance %.2f%%), loss %.4f",
            outcome.step,
            time.perf_counter() - started,
            100 * top1,
            100 * chance,
            outcome.last_eval.get("loss", 0.0),
        )
        sink.hparams(_hparams(cfg), {"top1": top1, "loss": outcome.last_eval.get("loss", float("nan"))})
        clean = True
        return float(top1)
    finally:
        try:
            _close_checkpointer(ckpt)  # NOTE: first, so the final sync uploads the last checkpoint.
        finally:
            if sink is not None:
                sink.close()  # NOTE: before the final sync, so the remote gets complete event files.
            # NOTE: in a finally block sys.exc_info() is the exception in flight, if any: with one, a failed
            # final sync is logged and the original error propagates; without, it raises (exit non-zero).
            try:
                sync.finish(syncer, failed=sys.exc_info()[0] is not None, on_done=ckpt.retire)
            finally:
                # NOTE: drop the DDP wrapper while the process group is still registered. If its Reducer
                # held the last reference, the gloo group would be destroyed inside the Reducer's dealloc
                # with the GIL held, while a gloo worker thread waits for the GIL to free a finished work's
                # tensor: a deadlock seen as a rank that never exits after "finished".
                forward = None
                distributed.shutdown(together=clean)
        if requeue is not None:
            # Every rank saved the checkpoint above (committed: the checkpointer was closed) and rank 0
            # synced it; hand the job back to SLURM.
            requeue.requeue()
        elif preemption is not None:
            preemption.restore()


def _build_state(cfg: DictConfig, trainer: TrainerConfig, device: torch.device) -> tuple[build.Parts, TrainState]:
    """The run's parts and a fresh training state, seeded: the same every time it is called."""
    torch.manual_seed(trainer.seed)
    parts = build.build(cfg, device)
    rank, world = distributed.rank(), distributed.world_size()
    # Different ranks draw different RNG streams (dropout etc.); model init above was identical.
    torch.manual_seed(trainer.seed + rank)
    stream = TrainStream(
        parts.data.train,
        trainer.batch_size,
        trainer.seed,
        rank,
        world,
        parts.data.num_workers,
        pin=device.type == "cuda",
    )
    scaler = torch.amp.GradScaler(device.type) if trainer.precision == "amp_fp16" else None
    return parts, TrainState(parts.model, parts.optimizer, stream, scaler)


def _sync_metrics(syncer: sync.Syncer, state: TrainState, sink: Sink) -> Callable[[str], None]:
    """After each checkpoint: the syncer's lag, bytes and throughput as ``sync/*`` scalars."""
    return lambda path: sink.log(state.step, syncer.metrics(), prefix="sync")


def _maybe_async(ckpt: Checkpointer, trainer: TrainerConfig, world: int, device: torch.device) -> None:
    from runner.checkpoint.async_save import async_possible

    if not trainer.async_ckpt:
        return
    if not async_possible(world):
        log.info("trainer.async_ckpt: %d ranks, so checkpoints are written synchronously", world)
        return
    # NOTE: fit() calls ckpt.fence() before each optimizer step, so copies may be deferred to the worker.
    ckpt.enable_async(trainer.ckpt_in_flight, pin=device.type == "cuda", defer_copy=True)


def _close_checkpointer(ckpt: Checkpointer) -> None:
    """Let the save in flight commit. NOTE: in a ``finally``: with an error already propagating, a failed
    background save is logged (the original error wins); otherwise it is raised (exit non-zero)."""
    if sys.exc_info()[0] is None:
        ckpt.close()
        return
    try:
        ckpt.close()
    except Exception as e:
        log.error("the checkpoint in flight failed too: %s", e)


def _set_aside(run_dir: str) -> None:
    """``trainer.resume=none`` in a used run directory: keep the old checkpoints and metrics, renamed."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (CKPT_DIR, history.METRICS, "tb"):
        old = os.path.join(run_dir, name)
        if os.path.exists(old):
            new = f"{old}.replaced-{stamp}"
            os.replace(old, new)
            log.warning("trainer.resume=none: moved the previous %s to %s", name, new)


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section in ("model", "opt", "sched", "trainer"):
        node = redact(OmegaConf.to_container(cfg[section], resolve=True))
        assert isinstance(node, dict)
        for k, v in node.items():
            if not str(k).startswith("_"):
                flat[f"{section}.{k!s}"] = v
    return flat
