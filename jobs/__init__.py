"""Thin entry points: config -> cxr call -> exit code. The `cxr` console script dispatches here."""
