"""User-facing errors. Each message names the file, layer and tensor involved and what was expected."""

from __future__ import annotations

from ecospa_deploy.spec import SpecError


class EcospaError(Exception):
    """Base of every error the CLI prints without a traceback."""


class CheckpointError(EcospaError):
    """A checkpoint that cannot be read: missing/extra/corrupt tensors, unknown architecture."""


class UnsupportedError(EcospaError):
    """A request the target runtime or method cannot honour (the message says why and what can)."""


class UsageError(EcospaError):
    """An option or argument given wrong (a flag value, a missing path): the message names it.

    Raised by the CLI's verbs and by the library code they call (the server, its backends);
    the CLI prints it without a traceback and exits 2."""


USER_ERRORS: tuple[type[BaseException], ...] = (EcospaError, SpecError)

__all__ = ["EcospaError", "CheckpointError", "UnsupportedError", "UsageError", "SpecError",
           "USER_ERRORS"]
