"""eval: not available yet in this build.

This verb is being built; until then it exits with status 2 and this message.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    from ecospa_deploy.cli import CLIError

    raise CLIError("`ecospa eval` is not available yet in this build")
