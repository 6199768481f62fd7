"""The training loop lowers loss, is reproducible, and hands callbacks each step."""

from __future__ import annotations

import math

import pytest
import torch

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.evaluate import perplexity as _perplexity
from ecospa_deploy.train import TrainConfig, build_model, count_parameters, lr_at, train


def perplexity(model, tokens, seq_len):
    """The one protocol (ecospa_deploy.evaluate), as a number."""
    return _perplexity(model, tokens, seq_len, batch_size=16, progress=False).perplexity

VOCAB = 64


def _tokens(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """A learnable stream: a noisy repeating pattern over the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) * 7 % VOCAB
    noise = torch.randint(0, VOCAB, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.1, noise, base)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 30, "batch_size": 8, "seq_len": 32, "lr": 3e-3, "warmup": 5, **kw})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_lowers_loss_and_heldout_perplexity(family):
    tokens = _tokens()
    model = build_model(family, "tiny", VOCAB, seed=0)
    before = perplexity(model, _tokens(4000, seed=1), seq_len=32)
    result = train(model, tokens, _cfg(), eval_tokens=_tokens(4000, seed=1), progress=False)
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    assert result.eval[-1]["perplexity"] < 0.5 * before
    assert result.tokens == 30 * 8 * 32 and result.tokens_per_s > 0


def test_training_is_reproducible_on_cpu():
    runs = []
    for _ in range(2):
        model = build_model("llama", "tiny", VOCAB, seed=3)
        runs.append(train(model, _tokens(), _cfg(steps=5, seed=3), progress=False).losses)
    assert runs[0] == runs[1]


def test_callbacks_run_after_every_step():
    seen = []
    model = build_model("llama", "tiny", VOCAB)
    train(model, _tokens(), _cfg(steps=4), callbacks=[lambda s, m, o: seen.append(s)],
          progress=False)
    assert seen == [1, 2, 3, 4]


def test_our_model_class_trains_too():
    from ecospa_deploy.modeling import from_hf

    model = from_hf(build_model("llama", "tiny", VOCAB)).train()
    result = train(model, _tokens(), _cfg(steps=20), progress=False)
    assert result.losses[-1] < result.losses[0]


def test_lr_schedule_warms_up_then_decays():
    cfg = _cfg(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)


def test_perplexity_of_uniform_model_is_vocab_size():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kwargs):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, VOCAB)})

    assert perplexity(Uniform(), _tokens(1000), seq_len=50) == pytest.approx(VOCAB, rel=1e-5)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="shape='huge'"):
        build_model("llama", "huge", VOCAB)
    with pytest.raises(ValueError, match="family='bert'"):
        build_model("bert", "tiny", VOCAB)
    with pytest.raises(EcospaError, match="shorter than one window"):
        perplexity(build_model("llama", "tiny", VOCAB), _tokens(10), seq_len=32)


def test_named_shapes_have_gqa_and_parameter_counts():
    m = build_model("llama", "small", 4096)
    assert m.config.num_key_value_heads < m.config.num_attention_heads
    assert 20e6 <= count_parameters(m) <= 100e6
    g = build_model("gpt2", "small", 4096)
    assert 20e6 <= count_parameters(g) <= 100e6
    assert not math.isnan(float(next(g.parameters()).detach().sum()))
