"""Finding, preparing and loading a Gemma checkpoint.

The names below are imported on first use (PEP 562), so `worker.model.source` (preparing a
checkpoint, reading its config) loads without torch: the CLI checks arguments against the model's
config before paying for torch and the model."""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Placement": "device", "choose_placement": "device",
    "LoadedModel": "loader", "load_from_settings": "loader", "load_model": "loader",
    "ModelSourceError": "source", "PreparedModel": "source", "embedded_gguf_path": "source", "prepare_model": "source",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
