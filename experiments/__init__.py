"""Measurement scripts: each writes the figures of a docs/RESULTS.md section (run with ``python -m``)."""
