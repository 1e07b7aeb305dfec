"""cxr: chest X-ray screening (lung segmentation, transfer-learned classification, Grad-CAM).

    import cxr
    screen = cxr.load("models:/cxr-screen@champion")      # or a bundle folder / .tar
    rows = screen.predict(["a.dcm", "b.png"])              # a pandas DataFrame, one row per image

The library never parses argv, calls ``ray.init`` or sets a global MLflow URI: the thin
entry points in ``jobs/`` do that.
"""

__version__ = "0.1.0"


def load(model, tracking_uri=None, device=None, segmenter=None, storage=None):
    """A ``cxr.screen.Screen`` from the registry or a bundle (``cxr.workflows.screen.load``)."""
    from cxr.workflows.screen import load as _load

    return _load(model, tracking_uri, device, segmenter, storage)
