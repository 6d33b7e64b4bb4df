"""Device and dtype choice: CUDA with bf16 when present, else CPU with fp32 (no bf16 units assumed)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def choose_placement(requested: str = "auto") -> Placement:
    """`auto` picks CUDA when available; asking for CUDA without one falls back to CPU with a warning."""
    wants_cuda = requested == "auto" or requested.startswith("cuda")
    if wants_cuda and torch.cuda.is_available():
        device = torch.device("cuda" if requested == "auto" else requested)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Placement(device, dtype)
    if requested.startswith("cuda"):
        log.warning("device %s was asked for but CUDA is not available; falling back to CPU (fp32)", requested)
    return Placement(torch.device("cpu"), torch.float32)
