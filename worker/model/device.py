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


def attention_without_per_shape_plans(placement: Placement) -> None:
    """On CUDA, take cuDNN attention out of the backends `scaled_dot_product_attention` may pick,
    leaving FlashAttention, memory-efficient attention and the plain one (torch's order otherwise).

    Recent PyTorch puts cuDNN attention first on Hopper and Blackwell data-centre cards, and cuDNN
    builds an execution graph on the host for every new call size (rows and key length), cached
    per size. Real traffic brings new sizes all the time: every embedding pass has its own width
    and every decode step its own key length. On an H100 a fresh process's first embedding of the
    bench's 2,000 texts spent 7.4 s more inside attention than its second, and generation 11.7 s
    (docs/PERFORMANCE.md, run 5); the kernels left here prepare nothing per size. A process-wide
    switch: one engine per process. The service's L4 does not prefer cuDNN attention, so there
    this changes nothing."""
    if placement.device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
