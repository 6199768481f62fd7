"""``ecospa serve`` (engine backend) under load, dense vs pruned twin of a shape, on one GPU.

``python -m ecospa_deploy.bench.serve_gpu --shape llama-1b --out DIR``: saves each twin (random
weights, a word-level tokenizer whose every id decodes to text, so each streamed token is one
event) to a temporary directory, starts the server on it, sends ``--requests`` streamed
completions at once with distinct prompt lengths and mixed ``max_tokens``, and writes
``serve_<shape>.json`` with TTFT/TPOT p50/p99 and output tokens/s per model, plus their ratio,
and each model's TTFT floor for the burst (its prefill FLOPs, shortest prompt first, at the
measured matmul ceiling), which no scheduler can beat. ``--loads`` adds, per model, the loads
of ``ecospa bench serve`` (``ecospa_deploy.serve.benchmark``, vLLM's conventions): a random set
of 1024-token prompts and 128-token outputs at once, and the same at Poisson rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    words.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")        # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def ttft_floor_ms(model, prompts: list[list[int]], matmul_flops_per_s: float) -> dict:
    """p50/p99 of the burst's TTFT floor (``floor.burst_ttft_floor_s``) for ``model``."""
    from ecospa_deploy.serve.loadtest import percentile

    from ecospa_deploy.benchmark.floor import burst_ttft_floor_s
    from ecospa_deploy.benchmark.harness import model_facts

    facts = model_facts(model, torch.bfloat16)
    floor = burst_ttft_floor_s(facts["spec"], facts["matmul_params"],
                               [len(p) for p in prompts], matmul_flops_per_s)
    return {q: round(1e3 * percentile(floor, n), 2) for q, n in (("p50", 50), ("p99", 99))}


def burst_arguments(ap: argparse.ArgumentParser) -> None:
    """The burst's arguments (shared with ``serve_replay``, which runs the same burst)."""
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-lens", default="16:1024")
    ap.add_argument("--max-tokens-mix", default="32,64,128")
    ap.add_argument("--max-model-len", type=int, default=1280)


def burst_load(args) -> tuple[dict, int, list[list[int]], list[int]]:
    """``(shape, vocab size, prompts, max_tokens mix)`` of the burst ``args`` describe."""
    from ecospa_deploy.benchmark.shapes import load_shape
    from ecospa_deploy.serve.loadtest import token_prompts

    shape = load_shape(args.shape)
    vocab = shape["dense"]["vocab_size"]
    lo, hi = (int(x) for x in args.prompt_lens.split(":"))
    mix = [int(x) for x in args.max_tokens_mix.split(",")]
    return shape, vocab, token_prompts(args.requests, lo, hi, vocab), mix


def server_arguments(ap: argparse.ArgumentParser, server: str, example: str,
                     rates: str) -> None:
    """The arguments of a run against one server (``server``, with a flag as ``example``):
    the loads beside the burst, the server's own flags, the output (shared with
    ``serve_peer``)."""
    ap.add_argument("--loads", action="store_true",
                    help="also the random 1024-in/128-out set at once and at --rates")
    ap.add_argument("--rates", default=rates, help="Poisson request rates for --loads")
    ap.add_argument("--server-args", default="", help=f"more {server} flags, one string "
                    f"after '=' (--server-args=\"{example}\"; a lone flag after a "
                    "space is read as this command's own option)")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--out", type=Path, required=True)


def output_name(shape: dict, arg: str) -> str:
    """The shape's name in output file names (``arg``'s stem when the file has none)."""
    return shape.get("name") or Path(arg).stem


def load_plan(args, vocab: int) -> list[tuple[list, float]]:
    """``[(requests, rate)]`` of ``--loads``: the random 1024/128 set at once, then at each of
    ``--rates`` (Poisson), the same requests each time."""
    import math

    from ecospa_deploy.serve.benchmark import random_requests

    reqs = random_requests(args.requests * 2, 1024, 128, 0.0, vocab, seed=1)
    return [(reqs, rate) for rate in [math.inf] + [float(r) for r in args.rates.split(",")]]


def main(argv=None) -> int:
    from ecospa_deploy.serve.loadtest import run_stream_load
    from ecospa_deploy.serve.process import ServerProcess

    from ecospa_deploy.benchmark.floor import measure_ceilings
    from ecospa_deploy.benchmark.host import host_facts
    from ecospa_deploy.benchmark.shapes import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    burst_arguments(ap)
    server_arguments(ap, "ecospa serve", "--engine-process", rates="8,16,32")
    ap.add_argument("--which", default="dense,pruned", help="the twins to serve, in order")
    args = ap.parse_args(argv)
    shape, vocab, prompts, mix = burst_load(args)
    server_args = ["--backend", "engine", "--dtype", "bfloat16", "--device", "cuda",
                   "--max-batch-size", str(args.requests), "--max-model-len",
                   str(args.max_model_len), "--max-queue", str(4 * args.requests),
                   *shlex.split(args.server_args)]
    ceil = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_{output_name(shape, args.shape)}{args.tag}.json"
    result = dict(shape=args.shape, server_args=server_args, requests=args.requests,
                  prompt_lens=args.prompt_lens, max_tokens_mix=mix, ceilings=ceil.to_dict(),
                  host=host_facts(), runs={})
    for label in args.which.split(","):
        with tempfile.TemporaryDirectory(prefix=f"ecospa-serve-{label}-") as tmp:
            model = build_model(shape, label == "pruned", torch.bfloat16, torch.device("cuda"))
            model.save_pretrained(tmp)
            word_tokenizer(vocab).save_pretrained(tmp)
            floor = ttft_floor_ms(model, prompts, ceil.matmul)
            del model
            torch.cuda.empty_cache()
            t0 = time.perf_counter()
            log_path = args.out / f"server_{label}{args.tag}.log"   # kept if a limit cuts us
            with ServerProcess(tmp, *server_args, startup_timeout=600.0,
                               log_path=log_path) as srv:
                start_s = time.perf_counter() - t0   # weights, warm-up: every graph captured
                print(f"{label}: server up in {start_s:.1f} s", file=sys.stderr, flush=True)
                asyncio.run(run_stream_load(srv.url, prompts[:4], [4]))       # warm-up
                runs = [asyncio.run(run_stream_load(srv.url, prompts, mix)) for _ in range(2)]
                loads = _loads(srv.url, args, vocab) if args.loads else None
            run = runs[-1]
            run.pop("results")
            run["first_run_tokens_per_s"] = runs[0]["output_tokens_per_s"]
            run["server_start_s"] = round(start_s, 1)
            run["ttft_floor_ms"] = floor      # shortest first at the matmul ceiling
            if args.loads:
                run["loads"] = loads
            result["runs"][label] = run
            print(label, json.dumps(run), flush=True)
            path.write_text(json.dumps(result, indent=1) + "\n")   # kept if a limit cuts the rest
    runs = result["runs"]
    if "dense" in runs and "pruned" in runs:
        result["pruned_over_dense_tokens_per_s"] = (runs["pruned"]["output_tokens_per_s"]
                                                    / runs["dense"]["output_tokens_per_s"])
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    return 0


def _loads(url: str, args, vocab: int) -> list[dict]:
    """The random 1024/128 set at once and at each Poisson rate (``ecospa bench serve``)."""
    from ecospa_deploy.serve.benchmark import run

    out = []
    for reqs, rate in load_plan(args, vocab):
        res = asyncio.run(run(url, reqs, rate=rate, max_concurrency=args.requests, seed=1))
        res.pop("errors", None) if not res.get("errors") else None
        out.append(res)
        print(json.dumps(res), flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
