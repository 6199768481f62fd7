"""Quality across seeds and domains: every method at two sizes, one-shot and with recovery.

For each seed the tiny recipe (``ecospa_deploy.demo.RECIPES["tiny"]``: the Llama with GQA +
RoPE; its training config with that seed, on ``--device``) is trained on the recipe's own
training split (``--data``: a built recipe directory, by default the cached one), and
then pruned by every method to each ``--targets`` size with ``--calib`` windows of the
training split, evaluated one-shot, fine-tuned ``--recover-steps`` AdamW steps on the same
training-split windows and evaluated again. Two texts, one protocol
(``ecospa_deploy.evaluate.perplexity``, ``--seq-len`` windows, at most ``--windows``):

- in-domain: the held-out plays (never seen in training or calibration);
- out-of-domain: the software licence texts torch's wheel ships under
  ``torch-*.dist-info/licenses/`` (present wherever the project is installed, offline),
  concatenated in path order; their SHA-256 and file count are recorded.

Writes ``quality_seeds.json`` (every run) and ``quality_seeds.md`` (mean ± std over seeds).

    python -m ecospa_deploy.bench.quality_seeds --out bench/results/quality_seeds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.metadata as md
import json
import statistics
import time
from pathlib import Path

import torch

from ecospa_deploy.evaluate import perplexity
from ecospa_deploy.prune.run import METHODS, PruneOptions, prune_model


def licence_text() -> tuple[str, dict]:
    files = sorted((f for f in md.distribution("torch").files
                    if "/licenses/" in str(f) and f.name.upper().startswith(("LICENSE", "COPYING"))),
                   key=str)
    parts = []
    for f in files:
        try:
            parts.append(Path(f.locate()).read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    text = "\n\n".join(parts)
    return text, {"source": "torch dist-info licenses", "torch": md.version("torch"),
                  "files": len(parts), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def trained(data_dir: Path, seed: int, steps: int | None, device: str):
    """The tiny recipe's Llama trained with ``seed`` on ``data_dir``'s ``train.txt`` split and
    tokenizer (the recipe's own data: the seeds differ in initialisation and batch order)."""
    from ecospa_deploy import demo
    from ecospa_deploy.loading import load_tokenizer
    from ecospa_deploy.modeling import from_hf
    from ecospa_deploy.prune.calibration import tokenize
    from ecospa_deploy.train import build_model, train

    recipe = demo.RECIPES["tiny"]
    cfg = dataclasses.replace(recipe.train, seed=seed, steps=steps or recipe.train.steps,
                              device=device)
    tok = load_tokenizer(data_dir)
    tokens = tokenize(tok, (data_dir / "train.txt").read_text(encoding="utf-8"))
    model = build_model(recipe.family, recipe.shape, len(tok), seed=seed)
    result = train(model, tokens, cfg, progress=False)
    return from_hf(model).eval(), tok, {"steps": cfg.steps, "seconds": result.seconds,
                                         "final_loss": sum(result.losses[-20:]) / 20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ecospa_deploy.bench.quality_seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--train-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--calib", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--windows", type=int, default=48, help="at most this many eval windows")
    p.add_argument("--recover-steps", type=int, default=40)
    p.add_argument("--recover-lr", type=float, default=3e-4)
    p.add_argument("--data", default=None, help="a trained tiny-recipe directory (train.txt, "
                   "heldout.txt, tokenizer); default: build the cached demo recipe")
    p.add_argument("--ood", default=None, help="out-of-domain text file (default: torch's "
                   "licence texts)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="quality_seeds")
    args = p.parse_args(argv)
    from ecospa_deploy.demo import heldout_tokens
    from ecospa_deploy.prune.calibration import calibration_windows, tokenize
    from ecospa_deploy.prune.training import recover

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ood:
        lic = Path(args.ood).read_text(encoding="utf-8")
        lic_info = {"source": Path(args.ood).name,
                    "sha256": hashlib.sha256(lic.encode()).hexdigest()}
    else:
        lic, lic_info = licence_text()
    from ecospa_deploy.demo import ensure_trained

    data_dir = Path(args.data) if args.data else ensure_trained("tiny", progress=False)
    report = {"command": "python -m ecospa_deploy.bench.quality_seeds " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]), "config": vars(args),
        "ood": lic_info, "runs": []}
    start = time.perf_counter()

    def ppl(m, ids):
        r = perplexity(m, ids, args.seq_len, batch_size=16, progress=False,
                       max_windows=args.windows)
        return r.perplexity, r.windows

    def save():
        report["wall_s"] = time.perf_counter() - start
        (out / "quality_seeds.json").write_text(json.dumps(report, indent=1))
        (out / "quality_seeds.md").write_text(table(report))

    for seed in args.seeds:
        dense, tok, info = trained(data_dir, seed, args.train_steps, args.device)
        texts = {"heldout": heldout_tokens(data_dir, tok), "licences": tokenize(tok, lic)}
        calib = calibration_windows(tok, data_dir / "train.txt", args.calib, args.seq_len,
                                    seed=seed).windows
        row = {"seed": seed, "method": "dense", "target": 1.0, "recovery": 0, "train": info}
        for k, ids in texts.items():
            row[k], row[f"{k}_windows"] = ppl(dense, ids)
        report["runs"].append(row)
        print(json.dumps(row), flush=True)
        for target in args.targets:
            for method in args.methods:
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                res = prune_model(model, calib, PruneOptions(method, target, batch_size=8,
                                                             seed=seed))
                base = {"seed": seed, "method": method, "target": target,
                        "params": res.params_after, "rounds": res.rounds,
                        "prune_s": time.perf_counter() - t0}
                row = {**base, "recovery": 0}
                for k, ids in texts.items():
                    row[k], row[f"{k}_windows"] = ppl(model, ids)
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
                if args.recover_steps:
                    torch.manual_seed(seed)
                    recover(model, calib, args.recover_steps, args.recover_lr, batch_size=8)
                    row = {**base, "recovery": args.recover_steps}
                    for k, ids in texts.items():
                        row[k], row[f"{k}_windows"] = ppl(model, ids)
                    report["runs"].append(row)
                    print(json.dumps(row), flush=True)
                save()
    save()
    print(table(report))
    return 0


def _ms(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(report: dict) -> str:
    """Markdown: mean ± std (over seeds) of perplexity per method, size, recovery, domain."""
    runs = report["runs"]
    seeds = sorted({r["seed"] for r in runs})
    keys = []
    for r in runs:
        k = (r["target"], r["recovery"], r["method"])
        if k not in keys:
            keys.append(k)
    lines = [f"Perplexity, mean ± std over seeds {seeds} (n per cell in brackets); "
             f"seq-len {report['config']['seq_len']}, at most {report['config']['windows']} "
             "windows; in-domain = held-out plays, out-of-domain = torch's licence texts.", "",
             "| size | recovery steps | method | in-domain | out-of-domain |",
             "|---|---|---|---|---|"]
    for target, rec, method in sorted(keys, key=lambda k: (-k[0], k[1], k[2])):
        cell = [r for r in runs if (r["target"], r["recovery"], r["method"]) == (target, rec,
                                                                                  method)]
        size = "dense" if method == "dense" else f"{target:.0%}"
        lines.append(f"| {size} | {rec} | {method} | {_ms([r['heldout'] for r in cell])} "
                     f"({len(cell)}) | {_ms([r['licences'] for r in cell])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
