"""The acceptance battery: hostile inputs against the installed `mdlm-golf` command (issue 12).

Not part of the default `python -m pytest` run (pyproject's norecursedirs); run it with
`python -m pytest tests/acceptance`, or `python tests/acceptance/battery.py` for the result table.
A package, so its test modules (test_faults.py, ...) do not clash with tests/ modules of the same name."""
