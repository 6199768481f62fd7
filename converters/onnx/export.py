"""Export our causal LM to ONNX with a per-layer KV cache, verify it, write it atomically.

Output directory: ``model.onnx`` (+ ``model.onnx.data`` when weights exceed
``EXTERNAL_DATA_BYTES``: protobuf caps a single file at 2 GiB), ``genai_config.json``
(onnxruntime-genai), ``config.json`` (optimum; target ``optimum`` only), ``ecospa_export.json``
(our per-layer shapes, see ``metadata``), ``export_report.json`` (settings and
verification errors) and the tokenizer when one is given. ``target`` picks the KV-cache layout
(``layout``): ``optimum`` (default; runs on optimum, onnxruntime-genai and
``OrtGenerator``), ``genai`` (onnxruntime-genai and ``OrtGenerator``), ``ort`` (the smallest
cache; ``OrtGenerator`` only). Everything is written into a temp dir beside the target
and renamed only after onnxruntime has matched PyTorch, so a failed export leaves nothing.

Two exporters: ``dynamo`` (``torch.export``, the maintained path; opset >= 18) and ``legacy``
(TorchScript tracing; ~40x faster on small models, deprecated upstream). Both produce the same
inputs/outputs and are verified the same way.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecospa_deploy import dtypes
from ecospa_deploy.atomic import atomic_directory
from ecospa_deploy.errors import UnsupportedError

from .graph import DecoderGraph
from .layout import DEFAULT_TARGET, TARGETS, KVLayout, plan_layout
from .metadata import (CONFIG_NAME, DATA_NAME, EXPORT_NAME, HF_CONFIG_NAME, MODEL_NAME,
                            build_export_block, build_genai_config, build_hf_config, write_json)
from .runtime import OrtGenerator
from .verify import Verification, raise_if_failed, verify

DTYPES = ("fp32", "fp16")
EXPORTERS = ("dynamo", "legacy")
OPSETS = {"dynamo": range(18, 24), "legacy": range(14, 21)}
DEFAULT_OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass
class ExportReport:
    path: Path
    dtype: str
    opset: int
    exporter: str
    use_past: bool
    target: str
    kv_overhead_pct: float
    external_data: bool
    onnx_bytes: int
    export_seconds: float
    verification: Verification | None

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "dtype": self.dtype, "opset": self.opset,
                "exporter": self.exporter, "use_past": self.use_past, "target": self.target,
                "kv_overhead_pct": round(self.kv_overhead_pct, 3),
                "external_data": self.external_data, "onnx_bytes": self.onnx_bytes,
                "export_seconds": round(self.export_seconds, 2),
                "verification": self.verification.as_dict() if self.verification else None}


def _check_options(model: Any, dtype: str, opset: int, exporter: str, target: str) -> None:
    from ecospa_deploy.modeling import is_ecospa_model

    if not is_ecospa_model(model):
        raise UnsupportedError(f"cannot export {type(model).__name__}; expected one of our "
                               "causal LMs (load it with ecospa_deploy.loading.load_model, or "
                               "wrap a stock HF model with ecospa_deploy.modeling.from_hf)")
    if dtype not in DTYPES:
        raise UnsupportedError(f"dtype={dtype!r} is not supported; expected one of "
                               f"{sorted(DTYPES)}")
    if exporter not in EXPORTERS:
        raise UnsupportedError(f"exporter={exporter!r}; expected one of {list(EXPORTERS)}")
    if target not in TARGETS:
        raise UnsupportedError(f"target={target!r}; expected one of {list(TARGETS)}")
    allowed = OPSETS[exporter]
    if opset not in allowed:
        raise UnsupportedError(f"opset={opset} is not supported by the {exporter} exporter; "
                               f"expected {allowed.start}..{allowed.stop - 1}")


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _run_exporter(graph: DecoderGraph, path: Path, opset: int, exporter: str,
                  external_data: bool) -> None:
    args = graph.example_inputs()
    io = graph.io
    with warnings.catch_warnings():
        # Tracing warns about Python bools/constants it freezes; the verification that follows
        # is what proves the graph right for other shapes.
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(graph, args, dynamo=True, opset_version=opset,
                                        dynamic_shapes=graph.dynamic_shapes(),
                                        input_names=io.inputs, output_names=io.outputs,
                                        verbose=False)
            program.save(str(path), external_data=external_data)
            return
        raw = path.parent / "raw"
        raw.mkdir()
        torch.onnx.export(graph, args, str(raw / MODEL_NAME), dynamo=False, opset_version=opset,
                          input_names=io.inputs, output_names=io.outputs,
                          dynamic_axes=graph.dynamic_axes(), do_constant_folding=True)
    import onnx

    proto = onnx.load(str(raw / MODEL_NAME), load_external_data=True)
    onnx.save_model(proto, str(path), save_as_external_data=external_data,
                    all_tensors_to_one_file=True, location=DATA_NAME, size_threshold=1024)
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()


def _write_metadata(directory: Path, model: Any, layout: KVLayout, *, dtype: str, opset: int,
                    use_past: bool, exporter: str) -> None:
    write_json(directory, CONFIG_NAME, build_genai_config(model, layout, use_past=use_past))
    write_json(directory, EXPORT_NAME, build_export_block(model, layout, dtype=dtype,
                                                          opset=opset, use_past=use_past,
                                                          exporter=exporter))
    if layout.target == "optimum":
        write_json(directory, HF_CONFIG_NAME, build_hf_config(model, layout, dtype=dtype))


# transformers 5 saves fast tokenizers as ``TokenizersBackend``, a class transformers 4 (what
# optimum pins) does not have; ``PreTrainedTokenizerFast`` names the same tokenizer in both.
_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """``save_pretrained``, with a ``tokenizer_class`` that transformers 4 and 5 both load."""
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        old = config.get("tokenizer_class")
        if old in _TOKENIZER_CLASSES:
            config["tokenizer_class"] = _TOKENIZER_CLASSES[old]
            # transformers 4's PreTrainedTokenizerFast also returns token_type_ids, which
            # ``generate`` of a decoder rejects; the graph takes ids and mask only.
            config.setdefault("model_input_names", ["input_ids", "attention_mask"])
            path.write_text(json.dumps(config, indent=2) + "\n")


def export_onnx(model: torch.nn.Module, out_dir: str | Path, *, dtype: str = "fp32",
                opset: int = DEFAULT_OPSET, use_past: bool = True, exporter: str = "dynamo",
                external_data: bool | None = None, verify_steps: int = 4,
                tokenizer: Any = None, overwrite: bool = False,
                target: str = DEFAULT_TARGET) -> ExportReport:
    """Export, verify (raises ``VerificationError`` above tolerance) and write ``out_dir``.

    ``model`` is not modified: a copy is cast when ``dtype`` differs from its own, and the
    attention implementation is switched to eager only for the export and then restored.
    ``external_data=None`` chooses it from the weight size. ``target``: ``optimum``,
    ``genai`` or ``ort`` (see the module docstring and ``layout``).
    """
    _check_options(model, dtype, opset, exporter, target)
    if verify_steps < 1:
        raise UnsupportedError(f"verify_steps={verify_steps}; expected >= 1 (verification "
                               "cannot be skipped)")
    torch_dtype = dtypes.to_torch(dtype)
    same = model.lm_head.weight.dtype == torch_dtype
    work = model if same else copy.deepcopy(model).to(torch_dtype)
    work.eval()
    previous_attn = work.config._attn_implementation
    # Plain matmul/softmax ops for any q/k and v dim. Every attention module reads this one
    # shared config, so setting it here reaches all layers.
    work.config._attn_implementation = "eager"
    if external_data is None:
        external_data = _param_bytes(work) > EXTERNAL_DATA_BYTES
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            layout = plan_layout(work.config.ecospa_spec, target)
            graph = DecoderGraph(work, use_past=use_past, layout=layout).eval()
            start = time.perf_counter()
            _run_exporter(graph, tmp / MODEL_NAME, opset, exporter, external_data)
            seconds = time.perf_counter() - start
            _write_metadata(tmp, work, layout, dtype=dtype, opset=opset, use_past=use_past,
                            exporter=exporter)
            runner = OrtGenerator(tmp, providers=["CPUExecutionProvider"])
            result = verify(work, runner, dtype, steps=verify_steps)
            del runner
            raise_if_failed(result)
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp)
            size = sum(f.stat().st_size for f in tmp.iterdir() if f.name.startswith(MODEL_NAME))
            report = ExportReport(Path(out_dir), dtype, opset, exporter, use_past, target,
                                  layout.overhead_pct(work.config.ecospa_spec),
                                  external_data, size, seconds, result)
            (tmp / "export_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    finally:
        work.config._attn_implementation = previous_attn
    return report


__all__ = ["export_onnx", "ExportReport", "save_tokenizer", "DTYPES", "EXPORTERS", "OPSETS",
           "DEFAULT_OPSET", "TARGETS", "DEFAULT_TARGET"]
