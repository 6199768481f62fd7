"""Training-time EcoSpa: AdamW moments are sliced with the weights, and training goes on exactly
as if the pruned model had been built fresh with those moments."""

from __future__ import annotations

import copy

import pytest
import torch

from ecospa_deploy.prune.surgery import slice_model
from ecospa_deploy.prune.training import EcoSpaCallback, EcoSpaSparsifier, slice_with_optimizer
from ecospa_deploy.testing import VOCAB, random_masks, tiny_dense


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, steps: int, seed0: int = 0, sparsifier=None) -> None:
    model.train()
    for s in range(steps):
        x = _batch(seed0 + s)
        model(input_ids=x, labels=x).loss.backward()
        if sparsifier:
            sparsifier.observe()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sparsifier:
            sparsifier.step(s + 1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_moments_are_sliced_like_the_weights(family):
    """Set each moment to a function of its weight; after slicing it must still be."""
    model = tiny_dense(family)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, 2)
    for p in model.parameters():
        opt.state[p]["exp_avg"] = p.detach().clone()
        opt.state[p]["exp_avg_sq"] = p.detach() ** 2 + 1
    slice_with_optimizer(model, opt, random_masks(model, seed=1))
    params = list(model.parameters())
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in in_groups}
    assert set(opt.state) == set(params)
    for p in params:
        torch.testing.assert_close(opt.state[p]["exp_avg"], p.detach(), atol=0, rtol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], p.detach() ** 2 + 1)
        assert int(opt.state[p]["step"]) == 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "qwen3"])
def test_step_after_sparsification_equals_fresh_pruned_model(family):
    model = tiny_dense(family)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    _train(model, opt, 3)
    masks = random_masks(model, seed=2)
    # Reference moments: slice each moment tensor laid onto a copy of the model, by name.
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        shadow = copy.deepcopy(model)
        for n, p in shadow.named_parameters():
            p.data = opt.state[dict(model.named_parameters())[n]][key].clone()
        slice_model(shadow, masks)
        moments[key] = {n: p.detach().clone() for n, p in shadow.named_parameters()}
    slice_with_optimizer(model, opt, masks)
    # A freshly built pruned model with the same weights and a fresh AdamW given those moments.
    fresh = copy.deepcopy(model)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3, weight_decay=0.1)
    for n, p in fresh.named_parameters():
        fresh_opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": moments["exp_avg"][n].clone(),
                              "exp_avg_sq": moments["exp_avg_sq"][n].clone()}
    _train(model, opt, 1, seed0=10)
    _train(fresh, fresh_opt, 1, seed0=10)
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    assert names   # the original model had parameters to map


def test_sparsifier_reaches_target_in_a_training_loop():
    model = tiny_dense("mistral")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = EcoSpaSparsifier(model, opt, target_size=0.9, every=2, top_k=0.5, theta=0.7)
    for chunk in range(20):
        _train(model, opt, 2, seed0=2 * chunk, sparsifier=sp)
        if sp.done:
            break
    assert sp.done and sp.reports
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - sp.target) <= 0.02 * sp.target
    assert len(sp.masks()) == len(model.decoder_layers)


def test_hf_trainer_callback_sparsifies(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_dense("llama")
    model.train()
    start = sum(p.numel() for p in model.parameters())
    rows = [{"input_ids": _batch(i)[0], "labels": _batch(i)[0]}
            for i in range(24)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             max_steps=12, learning_rate=1e-3, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True)
    cb = EcoSpaCallback(target_size=0.9, every=3, top_k=0.5, theta=0.7)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      callbacks=[cb])
    trainer.train()
    assert cb.sparsifier is not None and cb.sparsifier.reports
    assert sum(p.numel() for p in trainer.model.parameters()) < start
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else \
        trainer.optimizer
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in trainer.model.parameters()}


def test_sparsifier_is_a_step_callback():
    """``cb(step, model, optimizer)`` after ``optimizer.step()`` with gradients still set."""
    model = tiny_dense("gpt2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = EcoSpaSparsifier(model, opt, target_size=0.95, every=1, top_k=0.5, theta=0.7)
    model.train()
    for step in range(1, 30):
        x = _batch(step)
        opt.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        sp(step, model, opt)
        if sp.done:
            break
    assert sp.done and sp.reports
