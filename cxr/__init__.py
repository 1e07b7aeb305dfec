"""cxr: chest X-ray screening (lung segmentation, transfer-learned classification, Grad-CAM).

The library never parses argv, calls ``ray.init`` or sets a global MLflow URI: the thin
entry points in ``jobs/`` do that.
"""

__version__ = "0.1.0"
