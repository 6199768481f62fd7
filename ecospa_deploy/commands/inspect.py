"""Per-layer shapes, parameters, bytes and KV-cache size of a checkpoint.

Reads only config.json and the safetensors headers, never the weights, so it takes about as
long for a 70B model as for a tiny one, and works on foreign pruned checkpoints (shapes
inferred from tensors). A GGUF file is described from its metadata and tensor table (needs
the 'gguf' extra; checkpoint_dtypes are its GGML types).

examples:
  ecospa inspect ./pruned-llama
  ecospa inspect ./pruned-llama --json > facts.json
  ecospa inspect ./SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory (ours or a foreign HF directory) or "
                                      "a GGUF file")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def run(args: argparse.Namespace) -> int:
    from ecospa_deploy.commands.args import require_model

    require_model("checkpoint", args.path)
    from ecospa_deploy.inspect import describe, format_table

    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0
