"""CPU bf16 matmuls (`--quantize bf16` on CPU, lossy): the body's linear layers keep their weights
in bf16 and multiply bf16 activations on the CPU's bf16 units (AMX or AVX-512 bf16, through oneDNN),
each output going back to fp32 at once, so the residual stream, norms, attention and the output layer
stay fp32. Rounding the weights, the activations entering a layer and its output to bf16 (8 bits of
mantissa) is the whole of the cost: mean-pooled embeddings stayed within cosine 0.9999 of fp32 on the
texts measured, while greedy text can move after some tokens (docs/PERFORMANCE.md gives both).

It pays only where the CPU has bf16 units: on the 2-core AVX-512/AMX Xeon of docs/PERFORMANCE.md
embedding ran 1.33-1.57x and generation 1.16-1.39x the exact engine, while a CPU without them
emulates bf16 far slower than fp32; loading times a layer both ways and warns where bf16 loses.
The fp32 weights of the replaced layers are freed (their checkpoint pages released), so a built
engine holds less (figures in docs/PERFORMANCE.md)."""
from __future__ import annotations

import torch

from worker.model import int4


class Bf16Linear(torch.nn.Module):
    """A linear layer on bf16 weights for fp32 activations (see the module docstring). Not an
    `nn.Linear`, so nothing that reads an fp32 `.weight` (the greedy head's screens) takes it."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        if linear.weight.device.type != "cpu":
            raise ValueError("Bf16Linear runs on CPU only")
        self.out_features, self.in_features = linear.weight.shape
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = (None if linear.bias is None else
                     torch.nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bf16"


def quantize_model(root: torch.nn.Module, *, skip: torch.nn.Module | None = None) -> int:
    """Replace every fp32 `nn.Linear` under `root` but `skip` (the output layer) with a `Bf16Linear`;
    returns how many were replaced. Each fp32 weight read from the memory-mapped checkpoint has its
    pages released once copied (`int4.replace_linears`)."""
    return int4.replace_linears(root, lambda module: (type(module) is torch.nn.Linear and module is not skip
                                                      and module.weight.dtype == torch.float32), Bf16Linear)


def slower_than_fp32_warning(bf16_s: float, fp32_s: float) -> str | None:
    """What to tell a user whose CPU multiplies bf16 no faster than fp32 (None otherwise)."""
    return int4.slower_than_fp32_warning(bf16_s, fp32_s, mode="bf16", kernel="bf16 linear",
                                         why=" (a CPU without bf16 units emulates it)")
