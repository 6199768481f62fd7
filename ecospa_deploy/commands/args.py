"""Argument types and checks the verbs share; cheap, so bad arguments fail before torch loads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ecospa_deploy.errors import UsageError


def require_paths(*paths: tuple[str, str | None]) -> None:
    """Raise UsageError for the first ``(label, path)`` whose path is given but does not exist;
    verbs call it before importing torch, so a typo answers at once."""
    for label, path in paths:
        if path is not None and not Path(path).exists():
            raise UsageError(f"{label} {path}: no such file or directory")


def require_model(label: str, path: str | None) -> None:
    """``require_paths`` for a model: a directory must hold a config.json (a file may be a
    GGUF or a pickle; the loader checks those). Before torch loads: answers in a blink, not
    after the seconds a torch import takes."""
    require_paths((label, path))
    if path is not None and Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise UsageError(f"{label} {path}: no config.json; expected a model directory "
                         "(config.json + safetensors), a .gguf file or an LLM-Pruner pickle")


def port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; expected a port number 0-65535") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value}; expected a port number 0-65535 (0: any "
                                         "free port)")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}; expected an integer >= 1")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1 ("1,8,32")."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; expected comma-separated integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}; expected comma-separated integers >= 1")
    return values


def check_output(output: str, overwrite: bool, sources: Sequence[str] = ()) -> None:
    """The output rules of ``ecospa_deploy.atomic`` (never a source, a file or a link; replace
    only an earlier output of ours with --overwrite), checked before the work starts."""
    from ecospa_deploy.atomic import check_output as check

    check(output, overwrite, sources)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True,
                        help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it is empty or an earlier ecospa output (never "
                        "the input, a file or a symbolic link)")
