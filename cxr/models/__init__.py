"""Architectures by name. Each full-size model has a tiny registered twin for tests.

``build_model("unet-resnet34")``; an unknown name fails and lists the choices.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str            # "segmenter" or "classifier"
    input_size: int      # the letterbox size it is trained and served at
    builder: Callable[..., nn.Module]


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, task: str, input_size: int) -> Callable:
    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelSpec(name, task, input_size, builder)
        return builder
    return wrap


def model_spec(name: str) -> ModelSpec:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choices: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_model(name: str, **kwargs) -> nn.Module:
    return model_spec(name).builder(**kwargs)


def model_names(task: str | None = None) -> list[str]:
    _load_builtin()
    return sorted(n for n, s in _REGISTRY.items() if task is None or s.task == task)


def _load_builtin() -> None:
    # By name: the architectures register themselves on import and import this module for it,
    # so this module never imports them statically (no circle in the import graph).
    for module in ("cxr.models.classifier", "cxr.models.segmenter"):
        importlib.import_module(module)
