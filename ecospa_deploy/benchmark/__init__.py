"""The benchmark library behind ``ecospa bench``: ``harness`` (backends, timed runs), ``floor``
(the physical floor: bytes and FLOPs at measured ceilings), ``report`` (tables) and ``shapes``
(random-weight models of real shapes and their pruned twins, from ``shapes/<name>.json``).

Experiment scripts that use it live in the repository's ``bench/`` (installed as
``ecospa_deploy.bench``); they import this package, never the other way round.
"""
