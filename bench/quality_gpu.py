"""Quality evidence on models trained here (GPU, a few minutes): every table of issue 3 item 5.

Trains a ~30 M parameter Llama (GQA + RoPE) and GPT-2 on the Shakespeare/Gutenberg training
split, then measures held-out perplexity (non-overlapping 256-token windows) for:
coupled vs uncoupled FFN sparsification (Table 8 shape); ecospa/numerical/uncoupled/magnitude at
target sizes 80/70/60/50%, one-shot and after recovery steps, with pruning wall time and per-layer
dims; dense vs EcoSpa-sparse pre-training from scratch at the same token budget.

    python bench/quality_gpu.py --out results/   # writes quality_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from ecospa_deploy.data import tokenized_corpus
from ecospa_deploy.modeling import from_hf
from ecospa_deploy.prune.baselines import uniform_masks
from ecospa_deploy.prune.run import METHODS, PruneOptions, prune_model
from ecospa_deploy.prune.surgery import slice_model
from ecospa_deploy.prune.training import EcoSpaSparsifier, recover
from ecospa_deploy.train import (TrainConfig, build_model, count_parameters, make_optimizer,
                                 perplexity, train)

SEQ = 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--recover-steps", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=256)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = "cuda"
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "seq_len": SEQ, "protocol": "held-out plays, non-overlapping windows"}

    def save():
        (args.out / "quality_gpu.json").write_text(json.dumps(res, indent=1, default=str))

    data = tokenized_corpus(vocab_size=4096)
    res["tokens"] = {"train": data.train.numel(), "heldout": data.heldout.numel()}
    cfg = TrainConfig(steps=args.steps, batch_size=64, seq_len=SEQ, lr=1.5e-3, warmup=80,
                      device=dev, bf16=True, eval_windows=args.eval_windows)
    gen = torch.Generator().manual_seed(1)
    calib = torch.stack([data.train[s:s + SEQ] for s in
                         torch.randint(0, data.train.numel() - SEQ, (128,), generator=gen).tolist()])

    def ppl(m):
        return perplexity(m, data.heldout, SEQ, 32, args.eval_windows, bf16=True)

    models = {}
    for family in ("llama", "gpt2"):
        m = build_model(family, "small", len(data.tokenizer))
        r = train(m, data.train, cfg, eval_tokens=data.heldout, desc=family)
        ours = from_hf(m).to(dev).float().eval()
        models[family] = ours
        res[f"{family}_dense"] = {"params": count_parameters(ours), "heldout_ppl": ppl(ours),
                                  "train_tokens": r.tokens, "tokens_per_s": r.tokens_per_s,
                                  "train_seconds": r.seconds, "final_loss": r.losses[-1]}
        print(family, res[f"{family}_dense"], flush=True)
        save()

    for family in ("llama", "gpt2"):
        rows = []
        for keep in (0.7, 0.5, 0.3, 0.1):
            row = {"ffn_sparsity": round(1 - keep, 2)}
            for scorer in ("coupled", "uncoupled"):
                m = copy.deepcopy(models[family])
                slice_model(m, uniform_masks(m, {"ffn": keep}, scorer))
                row[scorer] = ppl(m)
            rows.append(row)
            print(family, row, flush=True)
        res[f"{family}_table8"] = rows
        save()

    # target sizes per family: the full sweep on the Llama, one point on GPT-2
    sweeps = {"llama": (0.8, 0.7, 0.6, 0.5), "gpt2": (0.7,)}
    for family, targets in sweeps.items():
        rows = []
        for target in targets:
            for method in METHODS:
                m = copy.deepcopy(models[family])
                try:
                    pr = prune_model(m, calib.to(dev), PruneOptions(method, target, batch_size=16))
                except Exception as exc:  # report, keep measuring the rest
                    rows.append({"target": target, "method": method, "error": repr(exc)})
                    continue
                row = {"target": target, "method": method, "params": pr.params_after,
                       "prune_seconds": pr.seconds, "one_shot_ppl": ppl(m),
                       "dims": [[l.num_attention_heads, l.num_key_value_heads, l.qk_head_dim,
                                 l.v_head_dim, l.intermediate_size]
                                for l in m.config.ecospa_spec.layers]}
                if args.recover_steps:
                    recover(m, calib.to(dev), args.recover_steps, lr=1e-4, batch_size=8)
                    row["recovered_ppl"] = ppl(m)
                rows.append(row)
                print(family, {k: v for k, v in row.items() if k != "dims"}, flush=True)
            res[f"{family}_targets"] = rows
            save()

    # Sparse pre-training from scratch (Algorithm 1): same steps/tokens as the dense run.
    m = from_hf(build_model("llama", "small", len(data.tokenizer))).to(dev)
    opt = make_optimizer(m, cfg)
    sp = EcoSpaSparsifier(m, opt, target_size=0.5, every=max(1, args.steps // 20))
    r = train(m, data.train, cfg, eval_tokens=data.heldout, callbacks=[sp], optimizer=opt,
              desc="sparse pre-training")
    res["sparse_pretraining"] = {
        "dense": res["llama_dense"],
        "ecospa_sparse": {"params": count_parameters(m), "heldout_ppl": ppl(m),
                          "train_tokens": r.tokens, "tokens_per_s": r.tokens_per_s,
                          "train_seconds": r.seconds, "rounds": len(sp.reports),
                          "target_size": 0.5}}
    print(res["sparse_pretraining"], flush=True)
    save()


if __name__ == "__main__":
    main()
