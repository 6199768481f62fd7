"""Load pruned checkpoints: ours, and foreign ones whose config disagrees with their tensors.

Accepted inputs:

- our format (``model_type`` ``ecospa_llama``/``ecospa_gpt2``; per-layer spec in ``ecospa``);
- a stock HF Llama/Mistral/Qwen2/GPT-2 directory whose safetensors shapes disagree with its
  dense config.json (FLAP, Torch-Pruning, ``save_pretrained`` after surgery), single-file or
  sharded with an index. Per-layer dims are inferred from the safetensors *headers* (no weight
  is read for that) assuming whole heads were pruned at the config's head dim; extra
  ``o_proj``/``down_proj`` biases (FLAP's compensation) are honoured. A family whose stock
  checkpoints fuse projections (Phi-3's ``qkv_proj``/``gate_up_proj``) is checked in its own
  tensor names, then read and split exactly (``Family.to_ours``) into our model;
- with ``allow_pickle=True`` only, an LLM-Pruner ``torch.save({'model', 'tokenizer'})`` file;
- a GGUF file (llama.cpp's format) of a supported architecture, dequantized to float32, with its
  tokenizer and chat template (``ecospa_deploy.gguf_input``; needs the ``gguf`` extra).

Every tensor name and shape is checked against the model the spec describes before any weight
is loaded, so a bad checkpoint fails with the file, layer and tensor in the message.

Files are treated as untrusted input: safetensors headers, config.json and the shard index are
validated field by field (types, signs, nesting), weight files must lie inside the model
directory (no absolute or ``..`` shard paths, no symlink leading out), and every failure is a
one-line ``CheckpointError`` or ``SpecError``, never a traceback from deeper down.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedModel

from ecospa_deploy import dtypes, gguf_input
from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.families import family_of
from ecospa_deploy.modeling import config_from_dense
from ecospa_deploy.spec import ModelSpec, SpecError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
# Buffers old checkpoints carry that no current model needs.
IGNORED_TENSORS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
           "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
           "F8_E8M0": 1}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _load_json(data: bytes | str, where: Path, what: str) -> Any:
    """JSON from an untrusted file; any parse failure is a one-line ``CheckpointError``."""
    try:
        return json.loads(data)
    except RecursionError:
        raise CheckpointError(f"{where}: corrupt {what} (JSON nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, 4300-digit integers
        raise CheckpointError(f"{where}: corrupt {what} ({_one_line(exc)})") from None


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _header_entry(path: Path, name: str, meta: Any) -> tuple[TensorInfo, int, int]:
    """One tensor's (info, start, stop) from a header entry whose every field is checked."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header entry for tensor "
                               f"{name[:100]!r}: {why}")

    if not isinstance(meta, dict):
        raise bad(f"expected an object, got {type(meta).__name__}")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"dtype is {type(dtype).__name__}; expected a string such as 'F32'")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape) or len(shape) > 8:
        raise bad("shape must be a list of at most 8 non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise bad("data_offsets must be [start, stop] with 0 <= start <= stop")
    start, stop = offsets
    numel = 1
    for s in shape:
        numel *= s
    if dtype not in _DTYPES:
        raise bad(f"dtype {dtype[:20]!r} is not a safetensors dtype; expected one of "
                  f"{', '.join(_DTYPES)}")
    if stop - start != numel * _DTYPES[dtype]:
        raise CheckpointError(f"{path}: tensor {name[:100]!r} declares shape {shape} ({dtype}) "
                              f"but spans {stop - start} bytes")
    return TensorInfo(str(path), dtype, tuple(shape)), start, stop


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of a .safetensors file from its header alone; checks truncation."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header "
                                  f"bytes, file has {size})")
        header = _load_json(f.read(n), path, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name], start, stop = _header_entry(path, name, meta)
        if stop > start:
            spans.append((start, stop, name))
    spans.sort()
    for (_, stop, a), (start, _, b) in zip(spans, spans[1:]):
        if start < stop:
            raise CheckpointError(f"{path}: corrupt safetensors header: the bytes of tensors "
                                  f"{a[:100]!r} and {b[:100]!r} overlap")
    end = max((stop for _, stop, _ in spans), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: header declares "
                              f"{8 + n + end} bytes, file has {size}")
    return out


def weight_file(directory: Path, name: Any, source: Path) -> Path:
    """``directory / name`` for a weight file named in ``source``, refused unless it is a plain
    relative name that stays inside ``directory`` once symlinks are resolved."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{source}: weight file name {str(name)[:100]!r} is not a file name")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{source}: weight file {name[:200]!r} is outside the model "
                              f"directory {directory}; expected a name relative to it")
    path = directory / name
    target = path.resolve()
    if not _stays_inside(directory, target):
        raise CheckpointError(f"{path}: a symlink to {target}, outside the model directory "
                              f"{directory}; copy the weights into the directory instead")
    return path


def read_checkpoint_index(directory: Path) -> dict[str, TensorInfo]:
    """All tensors of a directory's safetensors weights (single file or sharded with index)."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        weight_map = _read_weight_map(weight_file(directory, index.name, directory))
        out: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            path = weight_file(directory, shard, index)
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {shard} is missing from {directory}")
            header = read_safetensors_header(path)
            for name, shard_of in weight_map.items():
                if shard_of == shard and name not in header:
                    raise CheckpointError(f"{directory / shard}: tensor {name!r} listed in the "
                                          "index is missing from the shard")
            out.update(header)
        return out
    if single.exists():
        return read_safetensors_header(weight_file(directory, single.name, directory))
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                          f"(found {found[:10]}); .bin state dicts are not read: re-save as "
                          "safetensors, or pass an LLM-Pruner file with allow_pickle=True")


def _read_weight_map(index: Path) -> dict[str, str]:
    raw = _load_json(index.read_bytes(), index, "safetensors index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{index}: not a valid safetensors index; expected "
                              "{\"weight_map\": {tensor name: shard file name, ...}}")
    return weight_map




# -- shape check against the model the spec describes --------------------------------------
def expected_shapes(model_cls: type[PreTrainedModel], config: Any,
                    family: Any = None) -> tuple[dict[str, tuple], set]:
    """Parameter shapes of ``model_cls(config)`` built on the meta device, and tied names; with
    ``family``, named and shaped as that family's stock checkpoints store them (fused
    projections), so a checkpoint is checked in its own names."""
    try:
        with torch.device("meta"):
            model = model_cls(config)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError,
            RuntimeError, StrictDataclassError) as exc:   # the last: transformers' validators
        raise CheckpointError(f"the config cannot build {model_cls.__name__} "
                              f"({type(exc).__name__}: {_one_line(exc)})") from None
    state = model.state_dict()
    if family is not None:
        state = family.to_stock(state, config.ecospa_spec)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return shapes, set(model.all_tied_weights_keys)


def _layer_of(name: str) -> str:
    parts = name.split(".")
    for marker in ("layers", "h"):
        if marker in parts:
            i = parts.index(marker)
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                return f"layer {parts[i + 1]}: "
    return ""


def _normalized(found: dict[str, Any], expected: dict[str, tuple], base_prefix: str
                ) -> dict[str, Any]:
    """``found`` without ignored buffers, names of a bare decoder given the causal LM's prefix."""
    def norm(name: str) -> str:
        prefixed = base_prefix + name
        return prefixed if base_prefix and name not in expected and prefixed in expected else name

    return {norm(n): v for n, v in found.items() if not n.endswith(IGNORED_TENSORS)}


def check_tensors(found: dict[str, TensorInfo], expected: dict[str, tuple], tied: set,
                  base_prefix: str = "") -> None:
    names = _normalized(found, expected, base_prefix)
    missing = sorted(set(expected) - set(names) - tied)
    if missing:
        first = missing[0]
        raise CheckpointError(f"{_layer_of(first)}missing tensor {first!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(names) - set(expected))
    if extra:
        info = names[extra[0]]
        raise CheckpointError(f"{info.file}: {_layer_of(extra[0])}unexpected tensor "
                              f"{extra[0]!r} with shape {list(info.shape)}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, info in names.items():
        if tuple(info.shape) != expected[name]:
            raise CheckpointError(f"{info.file}: {_layer_of(name)}tensor {name!r} has shape "
                                  f"{list(info.shape)}; the config's spec expects "
                                  f"{list(expected[name])}")


def _stays_inside(directory: Path, target: Path) -> bool:
    """``target`` (resolved) lies in ``directory``, or in the ``blobs`` of the hub-cache repo
    whose snapshot ``directory`` is (``models--*/snapshots/REV`` links into ``../../blobs``)."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")
    return any(target == r or r in target.parents for r in roots)


def check_links_stay_inside(directory: Path) -> None:
    """Refuse a model directory holding a symlink that resolves outside it: every file in it
    (config, tokenizer, chat template, weights) is read as the model's, and a link to
    ``/etc/passwd`` named ``chat_template.jinja`` must not be. A snapshot of the Hugging Face
    hub cache (``models--*/snapshots/REV``) links into its ``blobs`` folder: allowed."""
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                target = path.resolve()
                if not _stays_inside(directory, target):
                    raise CheckpointError(f"{path}: a symlink to {target}, outside the model "
                                          f"directory {directory}; copy the file into the "
                                          "directory instead")


# -- public entry points ---------------------------------------------------------------------
def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    check_links_stay_inside(directory)
    if not path.exists():
        raise CheckpointError(f"{directory}: no config.json; expected a HF model directory")
    raw = _load_json(path.read_bytes(), path, "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: config.json is a JSON {type(raw).__name__}; expected an "
                              "object")
    check_config_dims(raw, path)
    return raw


# Size keys of HF decoder configs (Llama-like and GPT-2 names): each, when set, must be an
# integer >= 1. A zero or negative size would divide by zero, build empty layers, or (head_dim)
# be replaced by a default and load with wrong logits.
CONFIG_SIZE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads",
                    "num_hidden_layers", "intermediate_size", "vocab_size", "head_dim",
                    "max_position_embeddings", "n_embd", "n_head", "n_layer", "n_inner",
                    "n_positions", "n_ctx")


def check_config_dims(raw: dict[str, Any], path: Path) -> None:
    for key in CONFIG_SIZE_KEYS:
        value = raw.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and value >= 1):
            shown = repr(value)[:60]
            raise CheckpointError(f"{path}: {key}={shown} is invalid; expected an integer >= 1")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{path}: model_type={str(model_type)[:60]!r} is invalid; "
                              "expected a string such as 'llama'")


def _config_object(load, directory: Path) -> Any:
    """A transformers config from ``directory``; its own errors become one-line ours."""
    try:
        return load(directory)
    except Exception as exc:  # transformers and huggingface_hub raise many types here

        raise CheckpointError(f"{directory / 'config.json'}: transformers cannot build this "
                              f"config ({type(exc).__name__}: {_one_line(exc)})") from None


def _our_spec(raw: dict[str, Any], path: Path, layers_key: str) -> ModelSpec:
    """The ``ecospa`` block of our config.json, validated against its layer count."""
    if "ecospa" not in raw:
        raise CheckpointError(f"{path}: model_type={raw.get('model_type')!r} is our format but "
                              "config.json has no 'ecospa' block (the per-layer spec); it was "
                              "not written by this package, or the block was removed")
    try:
        return ModelSpec.from_dict(raw["ecospa"]).validate(raw.get(layers_key))
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def _no_spec_in_stock(raw: dict[str, Any], path: Path, ours: str) -> None:
    """A stock model_type with our per-layer block is a half-edited config: say which it is."""
    if "ecospa" in raw:
        raise CheckpointError(f"{path}: model_type={raw['model_type']!r} is a stock type but the "
                              f"config has an 'ecospa' block; set model_type to {ours!r} for "
                              "our format, or remove the block for a foreign checkpoint")


def check_layer_count(found: dict[str, "TensorInfo"], num_layers: int, source: Path) -> None:
    """The tensors hold exactly layers ``0 .. num_layers-1`` (names ``...layers.i.``/``h.i.``)."""
    seen = {int(p) for name in found for p in _layer_indices(name)}
    # Unique ints equal range(n) iff their count is n and they span 0..n-1 (no set of size n:
    # a hostile config may declare 10**30 layers).
    if seen and (len(seen) != num_layers or min(seen) != 0 or max(seen) != num_layers - 1):
        got = f"{len(seen)} (indices {min(seen)}..{max(seen)})"
        raise CheckpointError(f"{source}: the config declares {num_layers} layers but the "
                              f"tensors hold {got}; expected indices 0..{num_layers - 1}")


# Sizes of a dense decoder that never exceed its largest tensor dimension (heads <= hidden <=
# the embedding or FFN width); checked before the spec machinery sizes anything from them.
TENSOR_BOUNDED_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads",
                       "intermediate_size", "vocab_size", "head_dim", "n_embd", "n_head", "n_inner")


def check_dims_fit_tensors(raw: dict[str, Any], found: dict[str, "TensorInfo"],
                           path: Path) -> None:
    largest = max((d for info in found.values() for d in info.shape), default=0)
    for key in TENSOR_BOUNDED_KEYS:
        value = raw.get(key)
        if isinstance(value, int) and value > largest:
            raise CheckpointError(f"{path}: {key}={str(value)[:60]} exceeds every tensor "
                                  f"dimension of the checkpoint (largest: {largest}); expected "
                                  "the dense model's size")


def _layer_indices(name: str) -> list[str]:
    parts = name.split(".")
    return [parts[i + 1] for i, p in enumerate(parts[:-1])
            if p in ("layers", "h") and parts[i + 1].isdigit() and len(parts[i + 1]) < 7]


def resolve_config(path: str | os.PathLike) -> tuple[Any, type[PreTrainedModel], bool]:
    """(our config, our model class, is_foreign) for a checkpoint directory."""
    return _resolve(path)[:3]


def _resolve(path: str | os.PathLike) -> tuple[Any, type[PreTrainedModel], bool, Any]:
    """``resolve_config`` plus the family of the checkpoint's own model_type."""
    directory = Path(path)
    raw = _read_config(directory)
    model_type = raw.get("model_type")
    fam = family_of(model_type, str(directory / "config.json"))
    model_cls = fam.load("model_class")
    if model_type == fam.model_type:
        # Validate the spec first, so errors name layer and field (not the config machinery).
        _our_spec(raw, directory / "config.json", fam.layers_key)
        return (_config_object(fam.load("config_class").from_pretrained, directory), model_cls,
                False, fam)
    _no_spec_in_stock(raw, directory / "config.json", fam.model_type)
    stock = _config_object(AutoConfig.from_pretrained, directory)
    found = read_checkpoint_index(directory)
    check_layer_count(found, _num_layers(stock), directory)
    check_dims_fit_tensors(raw, found, directory / "config.json")
    shapes = {n: i.shape for n, i in found.items()}
    try:
        spec = fam.infer_spec(stock, shapes)
    except (TypeError, ValueError, ArithmeticError, AttributeError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise CheckpointError(f"{directory / 'config.json'}: cannot derive the per-layer "
                              f"shapes ({type(exc).__name__}: {_one_line(exc)})") from None
    spec = spec.replace_layers(spec.layers, source=str(directory),
                               source_model_type=model_type)
    return config_from_dense(stock, spec), model_cls, True, fam


def _num_layers(config: Any) -> int:
    return config.num_hidden_layers  # GPT-2's config maps num_hidden_layers onto n_layer


def check_directory(path: str | os.PathLike):
    """Every check a model directory gets before its weights are read (config, spec, headers,
    layer count, tensor names and shapes): the one validation ``load_model`` and ``inspect``
    share. Returns (config, model class, is_foreign, family, tensors, expected shapes, tied)."""
    path = Path(path)
    config, model_cls, foreign, fam = _resolve(path)
    found = read_checkpoint_index(path)
    check_layer_count(found, _num_layers(config), path)
    convert = foreign and fam.converts_checkpoint
    expected, tied = expected_shapes(model_cls, config, fam if convert else None)
    check_tensors(found, expected, tied, model_cls.base_model_prefix + ".")
    return config, model_cls, foreign, fam, found, expected, tied


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, *, allow_pickle: bool = False,
               attn_implementation: str | None = None) -> PreTrainedModel:
    """Load any accepted checkpoint (see module docstring) into our per-layer-shaped classes.

    ``device`` may be a device or an accelerate ``device_map`` string such as ``"auto"``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if gguf_input.is_gguf(path):     # by its magic, whatever the name
            return gguf_input.load_model(path, dtypes.to_torch(dtype) if isinstance(dtype, str)
                                         else dtype, device, attn_implementation)
        if path.suffix in PICKLE_SUFFIXES:
            return _load_pickle(path, dtype, device, allow_pickle, attn_implementation)
        raise CheckpointError(f"{path}: expected a model directory (config.json + safetensors), "
                              f"a GGUF file (.gguf) or an LLM-Pruner pickle "
                              f"({', '.join(PICKLE_SUFFIXES)})")
    config, model_cls, foreign, fam, found, expected, tied = check_directory(path)
    convert = foreign and fam.converts_checkpoint
    prefix = model_cls.base_model_prefix + "."
    if isinstance(dtype, str):
        dtype = dtypes.to_torch(dtype)
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype or "auto",
                              "output_loading_info": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device is not None:
        kwargs["device_map"] = device
    try:
        if convert:   # stock names/shapes differ from ours: read, convert, build from them
            state = fam.to_ours(_normalized(_read_tensors(found), expected, prefix),
                                config.ecospa_spec)
            model, info = model_cls.from_pretrained(None, state_dict=state, **kwargs)
        else:
            model, info = model_cls.from_pretrained(path, **kwargs)
    except (ValueError, TypeError) as exc:   # transformers' own config/shape validation
        raise CheckpointError(f"{path}: transformers cannot build this model "
                              f"({type(exc).__name__}: {_one_line(exc)})") from None
    problems = {k: v for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
                and not (k == "unexpected_keys" and all(n.endswith(IGNORED_TENSORS) for n in v))}
    if problems:
        raise CheckpointError(f"{path}: weights do not match the spec: {problems}")
    return model.eval()


def _read_tensors(found: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Every tensor of ``found`` (already checked against the spec), file by file."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in sorted({info.file for info in found.values()}):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in found:
                        out[name] = f.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as exc:   # safetensors' own errors
            raise CheckpointError(f"{file}: cannot read tensors ({type(exc).__name__}: "
                                  f"{_one_line(exc)})") from None
    return out


def _load_pickle(path: Path, dtype, device, allow_pickle: bool,
                 attn_implementation: str | None) -> PreTrainedModel:
    obj = _unpickle(path, allow_pickle)
    inner = obj["model"]
    sd = {k: v for k, v in inner.state_dict().items() if not k.endswith(IGNORED_TENSORS)}
    stock = inner.config
    fam = family_of(stock.model_type, str(path))
    spec = fam.infer_spec(stock, {k: tuple(v.shape) for k, v in sd.items()})
    spec = spec.replace_layers(spec.layers, source=str(path), source_format="llm-pruner")
    config = config_from_dense(stock, spec)
    model_cls = fam.load("model_class")
    stock_layout = fam if fam.converts_checkpoint else None
    expected, tied = expected_shapes(model_cls, config, stock_layout)
    prefix = model_cls.base_model_prefix + "."
    check_tensors({k: TensorInfo(str(path), str(v.dtype), tuple(v.shape)) for k, v in sd.items()},
                  expected, tied, prefix)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = model_cls(config)
    model.load_state_dict(fam.to_ours(_normalized(sd, expected, prefix), spec), strict=False)
    model.tie_weights()
    if isinstance(dtype, str):
        dtype = dtypes.to_torch(dtype)
    model = model.to(dtype=dtype or next(iter(sd.values())).dtype)
    if device is not None and device != "auto":
        model = model.to(device)
    return model.eval()


def _unpickle(path: Path, allow_pickle: bool) -> dict[str, Any]:
    if not allow_pickle:
        raise CheckpointError(f"{path}: refusing to unpickle (a pickle can run arbitrary code); "
                              "pass allow_pickle=True (CLI: --allow-pickle) only for files you "
                              "trust")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from None
    if not (isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], PreTrainedModel)):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected an LLM-Pruner file torch.save({{'model': "
                              f"<PreTrainedModel>, 'tokenizer': ...}}), got {keys}")
    return obj


def load_tokenizer(path: str | os.PathLike, *, allow_pickle: bool = False):
    """The tokenizer saved with a checkpoint (directory, the pickle's ``'tokenizer'``, or the one
    a GGUF file's metadata describes)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if gguf_input.is_gguf(path):
        return gguf_input.load_tokenizer(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        tok = _unpickle(path, allow_pickle).get("tokenizer")
        if tok is None:
            raise CheckpointError(f"{path}: the pickle has no 'tokenizer' entry")
        return tok
    if path.is_dir():
        check_links_stay_inside(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise CheckpointError(f"{path}: no loadable tokenizer ({first.strip()[:300]})") from None


def convert_native(src: str | os.PathLike, dst: str | os.PathLike, *, allow_pickle: bool = False,
                   dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Rewrite any accepted checkpoint into our format at ``dst`` (all or nothing)."""
    from ecospa_deploy.atomic import atomic_directory, check_output

    check_output(dst, overwrite, sources=(src,))     # before the (slow) load
    model = load_model(src, dtype=dtype, allow_pickle=allow_pickle)
    try:
        tokenizer = load_tokenizer(src, allow_pickle=allow_pickle)
    except CheckpointError:
        tokenizer = None
    with atomic_directory(dst, overwrite=overwrite, sources=(src,)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(dst)


__all__ = ["load_model", "load_tokenizer", "convert_native", "read_safetensors_header",
           "read_checkpoint_index"]
