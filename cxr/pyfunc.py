"""MLflow's python_function flavor for cxr models (the ``loader_module`` of every registered
cxr model and bundle), so that ``mlflow.pyfunc.load_model(uri).predict(...)`` works:

- a screen (``cxr-screen``): a DataFrame with a ``path`` (str: local path or s3:// URI) or an
  ``image`` (bytes) column -> one scores row per input (``cxr.screen.ROW_FIELDS``);
- a classifier or segmenter: a float32 array (N, C, H, W), already preprocessed -> logits.

MLflow imports this module from the installed ``cxr`` package and calls ``_load_pyfunc`` with
the model's folder: nothing in the artifacts is unpickled or executed, and a folder with any
file that is not weights, JSON, YAML or text is refused (``cxr.package.check_safe``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr.package import SCREEN, read_model


class ScreenModel:
    """The pyfunc face of a ``cxr.screen.Screen``."""

    def __init__(self, screen):
        self.screen = screen

    def predict(self, model_input, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        return self.screen.predict(model_input, batch_size=int(params.get("batch_size", 32)),
                                   heatmap_size=int(params.get("heatmap_size", 64)))


class TensorModel:
    """A classifier or segmenter on preprocessed tensors: logits out."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def predict(self, model_input, params: dict | None = None) -> np.ndarray:
        if isinstance(model_input, dict):        # the signature names its one input "image"
            model_input = model_input["image"]
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32), device=self.device)
        return self.model(x).float().cpu().numpy()


def _load_pyfunc(path: str):
    """Called by ``mlflow.pyfunc.load_model`` with the model's local folder."""
    from cxr.model_input import default_device
    from cxr.screen import Screen

    folder = Path(path)
    if (folder / SCREEN).exists():
        return ScreenModel(Screen.from_folder(folder))
    model, _ = read_model(folder, default_device())
    return TensorModel(model)
