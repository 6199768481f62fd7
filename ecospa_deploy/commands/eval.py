"""Held-out perplexity over non-overlapping windows, and a quick generation.

Protocol: the text is tokenized once (no special tokens), cut into floor(N/seq_len)
non-overlapping windows (remainder dropped), each window scored on its own, and
perplexity = exp(total NLL / predicted tokens); see ecospa_deploy.evaluate.

examples:
  ecospa eval ./llama-70 --data heldout.txt --seq-len 512
  ecospa eval ./llama-70 --data heldout.txt --json
  ecospa eval ./llama-70 --generate "To be, or not to be"
"""

from __future__ import annotations

import argparse
import json

from ecospa_deploy import dtypes
from ecospa_deploy.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecospa_deploy.commands.args import positive_int

    parser.add_argument("model", help="checkpoint directory (ours or a stock HF directory)")
    parser.add_argument("--data", help="UTF-8 text file to measure perplexity on")
    parser.add_argument("--seq-len", type=positive_int, default=2048,
                        help="window length (2048, or the model's maximum if smaller)")
    parser.add_argument("--batch-size", type=positive_int, default=1,
                        help="windows scored per forward pass (default: %(default)s)")
    parser.add_argument("--generate", metavar="PROMPT", help="print a greedy continuation")
    parser.add_argument("--max-new-tokens", type=positive_int, default=50,
                        help="tokens --generate adds (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=dtypes.NAMES,
                        help="compute dtype (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")


def run(args: argparse.Namespace) -> int:
    from ecospa_deploy.commands.args import require_model, require_paths

    if not args.data and not args.generate:   # before torch loads
        raise UsageError("nothing to do: give --data TEXTFILE and/or --generate PROMPT")
    require_model("model", args.model)
    require_paths(("--data", args.data))
    import torch

    from ecospa_deploy.evaluate import text_perplexity
    from ecospa_deploy.loading import load_model, load_tokenizer
    from ecospa_deploy.prune.calibration import read_text
    from ecospa_deploy.prune.tracking import count_params

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, dtype=dtypes.to_torch(args.dtype), device=device)
    tokenizer = load_tokenizer(args.model)
    out: dict = {"model": str(args.model), "params": count_params(model)}
    if args.data:
        text, digest = read_text(args.data)
        from ecospa_deploy.families import max_positions

        max_pos = max_positions(model)
        seq_len = min(args.seq_len, max_pos) if max_pos else args.seq_len
        ppl = text_perplexity(model, tokenizer, text, seq_len, args.batch_size,
                              progress=not args.json)
        out.update(ppl.to_dict(), data=str(args.data), data_sha256=digest)
    if args.generate:
        ids = tokenizer(args.generate, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out["generation"] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"model {out['model']}  params {out['params']:,}")
        if args.data:
            capped = "" if out["seq_len"] == args.seq_len else \
                f"; --seq-len {args.seq_len} capped at the model's {out['seq_len']} positions"
            print(f"perplexity {out['perplexity']:.3f}  (nll {out['nll']:.4f}, {out['windows']} "
                  f"non-overlapping windows x {out['seq_len']} tokens, {out['tokens']:,} "
                  f"predictions, {out['seconds']:.1f}s{capped})")
        if args.generate:
            print(f"{args.generate}{out['generation']}")
    return 0
