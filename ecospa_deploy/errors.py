"""User-facing errors. Each message names the file, layer and tensor involved and what was expected."""

from __future__ import annotations

from ecospa_deploy.spec import SpecError


class EcospaError(Exception):
    """Base of every error the CLI prints without a traceback."""


class CheckpointError(EcospaError):
    """A checkpoint that cannot be read: missing/extra/corrupt tensors, unknown architecture."""


class UnsupportedError(EcospaError):
    """A request the target runtime or method cannot honour (the message says why and what can)."""


USER_ERRORS: tuple[type[BaseException], ...] = (EcospaError, SpecError)

__all__ = ["EcospaError", "CheckpointError", "UnsupportedError", "SpecError", "USER_ERRORS"]
