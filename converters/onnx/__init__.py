"""ONNX for per-layer-shaped decoders: export with a per-layer KV cache, and run with onnxruntime.

``export_onnx(model, out_dir, ...)`` writes a verified export (see ``export``);
``OrtGenerator(out_dir)`` generates with it (see ``runtime``).
"""

from __future__ import annotations

from .export import DEFAULT_OPSET, DTYPES, EXPORTERS, ExportReport, export_onnx
from .layout import DEFAULT_TARGET, TARGETS, KVLayout, plan_layout
from .metadata import read_export
from .runtime import OrtGenerator, default_providers
from .verify import Verification, VerificationError

__all__ = ["export_onnx", "ExportReport", "OrtGenerator", "default_providers",
           "read_export", "Verification", "VerificationError", "DEFAULT_OPSET", "DTYPES",
           "EXPORTERS", "TARGETS", "DEFAULT_TARGET", "KVLayout", "plan_layout"]
