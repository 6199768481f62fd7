"""The pruning methods' names: a torch-free module, so the CLI lists them without loading torch.

- Ours, as their papers specify them: ``ecospa`` (EcoSpa, coupled sparsity), ``numerical``
  (Numerical Pruning, with its Eq. 11 compensation).
- Ours, named variants for real pretrained models (docs/real_model.md says why):
  ``ecospa-act`` (EcoSpa whose Eq. 10 unit scores keep the data term of its Eq. 9 exact:
  what each unit computes on the calibration data, not its weight norms; q/k dims keep a
  floor of 3/4), ``numerical-dims`` (Numerical Pruning extended to v and q/k dims inside
  kept heads: what ``numerical`` did before the real-model study; the toy tables use it).
- Baselines: ``uncoupled`` (EcoSpa Appendix A), ``magnitude``.
- Anchors people compare against: ``wanda-sp``, ``flap``, ``llm-pruner``.
"""

METHODS = ("ecospa", "ecospa-act", "numerical", "numerical-dims", "uncoupled", "magnitude",
           "wanda-sp", "flap", "llm-pruner")
