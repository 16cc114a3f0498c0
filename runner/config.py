"""Typed schemas for every config group, registered in Hydra's ConfigStore.

YAML files under ``conf/`` hold values only; each pulls its schema in with
``defaults: [/schema/<group>/<name>@_here_]`` so types are checked when Hydra composes.
Range checks live in ``__post_init__`` and run in :func:`validate`, before any work starts.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value a user must fix; reported as one line with exit code 2."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$")
_UNIT_S = {None: 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | float | int, key: str = "duration") -> float:
    """Seconds from ``90``, ``90s``, ``5m``, ``1h`` or ``1d``."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ConfigError(f"{key}={value!r}: not a duration; use seconds or a unit, e.g. 90s, 5m, 1h")
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    _require(seconds > 0, key, f"must be positive, got {value!r}")
    return seconds


# --------------------------------------------------------------------------- model
@dataclass
class ViTConfig:
    _target_: str = "runner.models.vit.VisionTransformer"
    # Input resolution in pixels (square); defaults to data.image_size.
    image_size: int = MISSING
    patch_size: int = 16
    in_chans: int = 3
    # Output classes; defaults to data.num_classes.
    num_classes: int = MISSING
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "depth", "heads", "num_classes"):
            value = getattr(self, name)
            _require(value >= 1, f"model.{name}", f"must be >= 1, got {value}")
        _require(
            self.image_size % self.patch_size == 0,
            "model.image_size",
            f"{self.image_size} is not divisible by model.patch_size={self.patch_size}; "
            "choose a model.patch_size that divides it",
        )
        _require(
            self.width % self.heads == 0,
            "model.width",
            f"{self.width} is not divisible by model.heads={self.heads}; choose a model.heads that divides it",
        )
        _require(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")


# --------------------------------------------------------------------------- optimizer
@dataclass
class OptimConfig:
    _target_: str = MISSING
    # Optimizers need parameters: the config is a partial, completed in runner.build.
    _partial_: bool = True
    lr: float = 1e-3
    # Applied to weights only; biases, norms and scalars (ndim < 2) get none.
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, "opt.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "opt.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass
class AdamWConfig(OptimConfig):
    _target_: str = "torch.optim.AdamW"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(len(self.betas) == 2, "opt.betas", f"needs two values, got {list(self.betas)}")
        _require(
            all(0 <= b < 1 for b in self.betas),
            "opt.betas",
            f"each must be in [0, 1), got {list(self.betas)}",
        )
        _require(self.eps > 0, "opt.eps", f"must be > 0, got {self.eps}")


@dataclass
class SGDConfig(OptimConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.momentum >= 0, "opt.momentum", f"must be >= 0, got {self.momentum}")
        _require(not self.nesterov or self.momentum > 0, "opt.nesterov", "needs opt.momentum > 0")


# --------------------------------------------------------------------------- schedule
@dataclass
class ScheduleConfig:
    _target_: str = MISSING
    # Linear warmup from ~0 to opt.lr over this many steps.
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "sched.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class CosineConfig(ScheduleConfig):
    _target_: str = "runner.train.optim.CosineSchedule"
    # Final learning rate as a fraction of opt.lr.
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 <= self.min_lr_ratio <= 1, "sched.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class ConstConfig(ScheduleConfig):
    _target_: str = "runner.train.optim.ConstSchedule"


@dataclass
class ConstCooldownConfig(ScheduleConfig):
    _target_: str = "runner.train.optim.ConstCooldownSchedule"
    # Steps at the end of training over which the rate decays to cooldown_end_ratio * opt.lr.
    cooldown_steps: int = 100
    cooldown_power: float = 1.0
    cooldown_end_ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.cooldown_steps >= 1, "sched.cooldown_steps", f"must be >= 1, got {self.cooldown_steps}")
        _require(self.cooldown_power > 0, "sched.cooldown_power", f"must be > 0, got {self.cooldown_power}")


# --------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    _target_: str = MISSING
    image_size: int = 32
    num_classes: int = 10
    # Loader worker processes per rank (0 = load in the training process).
    num_workers: int = 0

    def __post_init__(self) -> None:
        _require(self.image_size >= 1, "data.image_size", f"must be >= 1, got {self.image_size}")
        _require(self.num_classes >= 2, "data.num_classes", f"must be >= 2, got {self.num_classes}")
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass
class SyntheticConfig(DataConfig):
    _target_: str = "runner.train.data.synthetic_splits"
    train_size: int = 8192
    eval_size: int = 1024
    # Pixel noise around each class pattern; higher is harder.
    noise: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.train_size >= 1, "data.train_size", f"must be >= 1, got {self.train_size}")
        _require(self.eval_size >= 1, "data.eval_size", f"must be >= 1, got {self.eval_size}")
        _require(self.noise >= 0, "data.noise", f"must be >= 0, got {self.noise}")


class Transform(enum.StrEnum):
    """How an image becomes a model input, for training and evaluation at once (runner/train/data.py)."""

    # Both splits: the whole image resized to data.image_size (squashed if it is not square); no augmentation.
    resize = "resize"
    # Training: a random-resized crop (area data.rrc_scale, aspect data.rrc_ratio) resized to data.image_size,
    # then a flip.
    # Evaluation: the centred square of data.eval_crop_pct of the short side, resized to data.image_size.
    rrc = "rrc"


@dataclass
class ImageFolderConfig(DataConfig):
    _target_: str = "runner.train.data.imagefolder_splits"
    # Any fsspec URL holding train/<class>/<image> (and optionally val/<class>/<image>).
    root: str = MISSING
    train_split: str = "train"
    eval_split: str = "val"
    num_workers: int = 4
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # The recipe for both splits, so they agree by construction: resize or rrc (see Transform; docs/data.md).
    transform: Transform = Transform.resize
    # Training only: mirror each image left-right with probability 1/2. null = the recipe's: rrc flips, resize
    # does not (a mirrored digit or letter is another image; set true for photos).
    flip: bool | None = None
    # transform=rrc: the crop's area as a fraction of the image's, drawn uniformly in [low, high].
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # transform=rrc: the crop's aspect ratio (width / height), drawn log-uniformly in [low, high].
    rrc_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    # transform=rrc: evaluation keeps the centred square of this fraction of the short side (timm's crop_pct).
    eval_crop_pct: float = 0.875

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("mean", "std"):
            values = list(getattr(self, name))
            _require(len(values) == 3, f"data.{name}", f"needs one value per RGB channel (3), got {values}")
        _require(all(s > 0 for s in self.std), "data.std", f"each must be > 0, got {list(self.std)}")
        low, high = _pair(self.rrc_scale, "data.rrc_scale")
        _require(0 < low <= high <= 1, "data.rrc_scale", f"needs 0 < low <= high <= 1, got {list(self.rrc_scale)}")
        low, high = _pair(self.rrc_ratio, "data.rrc_ratio")
        _require(0 < low <= high, "data.rrc_ratio", f"needs 0 < low <= high, got {list(self.rrc_ratio)}")
        _require(0 < self.eval_crop_pct <= 1, "data.eval_crop_pct", f"must be in (0, 1], got {self.eval_crop_pct}")


def _pair(values: list[float], key: str) -> tuple[float, float]:
    _require(len(values) == 2, key, f"needs two values [low, high], got {list(values)}")
    return float(values[0]), float(values[1])


# --------------------------------------------------------------------------- storage
@dataclass
class StorageConfig:
    _target_: str = "runner.storage.StorageSettings.from_config"
    # Remote root for run directories (s3://bucket/prefix); empty = local only.
    url: str = ""
    # S3-compatible endpoint, e.g. http://127.0.0.1:9000; empty = AWS.
    endpoint_url: str = ""
    region: str = ""
    # Background sync interval: seconds or 30s / 5m / 1h.
    sync_every: str = "5m"
    # Glob patterns (relative to the run directory) never uploaded.
    exclude: list[str] = field(default_factory=lambda: ["*.tmp", "*.tmp/*", "logs/*"])
    # Extra keyword arguments for the S3 (boto3) client (no secrets: use the AWS credential chain).
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_duration(self.sync_every, "storage.sync_every")


# --------------------------------------------------------------------------- trainer
# NOTE: choices are StrEnums (OmegaConf 2.3 has no Literal): the schema itself rejects any other value at
# compose time, and a member compares equal to its string ("fp32"), so code reads it as a plain str.
class Precision(enum.StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    amp_fp16 = "amp_fp16"


class InFlight(enum.StrEnum):
    wait = "wait"
    skip = "skip"


class Device(enum.StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class OnNonfinite(enum.StrEnum):
    stop = "stop"
    skip = "skip"


class OnSaveError(enum.StrEnum):
    fail = "fail"
    warn = "warn"


@dataclass
class TrainerConfig:
    # Optimizer steps to train to. 0 = a dry run: validate the config and exit; nothing is built or written
    # (e.g. to check every member of a sweep on the nodes it will run on).
    max_steps: int = 300
    # Per-rank batch size; global batch = batch_size x world size x grad_accum_steps.
    batch_size: int = 64
    grad_accum_steps: int = 1
    # fp32, bf16 or amp_fp16 (autocast; amp_fp16 adds a GradScaler).
    precision: Precision = Precision.fp32
    # Clip the global gradient norm to this value; 0 disables clipping.
    grad_clip_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    # Batches per evaluation (0 = the whole eval split).
    eval_batches: int = 0
    # Per-rank evaluation batch size; null = 2 x batch_size (evaluation keeps no activations for backward).
    eval_batch_size: int | None = None
    # Save a checkpoint every N steps (and always at the end).
    ckpt_every: int = 100
    keep_latest_k: int = 2
    # Write checkpoints in the background (snapshot to CPU, then train on); single-process runs only,
    # runs with several ranks save synchronously (see runner/async_save.py).
    async_ckpt: bool = True
    # When a checkpoint is due while the previous one is still being written: wait for it, or skip this one.
    ckpt_in_flight: InFlight = InFlight.wait
    seed: int = 0
    # Wrap the model in torch.compile.
    compile: bool = False
    # Recompute each block's activations in backward instead of keeping them (less memory, ~1/3 more
    # compute); which modules are blocks: parallel.blocks.
    activation_checkpointing: bool = False
    # auto (newest valid checkpoint of this run), none (start fresh) or a checkpoint path/URL.
    resume: str = "auto"
    # Torch intra-op threads (0 = torch's default).
    threads: int = 0
    # auto (CUDA when visible), cpu or cuda.
    device: Device = Device.auto
    # A step whose gradient norm is NaN/Inf: stop (save the last good state, exit non-zero) or skip it
    # (no update; counted as train/skipped_steps).
    on_nonfinite: OnNonfinite = OnNonfinite.stop
    # A checkpoint save that fails mid-run (e.g. disk full): fail (exit non-zero) or warn and keep training.
    # The final save of a run always fails loudly.
    on_save_error: OnSaveError = OnSaveError.fail
    # Seconds a collective waits for the other ranks before failing (a hung rank). A rank that dies is
    # noticed at once (its connections close); this bounds the wait for one that hangs.
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _require(self.max_steps >= 0, "trainer.max_steps", f"must be >= 0 (0 = dry run), got {self.max_steps}")
        for name in ("batch_size", "grad_accum_steps", "log_every", "eval_every", "ckpt_every"):
            value = getattr(self, name)
            _require(value >= 1, f"trainer.{name}", f"must be >= 1, got {value}")
        _require(self.keep_latest_k >= 1, "trainer.keep_latest_k", f"must be >= 1, got {self.keep_latest_k}")
        _require(self.eval_batches >= 0, "trainer.eval_batches", f"must be >= 0, got {self.eval_batches}")
        _require(
            self.eval_batch_size is None or self.eval_batch_size >= 1,
            "trainer.eval_batch_size",
            f"must be >= 1 (or null = 2 x trainer.batch_size), got {self.eval_batch_size}",
        )
        _require(self.grad_clip_norm >= 0, "trainer.grad_clip_norm", f"must be >= 0, got {self.grad_clip_norm}")
        _require(self.threads >= 0, "trainer.threads", f"must be >= 0, got {self.threads}")
        _require(self.dist_timeout_s > 0, "trainer.dist_timeout_s", f"must be > 0 seconds, got {self.dist_timeout_s}")
        _require(bool(self.resume.strip()), "trainer.resume", "must be auto, none or a checkpoint path")


# --------------------------------------------------------------------------- parallel
class ParallelKind(enum.StrEnum):
    ddp = "ddp"
    fsdp = "fsdp"


class Dtype(enum.StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class ParallelConfig:
    # ddp: every rank holds the whole model, gradients are all-reduced. fsdp: parameters, gradients and
    # optimizer state are sharded over the ranks (FSDP2 fully_shard on each block and at the root).
    kind: ParallelKind = ParallelKind.ddp
    # Module classes (by name) that are blocks: each is sharded as one unit (fsdp) and checkpointed as one
    # (trainer.activation_checkpointing). Empty = the model's repeated blocks (runner's ViT: Block).
    blocks: list[str] = field(default_factory=list)
    # fsdp: free each block's gathered parameters after its forward (less memory, one more all-gather in
    # backward).
    reshard_after_forward: bool = True
    # fsdp mixed precision: dtype of the parameters in compute, and of the gradient reduction (null = the
    # parameters' own, fp32). Stored parameters and optimizer state stay fp32.
    param_dtype: Dtype | None = None
    reduce_dtype: Dtype | None = None


# --------------------------------------------------------------------------- root
@dataclass
class RunConfig:
    # Run name: the run directory and the remote prefix. Derived from the overrides by default.
    name: str = MISSING
    model: Any = MISSING
    opt: Any = MISSING
    sched: Any = MISSING
    data: Any = MISSING
    storage: StorageConfig = MISSING
    trainer: TrainerConfig = MISSING
    parallel: ParallelConfig = MISSING


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,=+-]*$")


def check_name(name: str) -> str:
    """A run name is one path component that cannot escape the run root."""
    ok = bool(_SAFE_NAME.match(name)) and ".." not in name and len(name) <= 200
    _require(ok, "name", f"{name!r} is not a safe run name; use letters, digits and _ . , = + -")
    return name


def check_combinations(cfg: DictConfig) -> None:
    """Checks across groups, which no single schema's ``__post_init__`` can see."""
    trainer = cfg.trainer
    train_size = cfg.data.get("train_size")
    if train_size is not None:
        _require(
            trainer.batch_size <= train_size,
            "trainer.batch_size",
            f"{trainer.batch_size} is larger than data.train_size={train_size}; "
            "lower trainer.batch_size (or raise trainer.grad_accum_steps) or use more data",
        )
    parallel = cfg.get("parallel")
    if parallel is not None and parallel.kind == "fsdp":
        _require(
            trainer.precision == "fp32",
            "trainer.precision",
            f"{trainer.precision} is autocast, which parallel=fsdp does its own way; set trainer.precision=fp32 "
            "and parallel.param_dtype=bf16 (and parallel.reduce_dtype=fp32)",
        )
        _require(
            not trainer.compile,
            "trainer.compile",
            "torch.compile is not supported with parallel=fsdp yet; set trainer.compile=false or parallel=ddp",
        )
    elif parallel is not None:
        for key in ("param_dtype", "reduce_dtype"):
            _require(
                parallel[key] is None,
                f"parallel.{key}",
                "applies to parallel=fsdp only; with parallel=ddp use trainer.precision=bf16 (or set parallel=fsdp)",
            )
    # NOTE: no check of sched.warmup_steps against trainer.max_steps: short smoke runs (max_steps=2)
    # of a real config are legitimate, and the schedules handle them.


def check_known_keys(node: Any, path: str = "") -> None:
    """Every key of a schema-typed section is a field of its schema.

    NOTE: ``+trainer.lr=0.1`` adds a key even to a struct node (``+`` opens it), and ``to_object`` then
    silently drops it: the user would train believing they set something. So we look ourselves.
    """
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if schema is not None and dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        for key in map(str, node):
            _require(
                key in fields,
                f"{path}{key}",
                f"unknown key; valid keys: {', '.join(f for f in fields if not f.startswith('_'))}",
            )
    for key in map(str, node):
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_known_keys(child, f"{path}{key}.")


def validate_member(cfg: DictConfig) -> None:
    """:func:`validate` for a sweep member's config composed in the sweeping process (before any launch).

    ``${hydra:...}`` interpolations (the run name among them) resolve against the member's own ``hydra`` node,
    which is otherwise left out: Hydra completes it when the member runs.
    """
    from hydra.core.hydra_config import HydraConfig

    holder = HydraConfig.instance()
    previous = holder.cfg
    holder.set_config(cfg)
    try:
        validate(OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]))
    finally:
        holder.cfg = previous


TARGET_SECTIONS = ("model", "opt", "sched", "data", "storage")


def check_target_packages(cfg: DictConfig) -> None:
    """Every ``_target_`` names a package that is installed, checked without importing it (validation runs
    before torch is imported): a missing package is one line naming the key, not a traceback from deep
    inside ``instantiate``. :func:`runner.build.check_targets` imports them once the run starts."""
    import importlib.util

    for section in TARGET_SECTIONS:
        target = cfg[section].get("_target_") if isinstance(cfg.get(section), DictConfig) else None
        if not isinstance(target, str):
            continue
        top = target.split(".", 1)[0]
        _require(
            bool(top) and "." in target and importlib.util.find_spec(top) is not None,
            f"{section}._target_",
            f"{target!r} cannot be imported: no module named {top!r}; install the package that provides it "
            f"or point {section}._target_ at an importable class (e.g. {_EXAMPLE_TARGETS[section]})",
        )


_EXAMPLE_TARGETS = {
    "model": "runner.models.vit.VisionTransformer",
    "opt": "torch.optim.AdamW",
    "sched": "runner.train.optim.CosineSchedule",
    "data": "runner.train.data.synthetic_splits",
    "storage": "runner.storage.StorageSettings.from_config",
}


def validate(cfg: DictConfig) -> None:
    """Resolve every interpolation and run each schema's range checks (``__post_init__``), then the
    checks across groups."""
    check_known_keys(cfg)
    OmegaConf.to_object(cfg)
    check_name(str(cfg.name))
    check_target_packages(cfg)
    check_combinations(cfg)


#: Nodes a YAML config file may expand to through its aliases (``*name``): far more than any hand-written
#: config, far fewer than a "billion laughs" file whose nested aliases expand exponentially (YAML shares
#: them, but OmegaConf copies each use).
MAX_YAML_EXPANDED_NODES = 100_000


def limit_yaml_aliases() -> None:
    """Make OmegaConf's YAML loader (what Hydra reads config files with) refuse alias bombs.

    NOTE: this wraps ``omegaconf._utils.get_yaml_loader``, which ``OmegaConf.load`` looks up at each call.
    Installed by :func:`install`; tests/reliability/test_hostile.py checks it still bites.
    """
    import omegaconf._utils as omegaconf_utils
    import yaml

    original = omegaconf_utils.get_yaml_loader
    if getattr(original, "_runner_guarded", False):
        return

    def expanded(node: Any, memo: dict[int, int]) -> int:
        if id(node) not in memo:
            memo[id(node)] = 1  # a cycle counts once
            if isinstance(node, yaml.MappingNode):
                memo[id(node)] = 1 + sum(expanded(k, memo) + expanded(v, memo) for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                memo[id(node)] = 1 + sum(expanded(v, memo) for v in node.value)
        return memo[id(node)]

    def guarded() -> Any:
        base = original()

        class AliasLimitedLoader(base):  # type: ignore[misc,valid-type]
            _expanded = 0
            _memo: dict[int, int] | None = None

            def compose_node(self, parent: Any, index: Any) -> Any:
                if self.check_event(yaml.AliasEvent):
                    mark = self.peek_event().start_mark
                    node = super().compose_node(parent, index)
                    if self._memo is None:
                        self._memo = {}
                    self._expanded += expanded(node, self._memo)
                    if self._expanded > MAX_YAML_EXPANDED_NODES:
                        raise yaml.composer.ComposerError(
                            None,
                            None,
                            f"its aliases (*name) expand to more than {MAX_YAML_EXPANDED_NODES} values, refused as "
                            "a possible alias bomb; write the values out or use ${...} interpolation",
                            mark,
                        )
                    return node
                return super().compose_node(parent, index)

        return AliasLimitedLoader

    guarded._runner_guarded = True  # type: ignore[attr-defined]
    omegaconf_utils.get_yaml_loader = guarded


def _run_name(override_dirname: str) -> str:
    from runner.naming import run_name

    return run_name(override_dirname)


def _sweep_name(task_overrides: list[str], exclude_keys: list[str]) -> str:
    from runner.naming import sweep_name

    return sweep_name(list(task_overrides), list(exclude_keys))


def _checked_name(name: str) -> str:
    return check_name(str(name))


def _tasks_per_node(gpus_per_node: int | None) -> int:
    """One rank per GPU (conf/hydra/launcher/slurm.yaml); a CPU-only job runs one task unless told."""
    return int(gpus_per_node) if gpus_per_node else 1


def install() -> None:
    """Everything composing runner's config needs, done once and on purpose (importing a module does none of
    it): the schemas in Hydra's ConfigStore, the resolvers ``conf/`` uses, and the YAML alias guard. Called by
    the entry point and by the tests' fixture; idempotent."""
    OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
    OmegaConf.register_new_resolver("checked_name", _checked_name, replace=True)
    OmegaConf.register_new_resolver("runner_tasks_per_node", _tasks_per_node, replace=True)
    # NOTE: cached: Hydra copies the cache into each member's config, so every member resolves the sweep's
    # name (from the sweep's overrides), not one derived from its own (see conf/config.yaml).
    OmegaConf.register_new_resolver("sweep_name", _sweep_name, replace=True, use_cache=True)
    register_configs()
    limit_yaml_aliases()


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    schemas: dict[str, dict[str, type]] = {
        "model": {"vit": ViTConfig},
        "opt": {"adamw": AdamWConfig, "sgd": SGDConfig},
        "sched": {"cosine": CosineConfig, "const": ConstConfig, "const_cooldown": ConstCooldownConfig},
        "data": {"synthetic": SyntheticConfig, "imagefolder": ImageFolderConfig},
        "storage": {"storage": StorageConfig},
        "trainer": {"trainer": TrainerConfig},
        "parallel": {"parallel": ParallelConfig},
    }
    for group, nodes in schemas.items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
