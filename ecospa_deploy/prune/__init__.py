"""Structured pruning: EcoSpa (coupled sparsity), Numerical Pruning, baselines and shape surgery.

- ``run.prune_model``: one entry point (target size → masks → optional ``--align`` → slice →
  provenance); ``commands/prune.py`` is its CLI.
- ``ecospa``: Algorithm 1 of the EcoSpa paper, one round at a time; ``training`` runs it inside a
  training loop / HF ``Trainer`` with AdamW moments sliced alongside the weights.
- ``numerical``: Newton-method numerical score and Eq. 11 compensation.
- ``baselines``: ``magnitude`` and ``uncoupled`` (EcoSpa Appendix A).
- ``units`` (coupled row/column units and their scores), ``fisher`` (Eq. 8), ``tracking``
  (kept indices, parameter counts), ``calibration`` (token windows), ``align`` (width rounding).
- ``mask`` and ``surgery``: the mask format and slice / zero-out / exact padding.
"""
