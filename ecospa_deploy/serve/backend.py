"""The slot protocol the scheduler drives, and how ``--backend auto`` picks a backend.

A backend owns ``max_batch_size`` slots. ``add`` prefills one prompt into a free slot and
returns its first token; ``step`` decodes one token for every occupied slot at once;
``free`` releases a slot. ``ecospa_deploy.engine.Engine`` has exactly this interface, so the
scheduler batches for the engine without an adapter; the HF reference backend implements it
with plain transformers.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

from ecospa_deploy.errors import UsageError

if TYPE_CHECKING:   # an annotation only: `ecospa serve --help` must not import torch
    from ecospa_deploy.engine.sampling import SamplingParams

log = logging.getLogger("ecospa_deploy.serve")

BACKENDS = ("auto", "engine", "hf", "vllm")
VLLM_PLUGIN_GROUP = "vllm.general_plugins"


@runtime_checkable
class SlotBackend(Protocol):
    def add(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams) -> int: ...

    def step(self) -> dict[int, int]: ...

    def free(self, slot: int) -> None: ...


@dataclass(frozen=True)
class Choice:
    """The backend ``--backend`` resolved to, and why (logged at start)."""

    name: str
    reason: str


def vllm_available() -> str | None:
    """None when vLLM can serve our format here, else why not and what to install (one line;
    no import of vLLM or torch, so the answer comes before any model loads)."""
    from ecospa_deploy.extras import vllm_install_hint, vllm_torch_conflict

    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed; install {vllm_install_hint()}"
    conflict = vllm_torch_conflict()
    if conflict:
        return f"vLLM cannot import: {conflict}; install {vllm_install_hint()}"
    if not any(ep.name == "ecospa" for ep in entry_points(group=VLLM_PLUGIN_GROUP)):
        return (f"no 'ecospa' entry point in {VLLM_PLUGIN_GROUP!r} (install ecospa-deploy "
                "with pip so vLLM can find the plugin)")
    return None


def engine_available() -> str | None:
    """None when ``ecospa_deploy.engine.Engine`` can be imported, else why not."""
    try:
        from ecospa_deploy.engine import Engine  # noqa: F401
    except ImportError as exc:
        return f"ecospa_deploy.engine.Engine cannot be imported ({exc})"
    return None


def choose_backend(requested: str) -> Choice:
    """Resolve ``auto`` to vllm → engine → hf; check an explicit request can be honoured."""
    if requested not in BACKENDS:
        raise UsageError(f"--backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    if requested == "hf":
        return Choice("hf", "requested with --backend hf")
    if requested == "vllm":
        why = vllm_available()
        if why:
            raise UsageError(f"--backend vllm: {why}")
        return Choice("vllm", "requested with --backend vllm")
    if requested == "engine":
        why = engine_available()
        if why:
            raise UsageError(f"--backend engine: {why}")
        return Choice("engine", "requested with --backend engine")
    why_not_vllm = vllm_available()
    if why_not_vllm is None:
        return Choice("vllm", "auto: vllm is importable and the ecospa plugin is registered")
    why_not_engine = engine_available()
    if why_not_engine is None:
        return Choice("engine", f"auto: {why_not_vllm}; using the ecospa engine")
    return Choice("hf", f"auto: {why_not_vllm}; {why_not_engine}; using plain transformers")


def fallback_after_vllm() -> Choice:
    """What ``auto`` serves with when vLLM was chosen but could not start: engine, then hf."""
    why_not_engine = engine_available()
    if why_not_engine is None:
        return Choice("engine", "auto: vllm could not start; using the ecospa engine")
    return Choice("hf", f"auto: vllm could not start; {why_not_engine}; using plain transformers")
