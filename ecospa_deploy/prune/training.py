"""EcoSpa during training (Algorithm 1 proper): sparsify every N steps, slicing Adam's moments too.

The same object serves sparse pre-training from scratch and recovery fine-tuning after one-shot
pruning (``ecospa prune --recover-steps``). The Fisher information of Eq. 8 comes from the
training step's own gradients (no extra backward pass); every ``every`` optimizer steps, while
the model is above its target, one EcoSpa round (``ecospa_deploy.prune.ecospa``) removes aligned
units, the layers are rebuilt at their new shapes, and every optimizer state tensor of the same
shape as its parameter (AdamW's ``exp_avg``, ``exp_avg_sq``) is sliced with exactly the same
indices; the optimizer's parameter references are swapped for the new tensors.

Plain PyTorch loop::

    from ecospa_deploy.prune.training import EcoSpaSparsifier

    model = ...                          # one of our model classes (from_hf / load_model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sparsifier = EcoSpaSparsifier(model, opt, target_size=0.5, every=100)
    for step, batch in enumerate(loader, 1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        sparsifier.observe()             # after backward: accumulate grad² (Eq. 8)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sparsifier.step(step)            # every `every` steps: one round + optimizer slicing
    sparsifier.masks()                   # kept indices relative to the starting model

The project's training loop calls back after each optimizer step with the gradients still
set, so the sparsifier itself is the callback (sparse pre-training from scratch)::

    from ecospa_deploy.modeling import from_hf
    from ecospa_deploy.train import build_model, make_optimizer, train

    model = from_hf(build_model("llama", "small", vocab_size)).train()
    opt = make_optimizer(model, cfg)
    sparsifier = EcoSpaSparsifier(model, opt, target_size=0.5, every=50)
    train(model, tokens, cfg, optimizer=opt, callbacks=[sparsifier])

HF ``Trainer``::

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[EcoSpaCallback(target_size=0.5, every=100)])

The callback accumulates in ``on_pre_optimizer_step`` and sparsifies in ``on_step_end``.
Learning-rate schedules, gradient clipping and ``model.parameters()`` keep working because the
optimizer's ``param_groups`` are updated in place. Keep ``every`` larger than the gradient
accumulation period; build the optimizer after wrapping/compiling the model as usual (a
``torch.compile``d model recompiles after each round since shapes change).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.prune.ecospa import EcoSpaConfig, RoundReport, ecospa_round
from ecospa_deploy.prune.floors import DEFAULT_MIN_KEEP, Floors
from ecospa_deploy.prune.fisher import FisherAccumulator
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.surgery import slice_model
from ecospa_deploy.prune.tracking import KeptIndices, ParamCounter, count_params


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's ``AcceleratedOptimizer`` wrapper (if any)."""
    return getattr(optimizer, "optimizer", optimizer)


@torch.no_grad()
def slice_with_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                         masks: list[LayerMask | None]) -> None:
    """``slice_model`` plus the same slicing of every parameter-shaped optimizer state tensor.

    Each state key (``exp_avg``, ``exp_avg_sq``, ...) is laid onto a copy of the model in place
    of the weights and sliced by the very surgery that slices the weights, so moments follow
    their weights for every family and layout (at the cost of one transient model copy per
    state key). Scalar state (``step``) is kept.
    """
    if optimizer is None:
        slice_model(model, masks)
        return
    opt = _inner(optimizer)
    old = dict(model.named_parameters())
    keys = sorted({k for p in old.values() for k, v in opt.state.get(p, {}).items()
                   if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0})
    model.zero_grad(set_to_none=True)
    sliced: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        shadow = copy.deepcopy(model)
        for name, p in shadow.named_parameters():
            st = opt.state.get(old[name], {})
            value = st.get(key)
            p.data = value.to(p.dtype) if value is not None and value.shape == p.shape \
                else torch.zeros_like(p)
        slice_model(shadow, masks)
        for name, p in shadow.named_parameters():
            sliced.setdefault(name, {})[key] = p.data
        del shadow
    slice_model(model, masks)
    new = dict(model.named_parameters())
    name_of = {id(p): n for n, p in old.items()}
    for group in opt.param_groups:
        group["params"] = [new[name_of[id(p)]] if id(p) in name_of else p
                           for p in group["params"]]
    for name, p_old in old.items():
        p_new = new[name]
        if p_new is p_old or p_old not in opt.state:
            continue
        state = opt.state.pop(p_old)
        for key in keys:
            if key in state:
                state[key] = sliced[name][key].to(state[key].dtype)
        opt.state[p_new] = state


class EcoSpaSparsifier:
    """Algorithm 1 inside a training loop (see the module docstring for usage)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 target_size: float | None = None, *, target_params: int | None = None,
                 every: int = 100, top_k: float = 0.3, theta: float = 0.9,
                 min_keep: float = DEFAULT_MIN_KEEP):
        if (target_size is None) == (target_params is None):
            raise EcospaError("give exactly one of target_size (fraction) or target_params")
        if target_size is not None and not 0 < target_size < 1:
            raise EcospaError(f"target_size={target_size} is invalid; expected a fraction in "
                              "(0, 1)")
        if every < 1:
            raise EcospaError(f"every={every} is invalid; expected an integer >= 1")
        self.model, self.optimizer, self.every = model, optimizer, every
        self.cfg = EcoSpaConfig(top_k, theta).validate()
        self.counter = ParamCounter(model)
        self.target = target_params if target_params is not None else round(
            target_size * count_params(model))
        self.kept = KeptIndices.identity(model.config.ecospa_spec)
        self.floors = Floors.of(model.config.ecospa_spec, min_keep)
        self.fisher = FisherAccumulator(model)
        self.reports: list[RoundReport] = []
        self._steps_seen = 0

    @property
    def params(self) -> int:
        return self.counter.total(self.model.config.ecospa_spec.layers)

    @property
    def done(self) -> bool:
        return self.params <= self.target

    def observe(self) -> None:
        """Accumulate grad² of the current backward pass (call before ``zero_grad``)."""
        if not self.done:
            self.fisher.accumulate()

    def step(self, step: int | None = None) -> RoundReport | None:
        """Run one round if ``step`` is a multiple of ``every`` and the target is not met."""
        self._steps_seen += 1
        step = self._steps_seen if step is None else step
        if self.done or step % self.every or self.fisher.count == 0:
            return None
        return self.sparsify()

    def sparsify(self) -> RoundReport:
        """One EcoSpa round now, with the Fisher accumulated since the last one."""
        report, _ = ecospa_round(
            self.model, self.fisher, self.counter, self.target, self.cfg, self.kept, self.floors,
            slicer=lambda m, ms: slice_with_optimizer(m, self.optimizer, ms))
        self.reports.append(report)
        self.fisher.reset()
        return report

    def masks(self) -> list[LayerMask]:
        """Kept indices relative to the model this sparsifier started from."""
        return self.kept.masks()

    def __call__(self, step: int, model: nn.Module | None = None, optimizer=None
                 ) -> RoundReport | None:
        """Step-callback form ``cb(step, model, optimizer)`` for loops that call back after
        ``optimizer.step()`` with the gradients still set (``ecospa_deploy.train.train``)."""
        self.observe()
        return self.step(step)


class EcoSpaCallback(TrainerCallback):
    """HF ``Trainer`` callback running ``EcoSpaSparsifier`` (Fisher from the training grads)."""

    def __init__(self, target_size: float | None = None, *, target_params: int | None = None,
                 every: int = 100, top_k: float = 0.3, theta: float = 0.9,
                 min_keep: float = DEFAULT_MIN_KEEP):
        self.kwargs = dict(target_size=target_size, target_params=target_params, every=every,
                           top_k=top_k, theta=theta, min_keep=min_keep)
        self.sparsifier: EcoSpaSparsifier | None = None

    def _ensure(self, model: nn.Module, optimizer: Any) -> EcoSpaSparsifier:
        if self.sparsifier is None:
            self.sparsifier = EcoSpaSparsifier(model, optimizer, **self.kwargs)
        return self.sparsifier

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        self._ensure(model, optimizer).observe()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        self._ensure(model, optimizer).step(state.global_step)


def recover(model: nn.Module, windows: torch.Tensor, steps: int, lr: float = 1e-4,
            batch_size: int = 1, weight_decay: float = 0.0) -> list[float]:
    """Recovery fine-tuning: ``steps`` AdamW steps of LM loss over the calibration windows."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    n = windows.shape[0]
    for step in tqdm(range(steps), desc="recovery"):
        idx = [(step * batch_size + j) % n for j in range(batch_size)]
        batch = windows[idx].to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


__all__ = ["EcoSpaSparsifier", "EcoSpaCallback", "slice_with_optimizer", "recover"]
