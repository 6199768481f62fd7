"""Exporters to other runtimes (installed as ``ecospa_deploy.converters``): ONNX, vLLM, GGUF.

ONNX: ``onnx`` (public API: ``export_onnx``, ``OrtGenerator``), built from ``onnx_graph`` (the
flat per-layer-KV signature), ``onnx_layout`` (the KV-cache shapes of each ``--target``),
``onnx_export``, ``onnx_verify``, ``onnx_metadata`` and ``onnx_runtime``.

vLLM: ``vllm_plan`` (what vLLM needs and what padding costs; shapes only), ``vllm_convert``
(``ecospa convert vllm``), ``vllm_plugin`` (the ``vllm.general_plugins`` entry point), the vLLM
model classes ``vllm_llama`` / ``vllm_gpt2`` with ``vllm_common``, and ``vllm_parity`` (greedy
tokens from vLLM for the parity tests). Only the plugin's model modules import vLLM.

GGUF (llama.cpp): the ``gguf`` subpackage (``ecospa convert gguf``).
"""
