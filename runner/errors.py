"""One-line messages for configuration errors (reported with exit code 2 by ``runner.__main__``)."""

from __future__ import annotations

import dataclasses
import os
import re

from runner.config import ConfigError


class MemberFailed(RuntimeError):
    """A sweep member failed; the message names the member, the reason (one line) and its log. Reported as
    one line with exit code 1 (2 if the reason is a configuration error: see :class:`MemberConfigError`)."""


class MemberConfigError(ConfigError):
    """A sweep member was rejected for its configuration (a launcher that validates only in the member)."""


class RunStopped(RuntimeError):
    """The run stopped on purpose for a reason the user must act on (e.g. a non-finite loss with
    ``trainer.on_nonfinite=stop``). Reported as one line with exit code 1, state already saved."""


_KINDS = {
    "int": "an integer",
    "integer": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
}
_ENUM_VALUE = re.compile(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]")
_NOT_FOUND = re.compile(r"Could not find '([^']+)'")
_OPTIONS = re.compile(r"Available options in '([^']+)':\s*((?:\n\s+\S+)+)")


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def _omegaconf_message(e: Exception) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

    key = getattr(e, "full_key", None) or ""
    msg = _first_line(str(getattr(e, "msg", None) or e))
    if isinstance(e, ConfigKeyError | ConfigAttributeError):
        bad = re.search(r"Key '([^']+)'", msg)
        fields = ""
        obj = getattr(e, "object_type", None)
        if obj is not None and dataclasses.is_dataclass(obj):
            names = [f.name for f in dataclasses.fields(obj) if not f.name.startswith("_")]
            fields = f"; valid keys: {', '.join(names)}"
        return f"{key or (bad.group(1) if bad else '?')}: unknown key{fields}"
    if isinstance(e, MissingMandatoryValue):
        return f"{key}: missing a required value; set it on the command line, e.g. {key}=..."
    if isinstance(e, ValidationError):
        msg = re.sub(r"\s*full_key:.*", "", msg)
        choice = _ENUM_VALUE.search(msg)
        if choice:  # a choice field (a StrEnum in the schema)
            options = ", ".join(o.strip() for o in choice.group(2).split(","))
            return f"{key}: unknown value {choice.group(1)!r}; choose one of {options}"
        value = re.search(r"Value '([^']*)'", msg)
        expected = re.search(r"converted to (\w+)", msg) or re.search(r"is not a valid (\w+)", msg)
        if value and expected:
            kind = _KINDS.get(expected.group(1).lower(), f"a {expected.group(1).lower()}")
            return f"{key}={value.group(1)}: expected {kind}; set {key} to {kind}"
        if "is not Optional" in msg:
            return f"{key}: cannot be null; set {key} to a value"
        return f"{key}: {msg}"
    return f"{key}: {msg}" if key else msg


def config_error_message(error: BaseException) -> str | None:
    """A one-line message if ``error`` is a configuration error, else None (a real failure)."""
    import yaml
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    chain = _causes(error)
    for e in chain:
        if isinstance(e, ConfigError):
            return str(e)
    for e in chain:
        if isinstance(e, yaml.MarkedYAMLError):
            mark = e.problem_mark or e.context_mark
            where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a config file"
            return f"{where}: malformed YAML ({e.problem or e.context}); fix the file there"
        if isinstance(e, yaml.YAMLError):
            return f"malformed YAML in a config file ({_first_line(str(e))}); fix the YAML syntax"
    for e in chain:
        if isinstance(e, OmegaConfBaseException):
            return _omegaconf_message(e)
    for e in chain:
        if isinstance(e, MissingConfigException | ConfigCompositionException):
            text = str(e)
            missing, options = _NOT_FOUND.search(text), _OPTIONS.search(text)
            if missing and options:
                group, _, option = missing.group(1).rpartition("/")
                choices = ", ".join(options.group(2).split())
                extra = _PLUGIN_EXTRAS.get(f"{group}={option}")
                if extra is not None:
                    return f"{group}={option}: not installed; {extra}"
                return f"{group}={option}: no such option; choose one of: {choices}"
            return " ".join(line.strip() for line in text.splitlines() if line.strip())
        if isinstance(e, OverrideParseException):
            return f"cannot parse override: {' '.join(str(e).split())}"
    for e in chain:
        if isinstance(e, ValueError) and _raised_by_hydra_internals(e):
            # e.g. `=5`: Hydra reports some malformed overrides as a bare ValueError.
            return f"cannot use override: {_first_line(str(e))}; see python -m runner --help for the syntax"
    return None


#: Options that come from a Hydra plugin runner installs only with an extra.
_PLUGIN_EXTRAS = {
    "hydra/sweeper=optuna": "install runner's sweep extra (pip install 'runner[sweep]', which adds "
    "hydra-optuna-sweeper) to use hparams_search=optuna",
}


def _raised_by_hydra_internals(error: BaseException) -> bool:
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and f"{os.sep}hydra{os.sep}_internal{os.sep}" in last


def one_line(error: BaseException) -> str:
    """What a failed run says in one line: the config or run error message, else ``Type: first line``."""
    return (
        config_error_message(error) or run_error_message(error) or f"{type(error).__name__}: {_first_line(str(error))}"
    )


def run_error_message(error: BaseException) -> str | None:
    """A one-line message for a run that failed in a way the user can act on (exit code 1), else None.

    A checkpoint that cannot be written (disk full) or loaded (``trainer.resume`` names a broken one) and
    a deliberate stop are not bugs: a traceback would bury the one line that says what to do.
    """
    from runner.checkpoint.errors import CheckpointError
    from runner.history import HistoryError

    for e in _causes(error):
        if isinstance(e, RunStopped | CheckpointError | HistoryError | MemberFailed):
            return str(e)
        if _lost_peer(e):
            return (
                f"lost contact with another rank during a collective ({_first_line(str(e))[:300]}): a rank died "
                "or hung. Check the other ranks' logs (logs/rank<N>.log); running the same command again "
                "resumes from the last checkpoint. trainer.dist_timeout_s bounds the wait for a hung rank."
            )
    return None


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe")


def _lost_peer(error: BaseException) -> bool:
    """A gloo/c10d error that means another rank went away (as opposed to a bug in this process)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    text = str(error)
    dist_error = bool(names & {"DistBackendError", "DistNetworkError", "DistError"}) or "gloo" in text
    return dist_error and any(marker in text for marker in _PEER_LOST)
