"""Issue 3's quality assertions on a real model: the tiny Llama trained on Shakespeare (CPU).

The model is built once and cached (``ensure_trained("tiny")``, ~1.5 min on 2 cores the first
time). Perplexity is measured on held-out plays that neither training nor calibration saw.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ecospa_deploy.demo import ensure_trained, heldout_tokens
from ecospa_deploy.loading import load_model, load_tokenizer
from ecospa_deploy.prune.baselines import uniform_masks
from ecospa_deploy.prune.calibration import calibration_windows
from ecospa_deploy.prune.run import PruneOptions, prune_model
from ecospa_deploy.prune.surgery import slice_model
from ecospa_deploy.evaluate import perplexity

pytestmark = pytest.mark.slow
SEQ = 128


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    path = ensure_trained("tiny", progress=False)
    model = load_model(path, dtype=torch.float32)
    tok = load_tokenizer(path)
    held = heldout_tokens(path, tok)
    calib = calibration_windows(tok, path / "train.txt", samples=32, seq_len=SEQ).windows
    return model, held, calib


def _ppl(model, held):
    return perplexity(model, held, SEQ, batch_size=16, progress=False, max_windows=48).perplexity


def test_trained_model_is_far_better_than_chance(trained):
    model, held, _ = trained
    assert _ppl(model, held) < 0.1 * model.config.vocab_size


def test_coupled_beats_uncoupled_at_half_ffn_sparsity(trained):
    model, held, _ = trained
    ppl = {}
    for scorer in ("coupled", "uncoupled"):
        m = copy.deepcopy(model)
        slice_model(m, uniform_masks(m, {"ffn": 0.5}, scorer))
        ppl[scorer] = _ppl(m, held)
    assert ppl["coupled"] < ppl["uncoupled"], ppl


def test_ecospa_beats_magnitude_at_70_percent(trained):
    model, held, calib = trained
    ppl = {}
    for method in ("ecospa", "magnitude"):
        m = copy.deepcopy(model)
        result = prune_model(m, calib, PruneOptions(method=method, target_size=0.7, batch_size=8))
        assert abs(result.params_after / result.params_target - 1) < 0.02
        ppl[method] = _ppl(m, held)
    assert ppl["ecospa"] < ppl["magnitude"], ppl
