"""llama.cpp (GGUF) export: ``ecospa convert gguf``. Pruned models run in llama.cpp exactly.

``plan`` (what llama.cpp's per-layer ``deci`` architecture can hold, what padding costs; shapes
only), ``tensors`` (weights in llama.cpp's layout), ``vocab`` (the tokenizer as metadata),
``write`` (the file, quantized) and ``verify`` (llama.cpp against our modeling). Needs the
``gguf`` extra; verification and k-quants need ``llamacpp``. Importing the package imports no
torch (the CLI reads ``OUTTYPES``).
"""

from __future__ import annotations

from .plan import OUTTYPES


def convert_gguf(model, out, tokenizer=None, outtype: str = "f16",
                 ffn_multiple: int | None = None, overwrite: bool = False,
                 verify: bool | None = None):
    """Write ``model`` to the GGUF file ``out`` and (``verify``: default when llama-cpp-python is
    installed) check it in llama.cpp; a failed check removes the file and raises. Returns the
    ``write.GGUFReport``."""
    from ecospa_deploy.errors import UnsupportedError
    from ecospa_deploy.extras import is_installed, require

    from .write import write_gguf

    if verify is None:
        verify = is_installed("llamacpp")
    elif verify:
        require("llamacpp", "verifying a GGUF in llama.cpp")
    report = write_gguf(model, out, tokenizer=tokenizer, outtype=outtype,
                        ffn_multiple=ffn_multiple, overwrite=overwrite)
    if verify:
        from .verify import verify_gguf

        report.verify = verify_gguf(report.path, model, tokenizer, outtype)
        if not report.verify["ok"]:
            import os

            os.unlink(report.path)
            raise UnsupportedError(f"llama.cpp does not reproduce the model ({report.verify}); "
                                   "the GGUF was removed")
    return report


__all__ = ["OUTTYPES", "convert_gguf"]
