"""One module per CLI verb: a docstring that is its --help, `add_arguments(parser)` and `run(args) -> int`."""
