"""The pruning methods' names: a torch-free module, so the CLI lists them without loading torch."""

METHODS = ("ecospa", "numerical", "uncoupled", "magnitude")
