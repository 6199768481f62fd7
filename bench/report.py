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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["model"], r["backend"], r["prompt_len"]) for r in rows}):
        pts = sorted((r["batch"], r["decode_tok_s"]) for r in rows
                     if (r["model"], r["backend"], r["prompt_len"]) == key and r["decode_tok_s"])
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{key[0]} {key[1]} p={key[2]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode throughput vs batch size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['model'][0]}/{r['backend']}/b{r['batch']}/p{r['prompt_len']}" for r in rows]
    ttft = [r["ttft_ms"] for r in rows]
    decode = [(r["tpot_ms"] or 0) * max(r["gen_len"] - 1, 0) for r in rows]
    ax.bar(labels, ttft, label="prefill (TTFT)")
    ax.bar(labels, decode, bottom=ttft, label="decode (TPOT × (gen-1))")
    ax.set_yscale("log")
    ax.set_ylabel("ms per request")
    ax.set_title("Latency breakdown")
    ax.tick_params(axis="x", rotation=70, labelsize=6)
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
