"""The floating-point dtypes the project reads and writes: one table, two spellings.

``float32``/``bfloat16``/``float16`` are torch's names (every verb's ``--dtype``, config.json);
``fp32``/``bf16``/``fp16`` the short ones (``ecospa convert onnx --dtype``, the byte counts of
``ecospa inspect``). torch is imported only to hand out a ``torch.dtype``: the CLI checks
``--dtype`` before torch loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch name: (short name, bytes per element)
_TABLE = {"float32": ("fp32", 4), "bfloat16": ("bf16", 2), "float16": ("fp16", 2)}
_BY_SHORT = {short: name for name, (short, _) in _TABLE.items()}
NAMES = tuple(_TABLE)


def canonical(name: str) -> str:
    """The torch name of ``name``, given in either spelling."""
    return _BY_SHORT.get(name, name)


def short_name(name: str) -> str:
    return _TABLE[canonical(name)][0]


def element_size(name: str) -> int:
    return _TABLE[canonical(name)][1]


def to_torch(name: str) -> torch.dtype:
    """The torch dtype of ``name`` (either spelling; any other torch name passes through)."""
    import torch

    return getattr(torch, canonical(name))


def name_of(dtype: torch.dtype) -> str:
    """The torch name of ``dtype`` (``torch.float32`` -> ``float32``), in the table or not."""
    return str(dtype).removeprefix("torch.")


__all__ = ["NAMES", "canonical", "short_name", "element_size", "to_torch", "name_of"]
