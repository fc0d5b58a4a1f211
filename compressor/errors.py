"""The project's small error hierarchy.

Every error a user can cause (bad model file, bad recipe, bad data) derives from
:class:`CompressorError`; the CLI prints its one-line message and exits with code 2.
Internal failures of a pass or target are wrapped in :class:`PassError` /
:class:`TargetError`, chained with ``from`` so the cause is never lost.
"""

from __future__ import annotations


class CompressorError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2

    def one_line(self) -> str:
        return " ".join(str(self).split())


class ConfigError(CompressorError):
    """A recipe or pass/target configuration is invalid. The message names the field path."""


class ModelLoadError(CompressorError):
    """The model file is missing, corrupt, untrusted or of an unknown kind."""


class DataError(CompressorError):
    """The data set is missing, malformed or does not match the model."""


class PipelineOrderError(ConfigError):
    """The recipe's chain of forms is impossible (a pass or target cannot take its input)."""


class PassError(CompressorError):
    """A pass failed while running. The message names the pass."""


class TargetError(CompressorError):
    """A target failed to build or run an engine."""


class TargetUnavailable(TargetError):
    """The target's runtime cannot run on this machine; the message says why."""


class AcceptanceError(CompressorError):
    """The run completed but missed an acceptance limit of the recipe."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type's name), at most ``limit`` characters."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def validation_message(exc: "object", prefix: str = "") -> str:
    """One line from a pydantic ValidationError: each problem with its field path."""
    parts = []
    for err in exc.errors():  # type: ignore[attr-defined]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        path = ".".join(p for p in (prefix, loc) if p)
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{path}: {msg}" if path else msg)
    return "; ".join(parts)
