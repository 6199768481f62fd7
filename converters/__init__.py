"""Exporters to other runtimes (installed as ``ecospa_deploy.converters``): ONNX and vLLM."""
