"""Utilities outside the core: reading finished runs back and comparing them (tools/compare_runs.py),
and what the statistics diagnostics of projects/ share (:mod:`.diagnostics`)."""
