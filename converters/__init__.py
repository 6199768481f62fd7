"""Exporters to other runtimes (installed as ``ecospa_deploy.converters``), one subpackage each:

- ``onnx``: ONNX decoder with a per-layer KV cache (``export_onnx``, ``OrtGenerator``);
- ``vllm``: a directory ``vllm serve`` runs through our plugin;
- ``gguf``: one GGUF file llama.cpp runs (``ecospa convert gguf``).

Each is verified against our HF modeling in the runtime itself before an output is kept.
"""
