"""Utilities outside the core: reading finished runs back and comparing them (tools/compare_runs.py)."""
