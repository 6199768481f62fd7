"""The peer on ``serve_gpu``'s load: ``transformers serve --continuous-batching``, the dense model.

``python -m ecospa_deploy.bench.serve_peer --shape llama-1b --out DIR [--server-args="--cb-use-cuda-graph"]``
builds the shape's dense model as its stock transformers class (``transformers serve`` loads
stock classes only, so the pruned twin, whose layers each have their own shape, is ours alone),
random weights, with ``serve_gpu``'s word tokenizer (every id one word, so a prompt's text is as
many tokens as ``serve_gpu``'s ids), starts ``transformers serve`` on it and sends the same
64-stream burst twice through ``ecospa bench serve``'s client, as text to ``/v1/completions``
without ``ignore_eos`` (the peer refuses the field; its output token counts come from its
``usage``). ``--loads`` adds the random 1024-in/128-out set at once and at ``--rates``.
Writes ``serve_peer_<shape>[TAG].json``: ``ecospa bench serve``'s metrics per load. Where the
peer's extra is not installed (``pip install 'transformers[serving]'``) it says so and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from ecospa_deploy.bench.serve_gpu import burst_arguments, burst_load, word_tokenizer


def peer_command(model_dir: str, port: int, device: str, dtype: str, extra: list[str]
                 ) -> list[str]:
    """``transformers serve`` with continuous batching on ``model_dir`` at ``port``."""
    return [sys.executable, "-c", "from transformers.cli.transformers import main; main()",
            "serve", model_dir, "--continuous-batching", "--host", "127.0.0.1",
            "--port", str(port), "--device", device, "--dtype", dtype, "--log-level", "warning",
            *extra]


def main(argv=None) -> int:
    from transformers.utils.import_utils import is_serve_available

    from ecospa_deploy.benchmark.shapes import build_stock_model
    from ecospa_deploy.serve.benchmark import Request, format_row, random_requests, run
    from ecospa_deploy.serve.process import ChildServer, free_port

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    burst_arguments(ap)
    ap.add_argument("--loads", action="store_true",
                    help="also the random 1024-in/128-out set at once and at --rates")
    ap.add_argument("--rates", default="16,32", help="Poisson request rates for --loads")
    ap.add_argument("--server-args", default="", help="more transformers serve flags, one "
                    "string after '=' (--server-args=\"--cb-use-cuda-graph\")")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    if not is_serve_available():
        print("transformers serve is not installed here: pip install 'transformers[serving]'",
              file=sys.stderr)
        return 2
    shape, vocab, prompts, mix = burst_load(args)
    tok = word_tokenizer(vocab)
    burst = [Request(tok.decode(p), len(p), mix[i % len(mix)]) for i, p in enumerate(prompts)]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    extra = shlex.split(args.server_args)
    loads = [("burst", burst, math.inf)]
    if args.loads:
        rand = [Request(tok.decode(r.prompt), r.prompt_len, r.output_len)
                for r in random_requests(args.requests * 2, 1024, 128, 0.0, vocab, seed=1)]
        loads += [("random", rand, rate) for rate in
                  [math.inf] + [float(r) for r in args.rates.split(",")]]
    args.out.mkdir(parents=True, exist_ok=True)
    name = shape.get("name") or Path(args.shape).stem
    path = args.out / f"serve_peer_{name}{args.tag}.json"
    result: dict = dict(shape=name, peer="transformers serve --continuous-batching",
                        peer_args=extra, requests=args.requests, prompt_lens=args.prompt_lens,
                        max_tokens_mix=mix, runs=[])
    with tempfile.TemporaryDirectory(prefix="ecospa-peer-") as tmp:
        model = build_stock_model(shape, dtype, device)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        port = free_port()
        t0 = time.perf_counter()
        cmd = peer_command(tmp, port, args.device, str(dtype).removeprefix("torch."), extra)
        with ChildServer(cmd, f"http://127.0.0.1:{port}",
                         startup_timeout=args.startup_timeout) as srv:
            result["server_start_s"] = round(time.perf_counter() - t0, 1)
            kw = dict(max_concurrency=args.requests, ignore_eos=False, seed=1)
            asyncio.run(run(srv.url, burst[:4], **kw))                    # warm-up
            for name, reqs, rate in [loads[0]] + loads:    # the burst twice: first, then warm
                res = asyncio.run(run(srv.url, reqs, rate=rate, **kw)) | {"load": name}
                result["runs"].append(res)
                print(format_row(res), flush=True)
                path.write_text(json.dumps(result, indent=1) + "\n")
    result["first_burst"], result["runs"] = result["runs"][0], result["runs"][1:]
    path.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(r["failed"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
