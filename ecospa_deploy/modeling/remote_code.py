"""Make a saved checkpoint loadable with ``trust_remote_code=True`` where our package is absent.

``save_pretrained`` writes these modeling sources next to the weights, plus ``auto_map`` in
config.json. In the package they import the spec as ``..spec``; in a checkpoint directory the
spec sits beside them, so that one import is rewritten to ``.spec``. The sources are copied, not
generated, so what runs remotely is exactly what runs here.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_COMMON = ("configuration_ecospa.py", "attention.py", "kv_cache.py", "lm_head.py", "remote_code.py")


def _spec_source() -> Path:
    # In the package: ecospa_deploy/spec.py; in a checkpoint directory: ./spec.py.
    local = _HERE / "spec.py"
    return local if local.exists() else _HERE.parent / "spec.py"


def write_remote_code(directory: str | os.PathLike, modeling_file: str) -> None:
    out = Path(directory)
    for name in (*_COMMON, modeling_file):
        text = (_HERE / name).read_text(encoding="utf-8")
        (out / name).write_text(text.replace("from ..spec import", "from .spec import"),
                                encoding="utf-8")
    shutil.copyfile(_spec_source(), out / "spec.py")


class RemoteCodeSaveMixin:
    """``save_pretrained`` that also writes the modeling sources and ``auto_map``.

    The modeling file and ``auto_map`` entries are derived from the classes themselves.
    """

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any,
                        **kwargs: Any) -> None:
        modeling_file = Path(inspect.getfile(type(self))).name
        module = modeling_file.removesuffix(".py")
        self.config.auto_map = {
            "AutoConfig": f"configuration_ecospa.{type(self.config).__name__}",
            "AutoModel": f"{module}.{type(self.base_model).__name__}",
            "AutoModelForCausalLM": f"{module}.{type(self).__name__}",
        }
        self.config.architectures = [type(self).__name__]
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory, modeling_file)
