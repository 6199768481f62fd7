"""`ecospa <verb>`: one dispatcher; each verb lives in ``ecospa_deploy.commands.<verb>``.

A verb module has a docstring (its ``--help`` text; first line is the summary),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their verb
runs, so ``ecospa --help`` stays fast and a verb's heavy imports never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# verb -> its module (ecospa_deploy.commands.<verb>) and the one-line summary `ecospa --help`
# shows without importing it
VERBS: dict[str, str] = {
    "inspect": "per-layer shapes, parameters, bytes and KV-cache size of a checkpoint",
    "prune": "prune a dense or pruned model to a target size (EcoSpa, numerical, baselines)",
    "eval": "held-out perplexity (non-overlapping windows) and a quick generation",
    "convert": "rewrite a checkpoint: native (our format), onnx, vllm, gguf (llama.cpp)",
    "bench": "dense vs pruned speed and memory against the physical floor; "
             "`bench serve`: a serving benchmark against any OpenAI-compatible URL",
    "serve": "OpenAI-compatible HTTP server for a (pruned) model",
}


def _settings_before_torch() -> None:
    """OpenMP settings that survive a busy machine (``ecospa_deploy.threads``), before torch;
    and, when stderr is not a terminal (a log file, CI), progress bars that redraw every 30 s
    instead of writing hundreds of lines (tqdm reads ``TQDM_MININTERVAL``)."""
    import os

    from ecospa_deploy.threads import configure

    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")

    try:
        configure()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _load_verb(verb: str):
    return importlib.import_module(f"ecospa_deploy.commands.{verb}")


def _verb_parser(verb: str, prog: str) -> tuple[argparse.ArgumentParser, object]:
    module = _load_verb(verb)
    doc = (module.__doc__ or VERBS[verb]).strip()
    summary, _, details = doc.partition("\n")
    parser = argparse.ArgumentParser(
        prog=prog, description=summary, epilog=details.strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser, module


def run_verb(verb: str, argv: Sequence[str], prog: str | None = None) -> int:
    _settings_before_torch()
    if verb == "bench" and list(argv[:1]) == ["serve"]:   # the serving benchmark (any URL)
        from ecospa_deploy.serve.benchmark import main as bench_serve

        return bench_serve(list(argv[1:]))
    parser, module = _verb_parser(verb, prog or f"ecospa {verb}")
    args = parser.parse_args(list(argv))
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ecospa inspect ... | head`
        sys.stderr.close()
        return 0
    except ModuleNotFoundError as exc:  # an optional dependency a verb's module imports
        from ecospa_deploy.extras import explain_missing_module

        message = explain_missing_module(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # user-facing errors (UsageError, SpecError...) carry their message
        from ecospa_deploy.errors import USER_ERRORS

        if isinstance(exc, USER_ERRORS):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: ecospa <verb> [options]   (ecospa <verb> --help for details)", "",
                 "verbs:"]
        lines += [f"  {v:<8} {summary}" for v, summary in VERBS.items()]
        print("\n".join(lines))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ecospa_deploy.version import VERSION as __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}; expected one of {', '.join(VERBS)}",
              file=sys.stderr)
        return 2
    return run_verb(verb, rest)


def _alias(verb: str):
    def entry(argv: Sequence[str] | None = None) -> int:
        return run_verb(verb, list(sys.argv[1:] if argv is None else argv), f"ecospa-{verb}")

    entry.__name__ = f"{verb}_main"
    entry.__doc__ = f"`ecospa-{verb}`: alias of `ecospa {verb}`."
    return entry


serve_main = _alias("serve")
prune_main = _alias("prune")
bench_main = _alias("bench")
convert_main = _alias("convert")


if __name__ == "__main__":
    sys.exit(main())
