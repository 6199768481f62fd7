"""Write a pruned model as a llama.cpp GGUF file (``deci`` architecture, per-layer shapes).

Outtypes: ``f32``, ``f16``, ``bf16`` and the legacy block quants (``q8_0``, ``q4_0``, ``q4_1``,
``q5_0``, ``q5_1``) are written by the ``gguf`` package itself; k-quants (``q4_k_m``, ...) are
made from an f32 file by llama.cpp's own quantizer (``llama-cpp-python``), which also picks the
per-tensor mix those types mean. Norms, biases and ``rope_freqs`` stay float32; a matrix whose
rows are not a whole number of quant blocks (an FFN width that is not a multiple of 32) is
written as f16 and named in the report (``--ffn-multiple`` pads widths instead, exactly).

The file is written beside ``out`` under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ecospa_deploy.errors import UnsupportedError, UsageError
from ecospa_deploy.extras import require
from ecospa_deploy.families import spec_of

from .plan import GGUF_PY_TYPES, LLAMA_CPP_TYPES, ARCH, OUTTYPES, PaddingCost, plan
from .tensors import gguf_tensors
from .vocab import add_vocab

@dataclass
class GGUFReport:
    path: str
    outtype: str
    bytes: int
    params_written: int          # elements in the file (padding included)
    padding: PaddingCost
    pre_tokenizer: str | None
    f16_fallback: list[str] = field(default_factory=list)   # rows not a whole quant block
    verify: dict | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["padding"]["extra"] = self.padding.extra
        return d


def _encode(name: str, data: np.ndarray, kind: str, fallback: list[str]):
    """``(array, raw_shape, raw_dtype)`` for ``GGUFWriter.add_tensor``."""
    import gguf

    q = gguf.GGMLQuantizationType
    if data.ndim == 1 or kind == "F32":
        return data.astype(np.float32), None, q.F32
    qtype = getattr(q, kind)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        fallback.append(name)
        qtype = q.F16
    # quantized rows come back as bytes; the writer derives the element shape from them
    return gguf.quants.quantize(data, qtype), None, qtype


def write_gguf(model, out: str | os.PathLike, tokenizer=None, outtype: str = "f16",
               ffn_multiple: int | None = None, overwrite: bool = False,
               name: str | None = None) -> GGUFReport:
    """Write ``model`` (ours, any accepted checkpoint once loaded) to the GGUF file ``out``."""
    require("gguf", "ecospa convert gguf")
    import gguf

    if outtype not in OUTTYPES:
        raise UsageError(f"outtype={outtype!r}; expected one of {list(OUTTYPES)}")
    if outtype in LLAMA_CPP_TYPES:
        require("llamacpp", f"--outtype {outtype} (llama.cpp's quantizer)")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out} is a directory; a GGUF output is one file (e.g. {out}.gguf)")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if tokenizer is None:
        raise UsageError("llama.cpp needs the tokenizer inside the GGUF, and this checkpoint "
                         "has none; save the tokenizer next to the model first")
    family, spec = spec_of(model)
    config = model.config
    p = plan(spec, config, family.activation(config), family.parts(model).rotary, ffn_multiple)
    theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    tensor_kind, file_type = GGUF_PY_TYPES.get(outtype, ("F32", "ALL_F32"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fallback: list[str] = []
    written = 0
    try:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_name(name or out.stem)
        w.add_block_count(spec.num_layers)
        w.add_context_length(int(family.max_positions(config) or 2048))
        w.add_embedding_length(spec.hidden_size)
        w.add_feed_forward_length([lp.n_ff for lp in p.layers])
        w.add_head_count([lp.n_head for lp in p.layers])
        w.add_head_count_kv([lp.n_head_kv for lp in p.layers])
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(float(family.norm_eps(config)))
        w.add_key_length(p.head_dim)
        w.add_value_length(p.head_dim)
        w.add_rope_dimension_count(p.head_dim)
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(getattr(gguf.LlamaFileType, file_type))
        if tensor_kind not in ("F32", "F16", "BF16"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        pre = add_vocab(w, tokenizer, config.vocab_size)
        for tname, data in gguf_tensors(model, family, spec, p, theta):
            written += data.size
            arr, shape, qtype = _encode(tname, data, tensor_kind, fallback)
            w.add_tensor(tname, arr, raw_shape=shape, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if outtype in LLAMA_CPP_TYPES:
            _llama_cpp_quantize(tmp, LLAMA_CPP_TYPES[outtype])
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return GGUFReport(str(out), outtype, out.stat().st_size, written, p.cost, pre, fallback)


def _llama_cpp_quantize(path: Path, ftype: str) -> None:
    """Quantize the f32 file ``path`` in place with llama.cpp's quantizer."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = os.cpu_count() or 1
    dst = path.with_name(path.name + ".q")
    try:
        rc = llama_cpp.llama_model_quantize(str(path).encode(), str(dst).encode(),
                                            params)
        if rc != 0:
            raise UnsupportedError(f"llama.cpp's quantizer failed ({rc}) for {ftype}")
        os.replace(dst, path)
    finally:
        if dst.exists():
            dst.unlink()
