"""Write a benchmark's results: ``results.json``, ``results.md`` and PNG plots.

The plots need matplotlib (the 'bench' extra); without it they are skipped, never the
measurements.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ecospa_deploy.atomic import write_text_atomic
from ecospa_deploy.extras import install_hint

NO_PLOTS = f"matplotlib is not installed, so no plots are drawn; for them: {install_hint('bench')}"


def can_plot() -> bool:
    """Whether matplotlib is importable (checked without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _f(v, fmt="{:.2f}"):
    return "—" if v is None else fmt.format(v)


def markdown(result: dict[str, Any]) -> str:
    c = result["ceilings"]
    lines = [f"# ecospa bench: {result['title']}", "",
             f"Command: `{result['command']}`", "",
             f"Device: {c['device']}; measured copy bandwidth {c['bandwidth'] / 1e12:.2f} TB/s, "
             + (f"matmul {c['matmul'] / 1e12:.0f} TFLOP/s" if c['matmul'] >= 1e12 else
                f"matmul {c['matmul'] / 1e9:.0f} GFLOP/s") +
             f" ({result['dtype']}). Floors use the "
             "model's own (unpadded) bytes and FLOPs; decode context = prompt + gen/2.", "",
             *([f"**Note:** {result['note']}", ""] if result.get("note") else []),
             "| model | backend | batch | prompt | params (M) | weights (GB) | KV B/token | "
             "peak mem (GB) = weights + KV + act | TTFT ms | TPOT ms (p50 / p90) | decode tok/s "
             "| prefill tok/s | decode % floor | prefill % floor |",
             "|" + "---|" * 14]
    for r in result["rows"]:
        mem = "—" if r["mem_peak"] is None else (
            f"{r['mem_peak'] / 1e9:.2f} = {r['mem_weights'] / 1e9:.2f} + "
            f"{r['mem_kv'] / 1e9:.2f} + {r['mem_activations'] / 1e9:.2f}")
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['batch']} | {r['prompt_len']} | "
            f"{r['params'] / 1e6:.1f} | {r['weight_bytes'] / 1e9:.3f} | "
            f"{r['kv_bytes_per_token']} | {mem} | {_f(r['ttft_ms'])} | "
            f"{_f(r['tpot_ms'], '{:.3f}')} / {_f(r['tpot_p90_ms'], '{:.3f}')} | "
            f"{_f(r['decode_tok_s'], '{:.1f}')} | {_f(r['prefill_tok_s'], '{:.0f}')} | "
            f"{_f(r['decode_pct_floor'], '{:.1f}')} | {_f(r['prefill_pct_floor'], '{:.1f}')} |")
    if result["ratios"]:
        lines += ["", "Pruned / dense (speedups are dense time / pruned time; 'of floor' = "
                  "measured speedup / floor speedup):", "",
                  "| backend | batch | prompt | params | bytes | KV/token | peak mem | decode "
                  "speedup | floor speedup | of floor | prefill speedup | FLOP speedup | "
                  "of FLOP ratio |", "|" + "---|" * 13]
        for r in result["ratios"]:
            lines.append(
                f"| {r['backend']} | {r['batch']} | {r['prompt_len']} | {_f(r['params'], '{:.3f}')}"
                f" | {_f(r['weight_bytes'], '{:.3f}')} | {_f(r['kv_bytes_per_token'], '{:.3f}')} "
                f"| {_f(r['mem_peak'], '{:.3f}')} | {_f(r['decode_speedup'])}× | "
                f"{_f(r['decode_floor_speedup'])}× | {_f(r['decode_of_floor_ratio'])} | "
                f"{_f(r['prefill_speedup'])}× | {_f(r['prefill_flop_speedup'])}× | "
                f"{_f(r['prefill_of_floor_ratio'])} |")
    lines += ["", "TTFT of the first request at each prompt length vs repeated, and the spread "
              "over the repeats:", "", spread_markdown(result["rows"])]
    return "\n".join(lines) + "\n"


def spread_markdown(rows: list[dict[str, Any]]) -> str:
    """TTFT first-seen vs repeated and the min/median spread of each row (markdown)."""
    def f(v):
        return "—" if v is None else f"{v:.2f}"

    out = ["| model | backend | batch | prompt | TTFT first-seen ms | TTFT min / median ms "
           "| TPOT min / median ms | runs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['prompt_len']} | "
                   f"{f(r.get('ttft_first_ms'))} | {f(r.get('ttft_min_ms'))} / "
                   f"{f(r['ttft_ms'])} | {f(r.get('tpot_min_ms'))} / {f(r['tpot_ms'])} | "
                   f"{r.get('repeats', 1)} |")
    return "\n".join(out)


def plots(result: dict[str, Any], out: Path) -> list[Path]:
    """``throughput.png``: decode tokens/s, dense and pruned side by side for every (backend,
    batch, prompt) the run measured, the pruned/dense ratio written above each pair;
    ``latency.png``: per request, prefill (TTFT) and decode time stacked on a linear axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    paths = []
    keys = sorted({(r["backend"], r["batch"], r["prompt_len"]) for r in rows})
    models = sorted({r["model"] for r in rows}, key=lambda m: (m != "dense", m))
    value = {(r["model"], r["backend"], r["batch"], r["prompt_len"]): r for r in rows}
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) + 2), 4))
    for j, model in enumerate(models):
        xs, ys = [], []
        for i, key in enumerate(keys):
            r = value.get((model, *key))
            if r and r["decode_tok_s"]:
                xs.append(i + (j - (len(models) - 1) / 2) * width)
                ys.append(r["decode_tok_s"])
        ax.bar(xs, ys, width, label=model)
    for i, key in enumerate(keys):
        d, q = value.get(("dense", *key)), value.get(("pruned", *key))
        if d and q and d["decode_tok_s"] and q["decode_tok_s"]:
            top = max(d["decode_tok_s"], q["decode_tok_s"])
            ax.annotate(f"{q['decode_tok_s'] / d['decode_tok_s']:.2f}×", (i, top),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_xticks(range(len(keys)), [f"{b}\nbatch {n}, prompt {p}" for b, n, p in keys],
                  fontsize=7)
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode throughput (label: pruned / dense)")
    ax.margins(y=0.15)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    ordered = sorted(rows, key=lambda r: (r["backend"], r["batch"], r["prompt_len"],
                                          r["model"] != "dense"))
    labels = [f"{r['model']} {r['backend']} b{r['batch']} p{r['prompt_len']}" for r in ordered]
    ttft = [r["ttft_ms"] or 0 for r in ordered]
    decode = [(r["tpot_ms"] or 0) * max(r["gen_len"] - 1, 0) for r in ordered]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(ordered) + 1)))
    ax.barh(labels, ttft, label="prefill (TTFT)")
    ax.barh(labels, decode, left=ttft, label="decode (TPOT × (gen − 1))")
    ax.invert_yaxis()
    ax.set_xlabel("ms per request")
    ax.set_title("Latency per request")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write(result: dict[str, Any], out: Path, with_plots: bool = True) -> list[Path]:
    """Write the files; without plots after each row, so a killed run keeps what it measured.

    ``with_plots`` draws them only where matplotlib is installed (see ``can_plot``).
    """
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(result, indent=1, default=str)),
                       ("results.md", markdown(result))):
        write_text_atomic(out / name, text)   # a reader never sees half a file
    files = [out / "results.json", out / "results.md"]
    return files + plots(result, out) if with_plots and can_plot() else files
