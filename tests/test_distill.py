"""Distillation recovery: the loss, the schedule, that it moves a pruned student toward the
dense teacher, and EcoSpa's training-time recipe (prune while distilling) through ``on_step``."""

from __future__ import annotations

import copy

import pytest
import torch

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.prune.distill import DistillConfig, distill, kl_loss, lr_at
from ecospa_deploy.prune.run import PruneOptions, prune_model
from ecospa_deploy.prune.surgery import slice_model, zero_out
from ecospa_deploy.prune.tracking import count_params
from ecospa_deploy.prune.training import EcoSpaSparsifier
from ecospa_deploy.testing import VOCAB, tiny_dense


def _windows(seed: int = 0, n: int = 8, length: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _kl(student, teacher, windows) -> float:
    with torch.no_grad():
        return float(kl_loss(student(input_ids=windows).logits, teacher(input_ids=windows).logits))


def test_kl_is_zero_on_itself_and_matches_the_definition():
    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert float(kl_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(b, -1)
    want = (p * (p.log() - torch.log_softmax(a, -1))).sum(-1).mean()
    assert float(kl_loss(a, b)) == pytest.approx(float(want), rel=1e-5)


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = DistillConfig(steps=100, lr=1.0, warmup=0.1, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_distill_brings_a_pruned_student_toward_the_teacher():
    teacher = tiny_dense("llama").eval()
    student = copy.deepcopy(teacher)
    prune_model(student, _windows(1), PruneOptions(method="magnitude", target_size=0.6))
    held_out = _windows(9, 4)
    before = _kl(student, teacher, held_out)
    frozen = [p.requires_grad for p in teacher.parameters()]
    losses = distill(student, teacher, _windows(2, 32), DistillConfig(steps=40, lr=3e-3,
                                                                      batch_size=8),
                     progress=False)
    assert len(losses) == 40 and losses[-1] < losses[0]
    assert _kl(student, teacher, held_out) < 0.8 * before
    assert [p.requires_grad for p in teacher.parameters()] == frozen
    assert not teacher.training


def test_bad_config_is_refused():
    with pytest.raises(EcospaError, match="steps"):
        DistillConfig(steps=0).validate()
    teacher = tiny_dense("llama")
    with pytest.raises(EcospaError, match="windows"):
        distill(copy.deepcopy(teacher), teacher, torch.zeros(5, dtype=torch.long))


def test_prune_while_distilling_reaches_the_target_with_exact_masks():
    """Algorithm 1 as a recovery recipe: the sparsifier is the distillation loop's step
    callback; the result is the input model sliced by the masks it reports."""
    teacher = tiny_dense("llama").eval()
    student = copy.deepcopy(teacher)
    start = copy.deepcopy(teacher)
    target = round(0.7 * count_params(student))
    holder = {}

    def on_step(step, model, optimizer):
        if "s" not in holder:
            holder["s"] = EcoSpaSparsifier(model, optimizer, target_params=target, every=5,
                                           top_k=0.5, theta=0.7)
        holder["s"](step, model, optimizer)

    distill(student, teacher, _windows(3, 64), DistillConfig(steps=60, lr=1e-3, batch_size=4),
            progress=False, on_step=on_step)
    sparsifier = holder["s"]
    assert sparsifier.done and count_params(student) <= target
    # the kept indices replay on the starting model: same shapes as the trained student
    replay = copy.deepcopy(start)
    slice_model(replay, sparsifier.masks())
    assert [p.shape for p in replay.parameters()] == [p.shape for p in student.parameters()]
    ref = copy.deepcopy(start)
    zero_out(ref, sparsifier.masks())
    x = _windows(5, 2)
    with torch.no_grad():
        torch.testing.assert_close(replay(input_ids=x).logits, ref(input_ids=x).logits,
                                   atol=2e-5, rtol=0)
