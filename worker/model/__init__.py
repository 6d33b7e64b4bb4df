"""Finding, preparing and loading a Gemma checkpoint."""
from __future__ import annotations

from worker.model.device import Placement, choose_placement
from worker.model.loader import LoadedModel, load_from_settings, load_model
from worker.model.source import ModelSourceError, PreparedModel, embedded_gguf_path, prepare_model

__all__ = [
    "LoadedModel", "ModelSourceError", "Placement", "PreparedModel", "choose_placement",
    "embedded_gguf_path", "load_from_settings", "load_model", "prepare_model",
]
