"""Write a whole output directory or nothing: build it next to the target, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ecospa_deploy.errors import EcospaError


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``target``; on success it becomes ``target``.

    On any exception the temp dir is removed and ``target`` is untouched, so a failed export
    never leaves a half-written checkpoint behind.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise EcospaError(f"{target} already exists; choose another output path or pass "
                          "--overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
