"""GGUF files (llama.cpp's format) as input: a dense model of a supported family.

transformers' GGUF loader does the reading: it dequantizes every tensor to float32, undoes
llama.cpp's q/k row permutation and builds the tokenizer (chat template, special tokens) from
the metadata. Around it, this module

- reads the header first (``gguf_header``, ~0.2 s), so a corrupt file, a truncated one or an
  architecture we do not support is refused in one line before the ~30 s load;
- refuses files whose metadata the loader would drop silently and give wrong logits (Llama 3
  ``rope_freqs`` or other rope scaling, experts);
- rebuilds the loaded model as a plain stock model (the loader marks it quantized, which refuses
  ``save_pretrained``) and converts it to ours with ``from_hf``; the spec's provenance records
  the file, its sha256 and its tensor types.

Importing this module imports neither torch nor transformers (the checks above answer first).
A file is GGUF when it starts with the GGUF magic or its name ends in ``.gguf`` (then a wrong
magic is an error, not a fallback to another reader).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.gguf_header import MAGIC, GGUFHeader, read_header

if TYPE_CHECKING:
    import torch

SUFFIX = ".gguf"
# GGUF ``general.architecture`` values we read -> what they hold (llama.cpp writes Mistral and
# SmolLM as "llama").
ARCHITECTURES = {"llama": "Llama, Mistral, SmolLM"}
# Tensors and metadata transformers' loader ignores although they change the logits.
UNREAD_TENSORS = {"rope_freqs.weight": "Llama 3 rope scaling (rope_freqs)"}
UNREAD_KEYS = {"rope.scaling.type": "rope scaling", "expert_count": "mixture of experts"}


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file to read as GGUF (by its magic, or its ``.gguf`` name)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == SUFFIX:
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def check_supported(path: str | os.PathLike) -> GGUFHeader:
    """The header of a GGUF file we can load; a one-line ``CheckpointError`` otherwise."""
    header = read_header(path)
    arch = header.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{header.path}: GGUF architecture {arch!r} is not supported; "
                              f"expected one of {sorted(ARCHITECTURES)} "
                              f"({'; '.join(ARCHITECTURES.values())})")
    for name, what in UNREAD_TENSORS.items():
        if name in header.tensors:
            raise CheckpointError(f"{header.path}: the GGUF holds {what}, which transformers' "
                                  "GGUF loader ignores (the logits would be wrong); convert the "
                                  "original HF checkpoint instead")
    for key, what in UNREAD_KEYS.items():
        value = header.metadata.get(f"{arch}.{key}")
        if value not in (None, 0, "none"):
            raise CheckpointError(f"{header.path}: {arch}.{key}={value!r}: {what} is not read "
                                  "by transformers' GGUF loader; expected a dense model without "
                                  "it")
    return header


def tensor_types(header: GGUFHeader) -> list[str]:
    """The GGML type names of the file's tensors ("F32", "Q4_1"), sorted, after checking that
    every tensor's data lies inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kinds = set()
    for t in header.tensors.values():
        try:
            kind = GGMLQuantizationType(t.ggml_type)
        except ValueError:
            raise CheckpointError(f"{header.path}: GGUF tensor {t.name!r} has GGML type "
                                  f"{t.ggml_type}, unknown to the gguf package") from None
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if t.shape[-1] % block:
            raise CheckpointError(f"{header.path}: GGUF tensor {t.name!r} of shape "
                                  f"{list(t.shape)} is not a whole number of {kind.name} blocks "
                                  f"of {block}")
        end = t.offset + math.prod(t.shape) // block * block_bytes
        if end > header.file_size:
            raise CheckpointError(f"{header.path}: GGUF tensor {t.name!r} ends at byte {end}, "
                                  f"the file has {header.file_size} (truncated?)")
        kinds.add(kind.name)
    return sorted(kinds)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _require_gguf(path: Path) -> None:
    from ecospa_deploy.extras import require

    require("gguf", f"reading the GGUF file {path}")


def sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_config(path: str | os.PathLike) -> tuple[Any, GGUFHeader]:
    """(stock HF config, header) of a supported GGUF file; no tensor is read."""
    path = Path(path)
    header = check_supported(path)
    _require_gguf(path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # the loader raises many types on metadata it cannot map
        raise CheckpointError(f"{path}: transformers cannot read this GGUF's config "
                              f"({_one_line(exc)})") from None
    return config, header


def _stock_model(path: Path, dtype: torch.dtype | None) -> Any:
    """A plain (unmarked) stock HF model with the GGUF's dequantized weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from ecospa_deploy.families import family_of

    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype or torch.float32,
            output_loading_info=True)
    except Exception as exc:  # the loader raises many types on a file it cannot map
        raise CheckpointError(f"{path}: transformers cannot load this GGUF "
                              f"({_one_line(exc)})") from None
    problems = {k: v[:5] for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"{path}: the GGUF's tensors do not match its config: {problems}")
    config = copy.deepcopy(loaded.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config          # the weights are dequantized: plain floats
    fam = family_of(config.model_type, str(path))
    with torch.device("meta"):
        stock = fam.stock_class(config.model_type)(config)
    stock.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    stock.generation_config = loaded.generation_config
    return stock


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None,
               attn_implementation: str | None = None) -> Any:
    """Our model from a GGUF file of a supported architecture (float32 unless ``dtype``)."""
    path = Path(path)
    header = check_supported(path)
    _require_gguf(path)
    kinds = tensor_types(header)
    from ecospa_deploy.modeling import from_hf

    stock = _stock_model(path, dtype)
    if attn_implementation:
        stock.config._attn_implementation = attn_implementation
    model = from_hf(stock)
    spec = model.config.ecospa_spec
    model.config.set_spec(spec.replace_layers(
        spec.layers, source=str(path), source_format="gguf", gguf_sha256=sha256(path),
        gguf_tensor_types=kinds))
    if device is not None and device != "auto":   # like the pickle path: "auto" stays on CPU
        model = model.to(device)
    return model.eval()


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer the GGUF's metadata describes (vocabulary, merges, special tokens, chat
    template), as a HF fast tokenizer."""
    path = Path(path)
    header = check_supported(path)
    if "tokenizer.ggml.tokens" not in header.metadata:
        raise CheckpointError(f"{path}: the GGUF has no tokenizer (no tokenizer.ggml.tokens)")
    _require_gguf(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # the converter raises many types on metadata it cannot map
        raise CheckpointError(f"{path}: transformers cannot build this GGUF's tokenizer "
                              f"({_one_line(exc)})") from None


__all__ = ["is_gguf", "check_supported", "read_config", "tensor_types", "load_model",
           "load_tokenizer", "sha256", "ARCHITECTURES"]
