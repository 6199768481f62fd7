"""The package version: one constant, imported by the package, the CLI and the output manifest
(and read by pyproject), so that no module needs the package ``__init__`` for it."""

VERSION = "0.1.0"
