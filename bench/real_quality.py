"""The real-model table: every pruning method on SmolLM2-135M-Instruct, one-shot and recovered.

For each calibration seed, the dense model writes its own calibration and recovery text
(``prune.selftext``; the two sets use different seeds, and neither touches the evaluation
texts). Every method then prunes a copy of the dense model to each ``--fractions`` share of
*decoder-layer* parameters removed (embeddings are not pruned by any method, so this is the
share the papers' "ratio" refers to on a model whose tied embeddings are 21 % of it), the copy
is evaluated, recovered by distillation from the dense model (``prune.distill``) and evaluated
again. Evaluation: perplexity on three held-out domains (``ecospa_deploy.domains``; the same
protocol as ``ecospa eval``) and the short-answer quiz (``ecospa_deploy.questions``: right and
empty answers). Pruning and recovery times are wall seconds on ``--device``.

Rows are written to ``rows-<shard>.json`` after each one, so ``--shard K/N`` runs N processes
side by side on one GPU (a 135M model leaves it mostly idle) and an interrupted run resumes
where it stopped; ``--report`` merges every shard's rows into ``real_quality.md`` (mean ± std
over seeds of the perplexity ratio to dense, geometric mean over domains), and with
``--merge RUN_DIR ...`` the rows of several runs into ``real_quality_merged.md``.

    python -m ecospa_deploy.bench.real_quality --out bench/results/real_quality --device cuda \\
        --shard 0/4 &  ...  ; python -m ecospa_deploy.bench.real_quality --out ... --report
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import traceback
from pathlib import Path

import torch

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


def load_dense(model_dir: str | None, texts_dir: str | None, device: str):
    """(dense model, tokenizer, evaluation texts): ``model_dir`` or the converted SmolLM2;
    ``texts_dir`` as ``domains.write_domains`` wrote it, or built from this machine's packages."""
    from ecospa_deploy.domains import load_domains, read_domains
    from ecospa_deploy.loading import load_model, load_tokenizer

    if model_dir is None:
        from ecospa_deploy.smollm2 import dense_dir

        model_dir = dense_dir()
    texts = read_domains(texts_dir) if texts_dir else load_domains()
    return load_model(model_dir, device=device).eval(), load_tokenizer(model_dir), texts


def evaluate(model, tokenizer, texts, args) -> dict:
    from ecospa_deploy.domains import domain_perplexity
    from ecospa_deploy.questions import answer_questions

    model.eval()
    ppl = domain_perplexity(model, tokenizer, texts, seq_len=args.seq_len,
                            max_windows=args.eval_windows, batch_size=16)
    quiz = answer_questions(model, tokenizer, batch_size=40)
    return {"perplexity": {k: v["perplexity"] for k, v in ppl.items()},
            "quiz": {"correct": quiz.correct, "empty": quiz.empty, "total": quiz.total},
            "answers": [r.answer for r in quiz.records]}


def ratio(row: dict, dense: dict) -> float:
    """Geometric mean over domains of perplexity / dense perplexity."""
    p, d = row["perplexity"], dense["perplexity"]
    return math.exp(statistics.fmean(math.log(p[k] / d[k]) for k in d))


def _jobs(args) -> list[tuple[int, str, float]]:
    jobs = [(s, m, f) for s in args.seeds for m in args.methods for f in args.fractions]
    k, n = args.shard
    return jobs[k::n]


def run(args) -> None:
    from ecospa_deploy.prune.distill import DistillConfig, distill
    from ecospa_deploy.prune.run import PruneOptions, prune_model
    from ecospa_deploy.prune.selftext import selftext_windows
    from ecospa_deploy.prune.tracking import layer_fraction_target

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rows-{args.shard[0]}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["seed"], r["method"], r["fraction"]) for r in rows}
    todo = [j for j in _jobs(args) if j not in done]
    if not todo and not args.prepare:
        return
    dense, tok, texts = load_dense(args.model, args.texts, args.device)
    dense_path = out / "dense.json"
    if not dense_path.exists() and args.shard[0] == 0:
        dense_path.write_text(json.dumps(evaluate(dense, tok, texts, args), indent=1))
    windows = {}

    def texts_of(seed):
        if seed not in windows:
            calib = selftext_windows(dense, tok, args.calib, args.calib_seq_len, seed,
                                     batch_size=args.gen_batch)
            recov = selftext_windows(dense, tok, args.recover_samples, args.calib_seq_len,
                                     10_000 + seed, batch_size=args.gen_batch) \
                if args.recover_steps else None
            windows[seed] = (calib, recov)
        return windows[seed]

    if args.prepare:
        for seed in args.seeds:
            texts_of(seed)
        return
    for seed, method, fraction in todo:
        calib, recov = texts_of(seed)
        row = {"seed": seed, "method": method, "fraction": fraction,
               "calibration": {"sha256": calib.sha256, "samples": args.calib,
                               "seq_len": args.calib_seq_len}}
        model = copy.deepcopy(dense)
        try:
            opts = PruneOptions(method=method, target_size=layer_fraction_target(dense, fraction),
                                seed=seed, batch_size=args.batch_size)
            torch.cuda.synchronize() if args.device == "cuda" else None
            start = time.perf_counter()
            result = prune_model(model, calib.windows, opts)
            torch.cuda.synchronize() if args.device == "cuda" else None
            row.update(prune_seconds=time.perf_counter() - start,
                       params_before=result.params_before, params_after=result.params_after,
                       layers=[[l.num_attention_heads, l.num_key_value_heads, l.qk_head_dim,
                                l.v_head_dim, l.intermediate_size]
                               for l in model.config.ecospa_spec.layers])
            row["oneshot"] = evaluate(model, tok, texts, args)
            if args.recover_steps:
                cfg = DistillConfig(steps=args.recover_steps, lr=args.recover_lr,
                                    batch_size=args.recover_batch, seed=seed)
                start = time.perf_counter()
                losses = distill(model, dense, recov.windows, cfg, progress=False)
                row["recovery"] = {"steps": cfg.steps, "lr": cfg.lr, "batch": cfg.batch_size,
                                   "seconds": time.perf_counter() - start,
                                   "first_loss": losses[0], "last_loss": losses[-1],
                                   "samples": args.recover_samples, "sha256": recov.sha256}
                row["recovered"] = evaluate(model, tok, texts, args)
        except Exception as exc:   # a method that fails is a result too: record it, go on
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()[-2000:]
        rows.append(row)
        path.write_text(json.dumps(rows, indent=1))
        print(json.dumps({k: row.get(k) for k in ("seed", "method", "fraction", "error")}),
              flush=True)
        del model


def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def merge_rows(runs: list[Path]) -> list[dict]:
    """The rows of several runs' folders, in order: a later run's row replaces an earlier one of
    the same seed, method and size, except that a failed row never replaces a finished one."""
    merged: dict[tuple, dict] = {}
    for run in runs:
        for p in sorted(run.glob("rows-*.json")):
            for r in json.loads(p.read_text()):
                key = (r["seed"], r["method"], r["fraction"])
                if "error" in r and key in merged and "error" not in merged[key]:
                    continue
                merged[key] = r
    return list(merged.values())


def report(out: Path, runs: list[Path] | None = None) -> str:
    """The table of ``out``'s rows (``real_quality.md``), or with ``runs`` of those folders'
    rows merged (``merge_rows``; ``real_quality_merged.md`` in ``out``)."""
    rows = merge_rows(runs or [out])
    dense = json.loads((out / "dense.json").read_text())
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Dense: perplexity {dense['perplexity']}, quiz {dense['quiz']['correct']}/"
             f"{dense['quiz']['total']} right. Cells: perplexity / dense (geometric mean over "
             f"the domains), mean ± std over seeds {seeds} ([n]: only n of them); quiz right "
             "(empty) answers, mean.", ""]
    for stage in ("oneshot", "recovered"):
        lines += [f"### {stage}", "",
                  "| method | " + " | ".join(f"−{f:.0%} layers" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
        for m in methods:
            cells = []
            for f in fractions:
                sel = [r for r in rows if r["method"] == m and r["fraction"] == f]
                ok = [r for r in sel if stage in r]
                if not ok:
                    err = next((r["error"] for r in sel if "error" in r), None)
                    cells.append("error" if err else "—")
                    continue
                q = [r[stage]["quiz"] for r in ok]
                n = "" if len(ok) == len(seeds) else f" [{len(ok)}]"
                cells.append(f"{_fmt([ratio(r[stage], dense) for r in ok])}×{n} · "
                             f"{statistics.fmean(x['correct'] for x in q):.0f}"
                             f" ({statistics.fmean(x['empty'] for x in q):.0f})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### time (s, mean): prune / recover", "",
              "| method | " + " | ".join(f"−{f:.0%}" for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    for m in methods:
        cells = []
        for f in fractions:
            sel = [r for r in rows if r["method"] == m and r["fraction"] == f and "oneshot" in r]
            p = [r["prune_seconds"] for r in sel]
            rec = [r["recovery"]["seconds"] for r in sel if "recovery" in r]
            cells.append(f"{_fmt(p, 1)} / {_fmt(rec, 1)}" if p else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    errors = sorted({f"{r['method']} −{r['fraction']:.0%} seed {r['seed']}: "
                     f"{r['error'].split('. ')[0][:120]}" for r in rows if "error" in r})
    if errors:
        lines += ["", "Errors:", *[f"- {e}" for e in errors]]
    if runs:
        lines += ["", "Merged from " + ", ".join(str(r) for r in runs) + " (later replaces "
                  "earlier)."]
    text = "\n".join(lines) + "\n"
    (out / ("real_quality_merged.md" if runs else "real_quality.md")).write_text(text)
    return text


def _shard(value: str) -> tuple[int, int]:
    k, _, n = value.partition("/")
    k, n = int(k), int(n or 1)
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {value}: expected K/N with 0 <= K < N")
    return k, n


def main(argv=None) -> int:
    from ecospa_deploy.prune.methods import METHODS

    p = argparse.ArgumentParser(prog="python -m ecospa_deploy.bench.real_quality")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="dense model directory (default: the "
                   "converted SmolLM2, ecospa_deploy.smollm2.dense_dir())")
    p.add_argument("--texts", default=None, help="evaluation texts written by "
                   "domains.write_domains (default: built from this machine's packages)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--calib", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per evaluation window")
    p.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration "
                   "and recovery window (default: --seq-len)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per pass")
    p.add_argument("--eval-windows", type=int, default=64, help="per domain")
    p.add_argument("--recover-steps", type=int, default=300)
    p.add_argument("--recover-samples", type=int, default=1024)
    p.add_argument("--recover-batch", type=int, default=16)
    p.add_argument("--recover-lr", type=float, default=2e-4)
    p.add_argument("--gen-batch", type=int, default=128, help="batch of the self-generated "
                   "text (part of its cache key)")
    p.add_argument("--prepare", action="store_true", help="only generate (and cache) the "
                   "calibration and recovery text of every seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="K/N")
    p.add_argument("--report", action="store_true", help="merge the shards' rows and write "
                   "the table (no pruning)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="RUN_DIR",
                   help="with --report: the rows of these runs' folders, a later run's row "
                   "replacing an earlier one's (real_quality_merged.md in --out)")
    args = p.parse_args(argv)
    args.calib_seq_len = args.calib_seq_len or args.seq_len
    if args.report:
        print(report(Path(args.out), args.merge))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
