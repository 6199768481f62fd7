"""vLLM: ``plan`` (what vLLM needs and what padding costs; shapes only), ``convert`` (``ecospa
convert vllm``), ``plugin`` (the ``vllm.general_plugins`` entry point), the vLLM model classes
``llama`` / ``gpt2`` with ``common``, and ``parity`` (greedy tokens from vLLM for the parity
tests). Only the plugin's model modules import vLLM; importing this package imports nothing.
"""
