"""Sessions: tests (default), lint, typecheck, train (the main job), bench, reliability.

`python3 -m pip install nox && python3 -m nox` runs lint, then typecheck and tests (one virtualenv) from a
clean clone.
"""

from __future__ import annotations

import hashlib
import os

import nox

# NOTE: the tests session also type-checks (mypy in the same virtualenv): a separate typecheck session would
# build a second virtualenv with torch, about a minute of the CI budget.
nox.options.sessions = ["lint", "tests"]
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
# NOTE: install the CPU wheel first. pyproject.toml keeps a range (torch>=2.4) for real users, but on a
# machine without a CUDA-less index a bare `torch` resolves to a multi-GB CUDA build.
TORCH = os.environ.get("RUNNER_TORCH_SPEC", "torch==2.13.0")
MYPY = "mypy>=1.10"


def install(session: nox.Session, *extras: str, tools: tuple[str, ...] = ()) -> None:
    """torch (the CPU wheel), runner with ``extras`` (editable) and ``tools``, in one pip call: one resolution
    and one install pass instead of one per call. A reused virtualenv that already holds exactly these (same
    pyproject.toml, torch spec, extras and tools) installs nothing: pip would spend ~10 s finding that out.
    ``--reuse-venv=never`` rebuilds it."""
    spec = f".[{','.join(extras)}]" if extras else "."
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml"), "rb") as f:
        wanted = hashlib.sha256(f.read() + f"{TORCH} {spec} {' '.join(tools)}".encode()).hexdigest()
    location = getattr(session.virtualenv, "location", None)
    stamp = os.path.join(location, ".runner-installed") if location else None
    if stamp is not None and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read() == wanted:
                session.log(f"reusing {location} (runner{spec[1:]} and {TORCH} already installed)")
                return
    # NOTE: the exact torch pin in the same call resolves to the CPU wheel, as installing it first did.
    session.install(TORCH, "-e", spec, *tools)
    if stamp is not None:
        with open(stamp, "w") as f:
            f.write(wanted)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit and integration tests (S3, SLURM and multi-process tests start their own servers)."""
    install(session, "test", "sweep", "report", tools=(MYPY,))
    typecheck_here(session)
    # --durations: the suite must stay under 10 minutes on 2 cores; CI prints where the time goes.
    # -n 2: most tests wait on subprocesses (CLI runs, torchrun, servers), so two workers use both cores;
    # loadgroup keeps every SLURM test on one worker, with the one cluster they share.
    session.run("pytest", *(session.posargs or ["-q", "-n", "2", "--dist", "loadgroup", "--durations=40"]))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "runner", "hydra_plugins", "tests", "bench", "noxfile.py")
    session.run("ruff", "format", "--check", "runner", "hydra_plugins", "tests", "bench", "noxfile.py")


def typecheck_here(session: nox.Session) -> None:
    """mypy, installed by the session's :func:`install` (``tools=(MYPY,)``)."""
    session.run("mypy", "runner", "hydra_plugins")


@nox.session(python=PYTHON, reuse_venv=True)
def typecheck(session: nox.Session) -> None:
    """mypy alone (the tests session runs it too)."""
    install(session, tools=(MYPY,))
    typecheck_here(session)


@nox.session(python=PYTHON, reuse_venv=True)
def train(session: nox.Session) -> None:
    """The main job: `python -m runner` on the built-in default (tiny ViT, synthetic data)."""
    install(session)
    session.run("python", "-m", "runner", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks that measure their baseline in the same run: `nox -s bench -- --json`.

    sync: runner's syncer vs `aws s3 sync` vs open_clip's remote_sync on one local moto server.
    open_clip_torch goes in with --no-deps: only its file_utils.remote_sync is used (no model code).
    checkpoint, loop, startup: async/sync checkpoint cost vs raw disk, loop overhead vs a bare loop,
    start-up vs `import torch`. memory: ViT-B/16 + AdamW training state per rank, FSDP vs DDP, 2 ranks.
    checkpoint_ranks: async checkpoint stall vs a synchronous save at 2 ranks, DDP and FSDP.
    sweep: submitting a 100-member sweep of dry members to the SLURM test cluster (started and stopped by the
    bench unless already up; needs root) vs `sbatch --array`. imagefolder: held-out top-1 of `data=imagefolder`
    with its defaults vs a bare loop, on scikit-learn's digits (the `test` extra installs it).
    Run one alone with `nox -s bench -- --only loop`.
    """
    only = None
    if "--only" in session.posargs:
        i = session.posargs.index("--only")
        only, session.posargs[i : i + 2] = session.posargs[i + 1], []
    install(session, "test")
    # NOTE: awscli is not installed here: it pins botocore against s3fs's aiobotocore. bench/sync.py uses
    # the `aws` on PATH (any Python's) and says so if there is none.
    session.install("--no-deps", "open_clip_torch")
    # NOTE: bench/sweep.py's hydra-submitit-launcher is a core dependency; the `sweep` extra is only Optuna.
    for name in ("sync", "checkpoint", "checkpoint_ranks", "loop", "startup", "sweep", "memory", "imagefolder"):
        if only in (None, name):
            session.run("python", f"bench/{name}.py", *session.posargs)


@nox.session(python=PYTHON)
def reliability(session: nox.Session) -> None:
    """The whole fault suite (tests/reliability) at full size; prints the summary table at the end.

    The default `tests` session runs the same tests smaller: 3 kill trials, half the bad-config table, one
    corruption kind end to end (locally and on S3), the erroring-store case and a killed rank; the
    `full_suite` tests (outages, slow link, kills mid-upload, a hung rank, the SLURM requeue-twice drill)
    run only here.
    The disk-full test mounts a tmpfs and the requeue drill starts the SLURM test cluster
    (tests/slurm/cluster.sh), so run this as root (in CI nothing may skip).
    """
    install(session, "test")
    env = {"RUNNER_RELIABILITY_TRIALS": "25", "RUNNER_RELIABILITY_FULL": "1"}
    session.run("pytest", "-m", "reliability", "-q", *session.posargs, env=env)
