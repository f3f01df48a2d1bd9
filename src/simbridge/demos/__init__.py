"""Runnable demonstrations of simbridge on real workloads, importable from the installed package.

Each demo is a sub-package (``simbridge.demos.eki``); the CLI mounts them under ``simbridge demo``.
"""
