"""The greedy output layer on CPU through an int4 screen, answering what the fp32 layer answers.

A decode step's output layer (262,144 words x 640) is the largest matmul of the step. For the
greedy token only the best word matters, so: score every word with a 4-bit copy of the layer
(`aten._weight_int4pack_mm_for_cpu`, the kernel of `--quantize int4`, several times faster than
fp32 `linear` at decode sizes), take the `CANDIDATES` best, score those again in fp32 from the
layer's own weights, and keep the best of them. The answer is then the fp32 layer's answer unless
a word outside the candidates scores higher in fp32 than every candidate, which needs that word's
screen error to exceed the gap between its screen score and the best fp32 candidate. Each row
checks, before its answer is used, that every word outside the candidates stays below the best
candidate's fp32 score by more than a margin:

    screen score + |screen score| * 2^-8           (the kernel's bf16 output rounding, at most 2^-9)
                 + SIGMAS * ||hidden|| * ||w_int4 - w|| / sqrt(hidden size)   <  best candidate

The last term is SIGMAS times the size a word's error (hidden . (w_int4 - w)) has when its
quantization residual points in no particular direction relative to the hidden state. A cheap
check first takes the lowest candidate's screen score and the largest residual of any word; only
rows that fail it are checked word by word. It is not a worst-case bound (that, ||hidden|| * ||residual||, is
about 25 times larger and keeps tens of thousands of words as candidates: docs/PERFORMANCE.md);
measured over the bench's 64 prompts (4,096 decode states x 262,144 words) the largest error was
5.9 such units at the word's own residual. A row whose gap is below the margin (a flat
distribution over many words) is answered by the fp32 layer in full, as without the screen.

`Settings.head_screen` (`--no-head-screen`) turns it off; it is used only where it applies: a CPU
`nn.Linear` head without bias or logit soft-capping, on a PyTorch that has the kernel."""
from __future__ import annotations

import math

import torch

from worker.model import int4

CANDIDATES = 256  # words re-scored in fp32 per row
SIGMAS = 8.0
ROUNDING = 2.0 ** -8


def applies(head: torch.nn.Module, *, device: torch.device, softcap: float | None) -> bool:
    """Whether a screen can stand in for this output layer (see the module docstring)."""
    return (device.type == "cpu" and type(head) is torch.nn.Linear and head.bias is None and softcap is None
            and head.weight.dtype == torch.float32 and int4.supported(head)
            and head.weight.shape[0] > CANDIDATES and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


class HeadScreen:
    """A 4-bit copy of one output layer and the fp32 re-scoring of its candidates."""

    def __init__(self, head: torch.nn.Linear) -> None:
        self.weight = head.weight  # the layer's own fp32 weights (shared, not copied)
        words, width = self.weight.shape
        packed, scales, residuals = [], [], []
        with torch.no_grad():
            for start in range(0, words, int4.CHUNK_ROWS):
                rows = self.weight[start: start + int4.CHUNK_ROWS]
                codes, so = int4.quantize_groups(rows, refits=0)
                residuals.append(torch.linalg.vector_norm(int4.dequantize(codes, so) - rows, dim=1))
                packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
                scales.append(so)
        self.packed = torch.cat(packed)
        self.scales_offsets = torch.cat(scales, dim=1)
        # one unit of each word's error size per unit of ||hidden||: ||w_int4 - w|| / sqrt(width)
        self.units = torch.cat(residuals) / math.sqrt(width)
        self.unit = float(self.units.max())

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every word's screen score (fp32 from the kernel's bf16 output)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(hidden.to(torch.bfloat16), self.packed, int4.GROUP,
                                                          self.scales_offsets).float()

    def best(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the best candidate per row by fp32 score, ties to the lowest id; whether the row is sure:
        no word outside the candidates comes within the margin of that best score)."""
        scores = self.scores(hidden)
        top = scores.topk(CANDIDATES, dim=1)
        exact = torch.bmm(self.weight[top.indices], hidden.unsqueeze(2)).squeeze(2)
        high = exact.max(dim=1).values
        ids = torch.where(exact == high[:, None], top.indices, torch.iinfo(torch.long).max).min(dim=1).values
        norms = torch.linalg.vector_norm(hidden, dim=1)
        # cheap check at the largest residual: every word outside scores at most the lowest candidate
        lowest = top.values[:, -1]
        sure = high > lowest + lowest.abs() * ROUNDING + SIGMAS * self.unit * norms
        unsure = (~sure).nonzero().squeeze(1)
        if unsure.numel():  # then word by word, at each word's own residual
            rest = scores[unsure]
            reach = rest + rest.abs() * ROUNDING + SIGMAS * norms[unsure, None] * self.units
            reach.scatter_(1, top.indices[unsure], float("-inf"))  # the candidates themselves
            sure[unsure] = high[unsure] > reach.max(dim=1).values
        return ids, sure
