"""Structured pruning: EcoSpa (coupled sparsity), Numerical Pruning, their variants, the anchors
people compare against, recovery, and shape surgery.

- ``run.prune_model``: one entry point (target size → masks → optional ``--align`` → slice →
  provenance); ``commands/prune.py`` is its CLI; ``methods`` names every method.
- ``ecospa``: Algorithm 1 of the EcoSpa paper, one round at a time (``ecospa-act``: its Eq. 10
  on activations, ``units.activation_norms``); ``training`` runs it inside a training loop /
  HF ``Trainer`` with AdamW moments sliced alongside the weights.
- ``numerical``: Newton-method numerical score and Eq. 11 compensation.
- ``baselines``: ``magnitude`` and ``uncoupled`` (EcoSpa Appendix A).
- anchors: ``wanda_sp``, ``flap``, ``llm_pruner`` (shared units in ``anchor_units``,
  gradients in ``gradients``).
- ``activations`` (calibration moments of every layer's module inputs), ``units`` (coupled
  row/column units and their scores), ``fisher`` (Eq. 8), ``tracking`` (kept indices,
  parameter counts), ``calibration`` (token windows from a text file), ``selftext`` (windows of
  text the dense model writes itself), ``align`` (width rounding), ``floors`` (per-layer minima).
- ``distill``: recovery by distillation from the dense model.
- ``mask`` and ``surgery``: the mask format and slice / zero-out / exact padding / added biases.
"""
