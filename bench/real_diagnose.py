"""Why pruning collapsed on a real model: per-axis, per-score and per-layer measurements.

On SmolLM2-135M-Instruct (the ``real_quality`` model), with the dense model's own text as
calibration (``prune.selftext``) and the three held-out domains for perplexity:

1. **axes x scores**: remove the same fraction of units in every layer on one axis at a time
   (q/k rotary pairs per KV group, v dims per KV group, FFN channels, whole KV groups), chosen
   by each score: ``magnitude`` (squared weights a unit owns), ``coupled`` (EcoSpa Eq. 10 on
   weights), ``activation`` (the unit's expected output energy on calibration data:
   ``E[h²]·‖W2 col‖²``, q/k pairs ``E‖q‖²·E‖k‖²``), ``fluctuation`` (FLAP: ``Var[h]·‖W2 col‖²``);
2. **per layer**: half of one layer's FFN (activation score) or one of its KV groups removed,
   every other layer dense: which layers the model cannot lose;
3. **activations**: per layer the median and maximum squared norm of the residual stream
   (massive activations: the few tokens whose norm is orders above the rest, and where they
   sit), the spread of the RMSNorm gains (the per-channel scale a weight-only score cannot
   see) and how concentrated the FFN/o_proj input energy is.

    python -m ecospa_deploy.bench.real_diagnose --out bench/results/real_diagnose --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ecospa_deploy.prune.mask import LayerMask, pairs_to_dims

AXES = ("qk", "vo", "ffn", "groups")
SCORES = ("magnitude", "coupled", "activation", "fluctuation")


def unit_scores(c, st, lspec, axis: str, score: str) -> torch.Tensor:
    """``[groups, units]`` (``[1, ffn]`` for the FFN, ``[1, kv groups]`` for groups)."""
    n_q, n_kv, d, dv = (lspec.num_attention_heads, lspec.num_key_value_heads, lspec.qk_head_dim,
                        lspec.v_head_dim)
    group = n_q // n_kv
    w = {k: c[k][0].detach().float() for k in c}
    col2 = {k: w[k].pow(2).sum(0) for k in ("o", "down")}
    row2 = {k: w[k].pow(2).sum(1) for k in ("q", "k", "v", "gate", "up")}
    if axis == "ffn":
        if score == "magnitude":
            s = row2["gate"] + row2["up"] + col2["down"]
        elif score == "coupled":
            s = ((w["gate"] * w["up"]).pow(2).sum(1) * col2["down"]).sqrt()
        elif score == "activation":
            s = st.down.energy.float() * col2["down"]
        else:
            s = st.down.var.float() * col2["down"]
        return s[None]
    if axis == "qk":
        if score in ("activation", "fluctuation"):
            sig = st.attn.cov.float() if score == "fluctuation" else st.attn.second.float()
            q = ((w["q"] @ sig) * w["q"]).sum(1)
            k = ((w["k"] @ sig) * w["k"]).sum(1)
        else:
            q, k = row2["q"], row2["k"]
        q = q.view(n_kv, group, d).sum(1)
        k = k.view(n_kv, d)
        q, k = q[:, :d // 2] + q[:, d // 2:], k[:, :d // 2] + k[:, d // 2:]
        return q + k if score == "magnitude" else q * k
    if axis in ("vo", "groups"):
        if score in ("activation", "fluctuation"):
            e = st.o.energy.float() if score == "activation" else st.o.var.float()
            s = (e * col2["o"]).view(n_kv, group, dv).sum(1)
        else:
            v = row2["v"].view(n_kv, dv)
            o = col2["o"].view(n_kv, group, dv).sum(1)
            s = v + o if score == "magnitude" else v * o
        return s if axis == "vo" else s.sum(1)[None]
    raise ValueError(axis)


def axis_masks(model, stats, axis: str, score: str, fraction: float,
               layers: list[int] | None = None) -> list[LayerMask]:
    spec = model.config.ecospa_spec
    masks = []
    for i, (layer, lspec) in enumerate(zip(model.decoder_layers, spec.layers)):
        if layers is not None and i not in layers:
            masks.append(LayerMask())
            continue
        s = unit_scores(layer.canonical(), stats[i], lspec, axis, score)
        n = s.shape[1]
        keep = max(1, n - round(fraction * n))
        kept = [sorted(torch.argsort(s[g], descending=True)[:keep].tolist())
                for g in range(s.shape[0])]
        if axis == "ffn":
            masks.append(LayerMask(ffn=kept[0]))
        elif axis == "qk":
            masks.append(LayerMask(qk_dims=[pairs_to_dims(k, lspec.qk_head_dim) for k in kept]))
        elif axis == "vo":
            masks.append(LayerMask(v_dims=kept))
        else:
            group = lspec.num_attention_heads // lspec.num_key_value_heads
            masks.append(LayerMask(kv_heads=kept[0],
                                   q_heads=[h for g in kept[0]
                                            for h in range(g * group, (g + 1) * group)]))
    return masks


def activation_facts(model, stats, tokens) -> list[dict]:
    """Per layer: residual norms (median, max, where the max sits), RMSNorm gain spread and
    the share of FFN / o_proj input energy in their top 1 % channels."""
    from ecospa_deploy.families import family_of_model

    fam = family_of_model(model)
    out = []
    hidden = []
    hooks = [layer.register_forward_hook(
        lambda _m, _a, o: hidden.append((o[0] if isinstance(o, tuple) else o).detach()))
        for layer in model.decoder_layers]
    try:
        with torch.no_grad():
            model(input_ids=tokens.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for i, (layer, st) in enumerate(zip(model.decoder_layers, stats)):
        h = hidden[i].float().pow(2).sum(-1)          # [batch, seq]
        flat = h.flatten()
        top = int(flat.argmax())
        gains = [n.weight.detach().float().abs() for n in fam.norms(layer)]

        def top_share(e):
            e = e.float().sort(descending=True).values
            return float(e[:max(1, e.numel() // 100)].sum() / e.sum())
        out.append({
            "layer": i, "residual_median": float(flat.median()), "residual_max": float(flat.max()),
            "max_over_median": float(flat.max() / flat.median()),
            "max_at_position": top % h.shape[1],
            "tokens_over_100x_median": int((flat > 100 * flat.median()).sum()),
            "attn_norm_gain_max_over_median": float(gains[0].max() / gains[0].median()),
            "mlp_norm_gain_max_over_median": float(gains[1].max() / gains[1].median()),
            "ffn_input_energy_top1pct": top_share(st.down.energy),
            "o_input_energy_top1pct": top_share(st.o.energy),
        })
    return out


def main(argv=None) -> int:
    from ecospa_deploy.bench.real_quality import load_dense
    from ecospa_deploy.domains import domain_perplexity
    from ecospa_deploy.prune.activations import collect
    from ecospa_deploy.prune.selftext import selftext_windows
    from ecospa_deploy.prune.surgery import slice_model

    p = argparse.ArgumentParser(prog="python -m ecospa_deploy.bench.real_diagnose")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--texts", default=None)
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25])
    p.add_argument("--sections", nargs="+", default=["axes", "layers", "activations"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, tok, texts = load_dense(args.model, args.texts, args.device)
    calib = selftext_windows(dense, tok, args.calib, args.seq_len, 0, batch_size=64)
    stats = collect(dense, calib.windows, 16, progress=False)

    def ppl(model) -> dict:
        r = domain_perplexity(model, tok, texts, args.seq_len, args.eval_windows, 16)
        return {k: v["perplexity"] for k, v in r.items()}

    base = ppl(dense)

    def ratio(p: dict) -> float:
        return math.exp(statistics.fmean(math.log(p[k] / base[k]) for k in base))

    result = {"dense": base, "calibration": {"sha256": calib.sha256, "samples": args.calib,
                                             "seq_len": args.seq_len}}
    path = out / "real_diagnose.json"

    def save():
        path.write_text(json.dumps(result, indent=1))

    start = time.perf_counter()
    if "activations" in args.sections:
        result["activations"] = activation_facts(dense, stats, calib.windows[:8])
        save()
    if "axes" in args.sections:
        rows = []
        for axis in AXES:
            for score in SCORES:
                for f in args.fractions if axis != "groups" else [1 / 3]:
                    m = copy.deepcopy(dense)
                    slice_model(m, axis_masks(m, stats, axis, score, f))
                    p = ppl(m)
                    rows.append({"axis": axis, "score": score, "fraction": f,
                                 "perplexity": p, "ratio": ratio(p)})
                    print(json.dumps(rows[-1]), flush=True)
                    del m
        result["axes"] = rows
        save()
    if "layers" in args.sections:
        rows = []
        for i in range(dense.config.ecospa_spec.num_layers):
            for axis, f in (("ffn", 0.5), ("groups", 1 / 3)):
                m = copy.deepcopy(dense)
                slice_model(m, axis_masks(m, stats, axis, "activation", f, layers=[i]))
                p = ppl(m)
                rows.append({"layer": i, "axis": axis, "fraction": f, "ratio": ratio(p)})
                print(json.dumps(rows[-1]), flush=True)
                del m
        result["layers"] = rows
        save()
    result["seconds"] = time.perf_counter() - start
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
