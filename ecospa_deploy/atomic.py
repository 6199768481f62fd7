"""Write a whole output or nothing: build it next to the target, then rename.

- The output gets the user's normal permissions (``mkdir``'s, i.e. the umask), not the 0700 of
  a private temp dir, so another user or a container running as another uid can read it.
- ``overwrite`` replaces only an empty directory or an earlier output of ours (it holds the
  ``MARKER`` file every ``atomic_directory`` writes), never a file, a symbolic link, an
  unrelated directory or a directory a ``sources`` path lives in.
- SIGTERM while an output is being written ends the process like Ctrl-C does: the temp dir is
  removed on the way out, so no hidden ``.NAME.*.tmp`` is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path
from typing import Iterator, Sequence

from ecospa_deploy.errors import EcospaError

# Written into every output directory; its presence is what lets --overwrite replace one.
MARKER = ".ecospa-output"


def is_our_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory an earlier ``atomic_directory`` wrote."""
    return (Path(path) / MARKER).is_file()


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(target: str | os.PathLike, overwrite: bool = False,
                 sources: Sequence[str | os.PathLike] = ()) -> Path:
    """Raise EcospaError unless ``target`` may be written (replaced, with ``overwrite``).

    Cheap (no heavy imports), so the CLI calls it before loading a model. ``sources`` are the
    inputs of the run: a target that is one of them, or holds one, is refused even when it is
    an earlier output, since replacing it would delete the input.
    """
    target = Path(target)
    real = Path(os.path.realpath(target))
    for src in sources:
        if _contains(real, Path(os.path.realpath(src))):
            raise EcospaError(f"output {target} is the input {src} or contains it; write to "
                              "another directory (an output never replaces its own input)")
    if target.is_symlink():
        raise EcospaError(f"output {target} is a symbolic link (to {os.readlink(target)}); "
                          "give a path that does not exist, or the real directory")
    if not target.exists():
        return target
    if not target.is_dir():
        raise EcospaError(f"output {target} exists and is not a directory; remove it or choose "
                          "another output path")
    if not overwrite:
        raise EcospaError(f"{target} already exists; choose another output path or pass "
                          "--overwrite")
    if any(target.iterdir()) and not is_our_output(target):
        raise EcospaError(f"{target} is not empty and not an earlier output of ecospa-deploy "
                          f"(no {MARKER} file); --overwrite replaces only those: remove it "
                          "yourself or choose another output path")
    return target


def _fresh_dir(parent: Path, name: str) -> Path:
    """A new hidden directory in ``parent`` made like ``mkdir`` makes one (umask applies)."""
    for _ in range(100):
        path = parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
    raise EcospaError(f"could not create a temporary directory in {parent}")


def _normal_permissions(root: Path) -> None:
    """Give everything under ``root`` the modes ``mkdir``/``open`` give under the umask.

    Libraries write some files through private temp files (safetensors: 0600); the umask is
    read off ``root`` itself, made with ``mkdir(0o777)``, so no ``os.umask`` call races.
    """
    umask = 0o777 & ~stat.S_IMODE(root.stat().st_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
            if stat.S_IMODE(st.st_mode) != full & ~umask:
                os.chmod(path, full & ~umask)


class _Terminated(SystemExit):
    """SIGTERM, raised like KeyboardInterrupt so ``finally`` and ``except`` clean up."""


@contextlib.contextmanager
def terminate_cleans_up() -> Iterator[None]:
    """While active, SIGTERM raises SystemExit(143) instead of killing the process outright.

    Only in the main thread and only where SIGTERM still has its default action: a server
    that installed its own graceful handler keeps it.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def _raise(signum, frame):
        raise _Terminated(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False,
                     sources: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``target``; on success it becomes ``target``.

    On any exception (SIGTERM included) the temp dir is removed and ``target`` is untouched,
    so a failed export never leaves a half-written checkpoint behind. See ``check_output`` for
    what ``overwrite`` may replace.
    """
    target = check_output(target, overwrite, sources)
    target.parent.mkdir(parents=True, exist_ok=True)
    with terminate_cleans_up():
        tmp = _fresh_dir(target.parent, target.name)
        try:
            yield tmp
            from ecospa_deploy import __version__

            (tmp / MARKER).write_text(json.dumps({"written_by": "ecospa-deploy",
                                                  "version": __version__}) + "\n")
            _normal_permissions(tmp)
            if target.exists():
                check_output(target, overwrite, sources)   # still ours: nothing raced us
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and a rename: readers never see half a
    file, and SIGTERM in between leaves no temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with terminate_cleans_up():
        try:
            tmp.write_text(text)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path
