"""One run, from a validated config to a trained, checkpointed model: ``run(cfg) -> objective``.

A :class:`Run` goes through three steps. ``setup``: device, storage, where it may resume from, the run
directory and its history, log files, the process group. ``resume``: build the parts and the state and load
the newest intact checkpoint into it, saying so first. ``train``: the syncer, the checkpointer, the metric
sinks and the loop. Every resource is entered into one ``ExitStack`` as it is made, so it is closed on every
path, in reverse: the checkpoint in flight commits, the metric files close, the final sync uploads them, the
process group goes. Only then is a preempted job handed back to SLURM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from types import TracebackType
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from runner import build, distributed, history, parallel
from runner.checkpoint import manifest
from runner.checkpoint.layout import CKPT_DIR
from runner.checkpoint.manifest import CheckpointRef
from runner.checkpoint.resume import find_resume, load_newest
from runner.checkpoint.save import Checkpointer, clean_partial
from runner.checkpoint.state import TrainState
from runner.config import ConfigError, ParallelConfig, TrainerConfig
from runner.launch.requeue import Preemption
from runner.naming import redact, redact_overrides, remove_if_empty
from runner.storage.local import atomic_write
from runner.sweep import member as sweep_member
from runner.sync import syncer as sync
from runner.train.data import TrainStream, eval_loader
from runner.train.loop import Context, Hooks, Loop
from runner.train.metrics import FanOut, make_sink

log = logging.getLogger("runner")

#: Sections whose values decide what is trained: their hash names a run's checkpoints in manifests.
TRAINED = ("model", "opt", "sched", "data")


def run(cfg: DictConfig) -> float:
    """Train ``cfg`` (validated: see ``runner.__main__.train``); returns the objective, the final eval top-1."""
    with contextlib.ExitStack() as stack:
        job = Run(cfg, stack)
        job.setup()
        job.resume()
        objective = job.train()
    if job.requeue is not None:
        # Every rank saved the checkpoint (committed: the checkpointer was closed) and rank 0 synced it.
        job.requeue.requeue()  # hands the job back to SLURM; does not return
    return objective


class Run:
    """One run's resources, made in :meth:`setup`, :meth:`resume` and :meth:`train`, closed by ``stack``."""

    def __init__(self, cfg: DictConfig, stack: contextlib.ExitStack) -> None:
        self.cfg, self.stack = cfg, stack
        self.name = str(cfg.name)
        self.run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else f"outputs/{self.name}"
        self.folder = os.path.join(self.run_dir, CKPT_DIR)
        self.env = distributed.detect()
        self.trainer: TrainerConfig = OmegaConf.to_object(cfg.trainer)  # type: ignore[assignment]
        self.parallel: ParallelConfig = OmegaConf.to_object(cfg.parallel)  # type: ignore[assignment]
        self.config_hash = manifest.config_hash(
            {k: OmegaConf.to_container(cfg[k], resolve=True) for k in TRAINED}, self.trainer.seed
        )
        #: Set when training stopped on the requeue signal: the job is handed back once everything is closed.
        self.requeue: Preemption | None = None
        self.forward: torch.nn.Module | None = None
        self.ckpt: Checkpointer | None = None
        #: This member's sweep-ledger writer (rank 0 of a sweep member), else None.
        self.member = sweep_member.current()
        if self.member is not None:  # what `runner.sweep resume` compares to refuse a changed config
            self.member.configured(self.config_hash)

    # ----------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Everything before the state is built: checks that need torch, storage, the run directory and its
        history, log files, the process group."""
        try:
            self.device = distributed.pick_device(self.trainer.device, self.env.local_rank)
            check_precision(self.trainer.precision, self.device)
            build.check_targets(self.cfg)
        except Exception:
            remove_if_empty(self.run_dir, os.getcwd())  # rejected before any work: nothing written
            raise
        self.storage = build.build_storage(self.cfg)
        self.plan = find_resume(self.trainer, self.run_dir, self.storage, self.name)
        os.makedirs(self.run_dir, exist_ok=True)
        self._fetch_history()
        # NOTE: before the download and the resume message, so a requeued job's own log says where it continued.
        add_log_file(self.run_dir, self.env.rank)
        if self.env.rank == 0:
            save_config(self.cfg, self.run_dir)
        if self.trainer.threads:
            torch.set_num_threads(self.trainer.threads)
        fsdp = self.parallel.kind == "fsdp"
        distributed.init(self.env, self.device, self.trainer.dist_timeout_s, alone=fsdp)
        self.stack.push(self._leave_group)
        if self.env.rank == 0:
            clean_partial(self.folder)
            if self.trainer.resume.strip() == "none":
                set_aside(self.run_dir)

    def _fetch_history(self) -> None:
        """Before anything appends to metrics.jsonl, tb/ or logs/: a resumed run's history is its own."""
        remote = self.storage.remote(self.name) if self.plan.checked else None
        if remote is None or self.trainer.resume.strip() == "none":
            return
        try:
            history.fetch(remote, self.run_dir, self.env.rank, replace=bool(self.plan.remote))
        except history.HistoryError:
            remove_if_empty(self.run_dir, os.getcwd())
            raise

    def _leave_group(self, kind: type[BaseException] | None, *_: object) -> None:
        # NOTE: drop the DDP wrapper while the process group is still registered. If its Reducer held the last
        # reference, the gloo group would be destroyed inside the Reducer's dealloc with the GIL held, while a
        # gloo worker thread waits for the GIL to free a finished work's tensor: a deadlock seen as a rank that
        # never exits after "finished". On an error the other ranks may never arrive: no barrier then.
        self.forward = None
        distributed.shutdown(together=kind is None)

    # ----------------------------------------------------------------------- resume
    def resume(self) -> None:
        """Build the parts and the state; load the newest intact checkpoint into it (announced first)."""
        self.parts, self.state, ref = load_newest(self.plan, self.folder, self._build_state, self._announce)
        if ref is None and self.env.rank == 0:
            log.info("run %r: starting fresh in %s", self.name, self.run_dir)
        if ref is not None:  # NOTE: every rank, in its own log file: each says what it loaded
            log.info("loaded checkpoint at step %d", self.state.step)
        self.resumed_step = ref.step if ref is not None else None
        if ref is not None and self.member is not None:
            self.member.resumed(ref.step, self.config_hash)
        world = distributed.world_size()
        self.global_batch = self.trainer.batch_size * world * self.trainer.grad_accum_steps
        self.eval_batch = self.trainer.eval_batch_size or 2 * self.trainer.batch_size
        log.info(
            "model %s: %.2fM parameters; global batch %d = %d per rank x %d ranks x %d accumulation; "
            "eval batch %d per rank; device %s",
            self.cfg.model.get("_target_"),
            sum(p.numel() for p in self.parts.model.parameters()) / 1e6,
            self.global_batch,
            self.trainer.batch_size,
            world,
            self.trainer.grad_accum_steps,
            self.eval_batch,
            self.device,
        )

    def _announce(self, ref: CheckpointRef) -> None:
        if self.env.rank == 0:
            log.info(
                "run %r: resuming from step %d (checkpoint %s). To start fresh instead: trainer.resume=none "
                "or another name=...",
                self.name,
                ref.step,
                ref.source,
            )

    def _build_state(self) -> tuple[build.Parts, TrainState]:
        """The run's parts and a fresh training state, seeded: the same every time it is called."""
        torch.manual_seed(self.trainer.seed)
        parts = build.build(self.cfg, self.device, self._prepare)
        rank, world = distributed.rank(), distributed.world_size()
        # Different ranks draw different RNG streams (dropout etc.); model init above was identical.
        torch.manual_seed(self.trainer.seed + rank)
        pin = self.device.type == "cuda"
        stream = TrainStream(
            parts.data.train, self.trainer.batch_size, self.trainer.seed, (rank, world), parts.data.num_workers, pin
        )
        scaler = torch.amp.GradScaler(self.device.type) if self.trainer.precision == "amp_fp16" else None
        return parts, TrainState(parts.model, parts.optimizer, stream, scaler)

    # ----------------------------------------------------------------------- train
    def train(self) -> float:
        """Train from the loaded state to ``trainer.max_steps``; returns the final eval top-1."""
        syncer = self._start_sync()
        ckpt = self._checkpointer(syncer)
        preemption = Preemption.install(self.env.rank)  # NOTE: after init: a signal in the rendezvous still counts
        if preemption is not None:
            self.stack.callback(preemption.restore)
        if self.state.step >= self.trainer.max_steps:
            top1 = self.state.last_eval.get("top1", float("nan"))
            log.info(
                "run %r is already complete at step %d (eval top-1 %.2f%%); nothing to do",
                self.name,
                self.state.step,
                100 * top1,
            )
            return float(top1)
        return self._fit(ckpt, syncer, preemption)

    def _start_sync(self) -> sync.Syncer | None:
        """Rank 0 mirrors the run directory; the final blocking sync runs when the stack closes."""
        if self.env.rank != 0:
            return None
        protect = {self.resumed_step} if self.resumed_step is not None else set()
        keep = self.trainer.keep_latest_k
        syncer = sync.for_run(self.storage, self.name, self.run_dir, keep, protect, owner=self.config_hash)
        if syncer is None:
            return None
        if not self.plan.checked:
            syncer.guard(resumed_step=self.resumed_step)

        def finish(kind: type[BaseException] | None, *_: object) -> None:
            # With an error in flight a failed final sync is logged and the original error propagates; after a
            # successful run it raises (exit non-zero). Local retention then deletes what is now confirmed.
            sync.finish(syncer, failed=kind is not None, on_done=self._retire)

        self.stack.push(finish)
        return syncer

    def _retire(self) -> None:
        if self.ckpt is not None:
            self.ckpt.retire()

    def _checkpointer(self, syncer: sync.Syncer | None) -> Checkpointer:
        uploaded = syncer.confirmed if syncer is not None else None
        ckpt = self.ckpt = Checkpointer(
            self.run_dir,
            self.trainer.keep_latest_k,
            self.config_hash,
            uploaded=uploaded,
            replicated=self.parallel.kind == "ddp",
            # NOTE: every rank creates the group here, in the same order, as new_group requires.
            group=distributed.side_group(self.trainer.dist_timeout_s) if self.trainer.async_ckpt else None,
        )
        self.stack.push(self._close_checkpointer)
        if self.trainer.async_ckpt:
            # NOTE: the loop calls fence() before each optimizer step, so copies may be deferred to the worker.
            pin = self.device.type == "cuda"
            ckpt.enable_async(self.trainer.ckpt_in_flight, pin=pin, defer_copy=True)
        if syncer is not None:
            syncer.start()
        return ckpt

    def _close_checkpointer(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Let the save in flight commit (first, so the final sync uploads it). With an error already
        propagating, a failed background save is logged (the original error wins); otherwise it is raised."""
        assert self.ckpt is not None
        if kind is None:
            self.ckpt.close()
            return
        try:
            self.ckpt.close()
        except Exception as e:
            log.error("the checkpoint in flight failed too: %s", e)

    def _fit(self, ckpt: Checkpointer, syncer: sync.Syncer | None, preemption: Preemption | None) -> float:
        rank, world = distributed.rank(), distributed.world_size()
        if rank == 0:
            history.rewind(self.run_dir, self.state.step)
        # NOTE: TensorBoard hides events of replayed steps from earlier event files (its purge_step). Closed
        # before the final sync (pushed after it), so the remote gets complete event files.
        sink = make_sink(self.run_dir, rank, purge_step=self.state.step + 1)
        if self.member is not None:  # the member's latest step in the sweep ledger, at the log cadence
            sink = FanOut(sink, sweep_member.ProgressSink(self.member))
        sink = self.stack.enter_context(contextlib.closing(sink))
        self.forward = parallel.wrap(self.parts.model, self.parallel, self.device, self.trainer.compile)
        hooks = Hooks(save=ckpt.save, check=ckpt.check, wait=ckpt.wait, before_update=ckpt.fence)
        if preemption is not None:
            hooks.should_stop = preemption.requested
        if syncer is not None:  # after each checkpoint: the syncer's lag, bytes and throughput as sync/* scalars
            hooks.after_save = lambda path: sink.log(self.state.step, syncer.metrics(), prefix="sync")
        evals = eval_loader(self.parts.data.eval, self.eval_batch, rank, world, self.parts.data.num_workers)
        context = Context(self.device, self.global_batch, sink, hooks, show_progress=rank == 0)
        started = time.perf_counter()
        outcome = Loop(self.state, self.forward, self.parts.schedule, evals, self.trainer, context).fit()
        if outcome.stopped_early:
            log.warning("run %r: checkpoint saved at step %d on the requeue signal", self.name, outcome.step)
            self.requeue = preemption
            return float("nan")  # Not reached on SLURM: the requeue ends the process.
        top1 = outcome.last_eval.get("top1", float("nan"))
        log.info(
            "finished at step %d in %.1fs: eval top-1 %.2f%% (chance %.2f%%), loss %.4f",
            outcome.step,
            time.perf_counter() - started,
            100 * top1,
            100 / self.parts.data.num_classes,
            outcome.last_eval.get("loss", 0.0),
        )
        sink.hparams(hparams(self.cfg), {"top1": top1, "loss": outcome.last_eval.get("loss", float("nan"))})
        return float(top1)

    def _prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return parallel.prepare(model, self.parallel, self.trainer.activation_checkpointing, self.device)


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("trainer.precision: bf16 is not supported on this GPU; use amp_fp16 or fp32")


def add_log_file(run_dir: str, rank: int) -> None:
    """Every rank logs to ``logs/rank<N>.log``; only rank 0 talks on the console."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    handler = logging.FileHandler(os.path.join(run_dir, "logs", f"rank{rank}.log"))
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)
    if rank != 0:
        for h in logging.getLogger().handlers:
            if h is not handler and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)


def save_config(cfg: DictConfig, run_dir: str) -> None:
    """``.hydra/config.yaml`` and ``overrides.yaml``, secrets redacted (runner writes them, not Hydra)."""
    folder = os.path.join(run_dir, ".hydra")
    container = redact(OmegaConf.to_container(cfg, resolve=True))
    atomic_write(os.path.join(folder, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(container)).encode())
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    safe = OmegaConf.to_yaml(OmegaConf.create(redact_overrides(overrides)))
    atomic_write(os.path.join(folder, "overrides.yaml"), safe.encode())


def set_aside(run_dir: str) -> None:
    """``trainer.resume=none`` in a used run directory: keep the old checkpoints, metrics and events, renamed."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (CKPT_DIR, history.METRICS, "tb"):
        old = os.path.join(run_dir, name)
        if os.path.exists(old):
            new = f"{old}.replaced-{stamp}"
            os.replace(old, new)
            log.warning("trainer.resume=none: moved the previous %s to %s", name, new)


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """The hyperparameters TensorBoard's HParams view compares (secrets redacted)."""
    flat: dict[str, Any] = {}
    for section in ("model", "opt", "sched", "trainer"):
        node = redact(OmegaConf.to_container(cfg[section], resolve=True))
        assert isinstance(node, dict)
        for k, v in node.items():
            if not str(k).startswith("_"):
                flat[f"{section}.{k!s}"] = v
    return flat
