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

import torch

from ecospa_deploy.bench.serve_gpu import (burst_arguments, burst_load, load_plan, output_name,
                                           server_arguments, word_tokenizer)


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
    from ecospa_deploy.serve.benchmark import Request, format_row, run
    from ecospa_deploy.serve.process import ChildServer, free_port

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    burst_arguments(ap)
    server_arguments(ap, "transformers serve", "--cb-use-cuda-graph", rates="16,32")
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
        plan = load_plan(args, vocab)          # one request set, at each rate
        text = [Request(tok.decode(r.prompt), r.prompt_len, r.output_len) for r in plan[0][0]]
        loads += [("random", text, rate) for _, rate in plan]
    args.out.mkdir(parents=True, exist_ok=True)
    name = output_name(shape, args.shape)
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
            for i, (load, reqs, rate) in enumerate([loads[0]] + loads):  # the burst twice
                res = asyncio.run(run(srv.url, reqs, rate=rate, **kw)) | {"load": load}
                if i == 0:
                    result["first_burst"] = res
                else:
                    result["runs"].append(res)
                print(format_row(res), flush=True)
                path.write_text(json.dumps(result, indent=1) + "\n")  # kept if a limit cuts
    return 0 if all(r["failed"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
