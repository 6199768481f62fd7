"""Prune a dense or already pruned model to a target size; write a checkpoint in our format.

Methods: ecospa (coupled Fisher importance + aligned Eq. 10 removal in rounds, the EcoSpa paper),
ecospa-act (its variant with activation-aware Eq. 10 scores: the one to use on a pretrained
model), numerical (Newton-method score on heads and channels + Eq. 11 compensation, the
Numerical Pruning paper), numerical-dims (its variant that also cuts q/k and v dims), the
baselines uncoupled (independent norms, EcoSpa Appendix A) and magnitude, and the anchors
wanda-sp, flap and llm-pruner. --target-size is the fraction of the input's total parameters to
keep; --min-keep is the per-layer floor every method honours (default: 1/8 of each dense width,
one KV group). Calibration windows come from --calib, a text file read with the model's own
tokenizer, or "self": text the dense chat model writes itself (general-domain, never the text
you evaluate on). --recover-steps distils the dense model's logits into the pruned one (KL;
--recover-loss lm for plain LM fine-tuning on the calibration windows). The output is written
to a temporary directory and renamed at the end, so a failed run leaves nothing behind;
ecospa.provenance in config.json records method, target, calibration hash and kept indices.

examples:
  ecospa prune ./llama -o ./llama-70 --target-size 0.7 --calib train.txt
  ecospa prune ./smollm2 -o ./smol-80 --target-size 0.8 --method ecospa-act --calib self \\
      --samples 128 --seq-len 256 --recover-steps 300 --device cuda
  ecospa prune ./llama -o ./llama-50 --target-size 0.5 --method numerical --calib train.txt \\
      --samples 128 --seq-len 2048 --align 64 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from ecospa_deploy import dtypes
from ecospa_deploy.errors import UsageError

SELF = "self"    # --calib self: the dense model's own generated text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecospa_deploy.prune.methods import METHODS

    parser.add_argument("model", help="input checkpoint directory (ours or a stock HF Llama/"
                        "Mistral/Qwen2/GPT-2 directory)")
    parser.add_argument("-o", "--output", required=True, help="output directory (must not exist "
                        "unless --overwrite)")
    parser.add_argument("--target-size", type=float, default=0.7,
                        help="fraction of the input's parameters to keep, in (0, 1) (default 0.7)")
    parser.add_argument("--method", choices=METHODS, default="ecospa",
                        help="pruning method (default: %(default)s; see above)")
    parser.add_argument("--calib", required=True, help="UTF-8 text file for calibration windows, "
                        "or 'self': text the dense chat model generates (needs a chat template)")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows (128)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per window (2048)")
    parser.add_argument("--top-k", type=float, default=0.3, help="EcoSpa: fraction of coupled "
                        "pairs sparsified per round (0.3)")
    parser.add_argument("--theta", type=float, default=0.9, help="EcoSpa: share of each "
                        "selected pair's Eq. 10 score energy kept per round (0.9)")
    parser.add_argument("--rounds", type=int, default=20, help="EcoSpa: at most this many "
                        "rounds, whatever the target (geometric schedule; default 20)")
    parser.add_argument("--heads", choices=("groups", "query"), default="groups",
                        help="wanda-sp/flap/llm-pruner: remove whole KV groups (a KV head with "
                        "its query heads; shrinks the KV cache) or the same number of query heads "
                        "from every group (finer; keeps every KV head) (default: %(default)s)")
    parser.add_argument("--min-keep", type=float, default=0.125, metavar="FRACTION",
                        help="per-layer floor for every method: each layer keeps at least this "
                        "fraction of its dense FFN width, q/k head dim and v head dim, and one "
                        "KV group (default 0.125; 0 allows one unit)")
    parser.add_argument("--align", type=int, default=None, metavar="N",
                        help="round every pruned width (heads*dims, FFN) to a multiple of N")
    parser.add_argument("--recover-steps", type=int, default=0,
                        help="recovery steps after pruning: distillation from the dense model on "
                        "the calibration windows (default 0: none)")
    parser.add_argument("--recover-loss", choices=("distill", "lm"), default="distill",
                        help="recovery objective: KL to the dense model's logits (default) or "
                        "the LM loss of the calibration windows")
    parser.add_argument("--recover-lr", type=float, default=1e-4,
                        help="AdamW learning rate of the recovery steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=dtypes.NAMES,
                        help="compute dtype while pruning (default float32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the calibration-window sampling and the recovery steps "
                        "(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it is empty or an earlier ecospa output (never "
                        "the input, a file or a symbolic link)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.target_size < 1:
        raise UsageError(f"--target-size={args.target_size} is invalid; expected a fraction "
                         "strictly between 0 and 1 (0.7 keeps 70% of the parameters)")
    for name in ("samples", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; "
                             "expected an integer >= 1")
    if args.recover_steps < 0:
        raise UsageError(f"--recover-steps={args.recover_steps} is invalid; expected >= 0")
    if args.calib != SELF and not Path(args.calib).is_file():
        raise UsageError(f"--calib {args.calib}: no such file (or 'self' for text the dense model "
                         "generates)")
    from ecospa_deploy.commands.args import check_output, require_model

    require_model("model", args.model)
    check_output(args.output, args.overwrite,
                 sources=(args.model,) if args.calib == SELF else (args.model, args.calib))


def _layer_rows(spec_before, spec_after) -> list[list]:
    rows = []
    for i, (a, b) in enumerate(zip(spec_before.layers, spec_after.layers)):
        rows.append([i, f"{a.num_attention_heads}->{b.num_attention_heads}",
                     f"{a.num_key_value_heads}->{b.num_key_value_heads}",
                     f"{a.qk_head_dim}->{b.qk_head_dim}", f"{a.v_head_dim}->{b.v_head_dim}",
                     f"{a.intermediate_size}->{b.intermediate_size}"])
    return rows


def format_summary(s: dict) -> str:
    lines = [f"method {s['method']}  target {s['target_size']:.0%}  time {s['seconds']:.1f}s  "
             f"rounds {s['rounds']}",
             f"params {s['params_before']:,} -> {s['params_after']:,} "
             f"({s['params_after'] / s['params_before']:.2%}; target {s['params_target']:,})"]
    if s.get("align"):
        a = s["align"]
        lines.append(f"align {a['multiple']}: rounding changed the count by {a['cost']:+,} "
                     f"parameters ({len(a['changes'])} width changes)")
    if s.get("recovery"):
        r = s["recovery"]
        lines.append(f"recovery {r['steps']} steps: loss {r['first_loss']:.3f} -> "
                     f"{r['last_loss']:.3f}")
    header = ["layer", "heads", "kv", "qk_dim", "v_dim", "ffn"]
    rows = [header] + [[str(c) for c in r] for r in s["layers"]]
    widths = [max(len(r[j]) for r in rows) for j in range(len(header))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"written to {s['output']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    _check_args(args)    # before torch loads: a bad argument answers at once
    import torch

    from ecospa_deploy.atomic import atomic_directory
    from ecospa_deploy.loading import load_model, load_tokenizer
    from ecospa_deploy.prune.calibration import calibration_windows
    from ecospa_deploy.prune.run import PruneOptions, check_supported, prune_model

    opts = PruneOptions(method=args.method, target_size=args.target_size, top_k=args.top_k,
                        theta=args.theta, align=args.align, batch_size=args.batch_size,
                        seed=args.seed, min_keep=args.min_keep, rounds=args.rounds,
                        heads=args.heads).validate()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model = load_model(args.model, dtype=dtypes.to_torch(args.dtype), device=device)
    check_supported(model)
    tokenizer = load_tokenizer(args.model)
    from ecospa_deploy.families import max_positions

    max_pos = max_positions(model)
    if max_pos and args.seq_len > max_pos:
        raise UsageError(f"--seq-len={args.seq_len} exceeds the model's {max_pos} positions")
    if args.calib == SELF:
        from ecospa_deploy.prune.selftext import selftext_windows

        own = selftext_windows(model, tokenizer, args.samples, args.seq_len, args.seed)
        windows = own.windows
        calibration = {"sha256": own.sha256, "source": "selftext", "samples": args.samples,
                       "seq_len": args.seq_len, "key": own.provenance["key"]}
    else:
        calib = calibration_windows(tokenizer, args.calib, args.samples, args.seq_len, args.seed)
        windows = calib.windows
        calibration = {"sha256": calib.sha256, "file": Path(calib.source).name,
                       "samples": args.samples, "seq_len": args.seq_len,
                       "text_tokens": calib.num_tokens}
    spec_before = model.config.ecospa_spec
    teacher = copy.deepcopy(model) if args.recover_steps and args.recover_loss == "distill" \
        else None
    result = prune_model(model, windows, opts, calibration=calibration)
    summary = {"method": args.method, "target_size": args.target_size,
               "params_before": result.params_before, "params_target": result.params_target,
               "params_after": result.params_after, "rounds": result.rounds,
               "layers": _layer_rows(spec_before, model.config.ecospa_spec),
               "output": str(args.output)}
    if result.align:
        summary["align"] = {"multiple": result.align.multiple, "cost": result.align.cost,
                            "changes": result.align.changes}
    if args.recover_steps:
        torch.manual_seed(args.seed)
        if teacher is not None:
            from ecospa_deploy.prune.distill import DistillConfig, distill

            losses = distill(model, teacher, windows, DistillConfig(
                steps=args.recover_steps, lr=args.recover_lr, batch_size=args.batch_size,
                seed=args.seed))
            del teacher
        else:
            from ecospa_deploy.prune.training import recover

            losses = recover(model, windows, args.recover_steps, args.recover_lr,
                             args.batch_size)
        summary["recovery"] = {"steps": args.recover_steps, "lr": args.recover_lr,
                               "loss": args.recover_loss, "first_loss": losses[0],
                               "last_loss": losses[-1]}
        spec = model.config.ecospa_spec
        model.config.set_spec(spec.replace_layers(spec.layers, recovery=summary["recovery"]))
    with atomic_directory(args.output, overwrite=args.overwrite, sources=(args.model,)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    summary["seconds"] = time.perf_counter() - start
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
