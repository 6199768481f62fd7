"""Write a whole output or nothing: build it next to the target, then rename.

- The output gets the user's normal permissions (``mkdir``'s, i.e. the umask), not the 0700 of
  a private temp dir, so another user or a container running as another uid can read it.
- ``overwrite`` replaces only an empty directory or an earlier output of ours, exactly as we
  wrote it: ``MARKER`` lists every file with its size, and a file that is not listed (a note the
  user added) or changed size makes the replacement refuse. Never a file, a symbolic link, an
  unrelated directory, the current directory or one holding it, or a directory a ``sources``
  path lives in. The new output is complete before the old one is touched: the old one is
  renamed aside, the new one renamed in, and only then is the old one deleted.
- SIGTERM while an output is being written still ends the process by SIGTERM, but first removes
  what is half written, so no hidden ``.NAME.*.tmp`` is left behind. The handler does it
  itself and does not raise: an exception raised while an ONNX export calls back into Python
  from C++ cannot unwind there and ended in SIGABRT or SIGSEGV. Only the rename of a finished
  output into place holds the signal back until it is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ecospa_deploy.errors import EcospaError

# Written into every output directory; its presence is what lets --overwrite replace one.
MARKER = ".ecospa-output"


def is_our_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory an earlier ``atomic_directory`` wrote."""
    return (Path(path) / MARKER).is_file()


def _files(root: Path) -> dict[str, int]:
    """Every file (and link) under ``root`` but ``MARKER``: relative path -> size."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel != MARKER:
                out[rel] = path.lstat().st_size
    return out


def _not_ours(target: Path) -> list[str]:
    """The files in ``target`` that its ``MARKER`` manifest does not list as written."""
    try:
        listed = json.loads((target / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if not isinstance(listed, dict):
        return ["(no manifest of the files written: an output of an older version, or not "
                "ours)"]
    return sorted(rel for rel, size in _files(target).items() if listed.get(rel) != size)


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
    if _contains(real, Path(os.getcwd()).resolve()):
        raise EcospaError(f"output {target} is the current directory or holds it; --overwrite "
                          "never replaces those: write to another path")
    if any(target.iterdir()):
        if not is_our_output(target):
            raise EcospaError(f"{target} is not empty and not an earlier output of "
                              f"ecospa-deploy (no {MARKER} file); --overwrite replaces only "
                              "those: remove it yourself or choose another output path")
        extra = _not_ours(target)
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5
                                            else "")
            raise EcospaError(f"{target} holds files ecospa-deploy did not write (or that "
                              f"changed since): {shown}; --overwrite deletes only an output "
                              "exactly as it was written: move those away or choose another "
                              "output path")
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


# Temp paths being written now: the SIGTERM handler removes them before the process dies,
# after it has run the callbacks of ``on_terminate`` (a child process that writes there).
_IN_FLIGHT: set[Path] = set()
_ON_TERMINATE: list[Callable[[], object]] = []
# A SIGTERM that arrives inside ``_holding_sigterm`` waits in _HELD until the block ends.
_HOLDING = [0]
_HELD: list[int] = []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def in_flight(path: Path) -> Iterator[None]:
    _IN_FLIGHT.add(path)
    try:
        yield
    finally:
        _IN_FLIGHT.discard(path)


@contextlib.contextmanager
def on_terminate(callback: Callable[[], object]) -> Iterator[None]:
    """Within the block, a SIGTERM runs ``callback`` before it removes the paths in flight
    (e.g. kill the child process that writes into one)."""
    _ON_TERMINATE.append(callback)
    try:
        yield
    finally:
        _ON_TERMINATE.remove(callback)


def _die(signum: int) -> None:
    """Remove what is half written, then die of ``signum`` as its default action would (the
    parent sees the real cause; a shell prints 128 + signum)."""
    for callback in reversed(_ON_TERMINATE):
        with contextlib.suppress(Exception):
            callback()
    for path in list(_IN_FLIGHT):
        _remove(path)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _on_sigterm(signum, frame) -> None:
    if _HOLDING[0]:
        _HELD.append(signum)
        return
    _die(signum)


@contextlib.contextmanager
def _holding_sigterm() -> Iterator[None]:
    """Hold a SIGTERM that arrives here until the block ends: the renames that swap a finished
    output in must not stop half way (the old output aside, the new one not yet in)."""
    _HOLDING[0] += 1
    try:
        yield
    finally:
        _HOLDING[0] -= 1
        if not _HOLDING[0] and _HELD:
            _die(_HELD.pop())


@contextlib.contextmanager
def terminate_cleans_up() -> Iterator[None]:
    """While active, SIGTERM removes the paths in flight before it kills the process.

    Only in the main thread and only where SIGTERM still has its default action: a server
    that installed its own graceful handler keeps it.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, _on_sigterm)):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
            with in_flight(tmp):
                yield tmp
                from ecospa_deploy.version import VERSION as __version__

                (tmp / MARKER).write_text(json.dumps({"written_by": "ecospa-deploy",
                                                      "version": __version__,
                                                      "files": _files(tmp)}, indent=1) + "\n")
                _normal_permissions(tmp)
                with _holding_sigterm():
                    _swap_in(tmp, target, overwrite, sources)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_in(tmp: Path, target: Path, overwrite: bool, sources) -> None:
    """Rename ``tmp`` to ``target``; an old output goes aside first and is deleted last."""
    old = None
    if target.exists():
        check_output(target, overwrite, sources)   # still ours: nothing raced us
        old = _fresh_dir(target.parent, target.name + ".old")
        os.replace(target, old)                   # aside, whole, until the new is in
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and a rename: readers never see half a
    file, and SIGTERM in between leaves no temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with terminate_cleans_up(), in_flight(tmp):
        try:
            tmp.write_text(text)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path
