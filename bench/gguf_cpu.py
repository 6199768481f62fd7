"""Dense vs pruned SmolLM2 in llama.cpp on this CPU: file size, perplexity, prompt and generation
speed, at the same GGUF outtype, ratios measured in one run.

    python -m ecospa_deploy.bench.gguf_cpu --out bench/results/gguf_cpu --threads 2

The pruned models are the main command's build (``real_demo.build``: self-generated
calibration text, one-shot) at ``--method``/``--fractions``, cached under ``--work``. Every
model, dense included, goes through ``ecospa convert gguf`` (llama.cpp's ``deci``
architecture), so only the shapes differ. Perplexity: llama.cpp's logits on the held-out plays
(the ``ecospa eval`` windows, ``--windows`` of 256 tokens; never calibration text), next to our
float32 modeling's on the same windows. Speed: a 256-token prompt (prompt processing) and 64
greedy tokens after it (generation), ``--reps`` rounds with the models interleaved, median.
FFN widths are zero-padded to the quant block (32, or 256 for k-quants) so every matrix is
quantized.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

SEQ = 256
GEN = 64


def _ffn_multiple(outtype: str) -> int | None:
    if outtype in ("f32", "f16", "bf16"):
        return None
    return 256 if "_k" in outtype else 32


def _llama(path: str, threads: int, logits_all: bool):
    from llama_cpp import Llama

    # n_batch = n_ctx: without logits_all, llama-cpp-python keeps n_batch rows of scores and
    # indexes them by position
    return Llama(model_path=path, n_ctx=SEQ + GEN + 8, n_batch=SEQ + GEN + 8, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)


def _perplexity(path: str, windows: np.ndarray, threads: int) -> float:
    llm = _llama(path, threads, logits_all=True)
    nll, count = 0.0, 0
    for win in windows:
        llm.reset()
        llm.eval(win.tolist())
        logits = np.asarray(llm.scores[:len(win) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(win) - 1), win[1:]].sum())
        count += len(win) - 1
    return math.exp(nll / count)


def _speed(llm, prompt: list[int]) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one round."""
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    pp = len(prompt) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(GEN):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return pp, GEN / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None, help="where models and GGUF files are kept "
                                                  "(default: $ECOSPA_CACHE/bench-gguf-cpu)")
    p.add_argument("--method", default="ecospa-act")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--outtypes", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    from ecospa_deploy import real_demo, smollm2
    from ecospa_deploy.converters.gguf import convert_gguf
    from ecospa_deploy.data import cache_dir
    from ecospa_deploy.domains import domain_perplexity, plays
    from ecospa_deploy.evaluate import windows_of
    from ecospa_deploy.loading import load_model, load_tokenizer
    from ecospa_deploy.prune.calibration import tokenize
    from ecospa_deploy.prune.tracking import count_params

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else cache_dir() / "bench-gguf-cpu"
    work.mkdir(parents=True, exist_ok=True)
    models = {"dense": smollm2.dense_dir()}
    for f in args.fractions:
        recipe = real_demo.Recipe(method=args.method, fraction=f)
        models[f"{args.method} -{round(100 * f)}%"] = real_demo.build(
            work / f"{args.method}-{round(100 * f)}", recipe)
    tok = load_tokenizer(models["dense"])
    windows = windows_of(tokenize(tok, plays().text), SEQ)[:args.windows].numpy()
    prompt = windows[0].tolist()
    rows, files = [], {}
    for name, path in models.items():
        model = load_model(path, dtype=torch.float32).eval()
        ours = domain_perplexity(model, tok, {"plays": plays()}, seq_len=SEQ,
                                 max_windows=args.windows)["plays"]["perplexity"]
        for outtype in args.outtypes:
            gguf = work / f"{path.name if name != 'dense' else 'dense'}-{outtype}.gguf"
            t = time.perf_counter()
            report = convert_gguf(model, gguf, tokenizer=tok, outtype=outtype,
                                  ffn_multiple=_ffn_multiple(outtype), overwrite=True)
            files[(name, outtype)] = str(gguf)
            rows.append({"model": name, "outtype": outtype, "params": count_params(model),
                         "bytes": report.bytes, "padding": report.as_dict()["padding"],
                         "convert_s": round(time.perf_counter() - t, 1),
                         "verify": {k: report.verify[k] for k in
                                    ("logit_err", "greedy_equal", "tokenizer_equal", "ok")},
                         "perplexity_ours_f32": ours,
                         "perplexity_llama_cpp": _perplexity(str(gguf), windows,
                                                             args.threads)})
            print(json.dumps(rows[-1]), flush=True)
        del model
    # speed: per outtype, every model loaded, rounds interleaved
    for outtype in args.outtypes:
        llms = {name: _llama(files[(name, outtype)], args.threads, logits_all=False)
                for name in models}
        runs = {name: [] for name in models}
        for _ in range(args.reps):
            for name, llm in llms.items():
                runs[name].append(_speed(llm, prompt))
        for row in rows:
            if row["outtype"] == outtype:
                pp, tg = zip(*runs[row["model"]])
                row["prompt_tok_s"] = round(statistics.median(pp), 1)
                row["gen_tok_s"] = round(statistics.median(tg), 1)
        del llms
    for row in rows:
        base = next(r for r in rows if r["model"] == "dense" and r["outtype"] == row["outtype"])
        for key in ("prompt_tok_s", "gen_tok_s"):
            row[key.replace("tok_s", "speedup")] = round(row[key] / base[key], 3)
        row["bytes_ratio"] = round(row["bytes"] / base["bytes"], 3)
        row["ppl_ratio"] = round(row["perplexity_llama_cpp"] / base["perplexity_llama_cpp"], 3)
    import llama_cpp
    import platform

    import sys

    result = {"command": "python -m ecospa_deploy.bench.gguf_cpu "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "threads": args.threads, "llama_cpp_python": llama_cpp.__version__},
              "windows": args.windows, "seq_len": SEQ, "gen_tokens": GEN, "reps": args.reps,
              "rows": rows}
    (out / "gguf_cpu.json").write_text(json.dumps(result, indent=1))
    lines = ["| model | outtype | MB | × dense | ppl llama.cpp (ours f32) | ppl × dense | prompt "
             "tok/s | × dense | gen tok/s | × dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['outtype']} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['bytes_ratio']:.2f} | {r['perplexity_llama_cpp']:.2f} "
                     f"({r['perplexity_ours_f32']:.2f}) | {r['ppl_ratio']:.2f} | "
                     f"{r['prompt_tok_s']:.0f} | {r['prompt_speedup']:.2f} | "
                     f"{r['gen_tok_s']:.1f} | {r['gen_speedup']:.2f} |")
    (out / "gguf_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
