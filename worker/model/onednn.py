"""The body's fp32 linear layers through oneDNN where this CPU runs them faster that way.

PyTorch's CPU `linear` multiplies fp32 through its BLAS, Intel's MKL in the PyPI wheels. MKL picks
its kernels by CPU vendor: on the 2-core AVX-512 AMD EPYC of docs/PERFORMANCE.md, oneDNN (also
inside PyTorch, `torch.ops.mkldnn._linear_pointwise`, what inductor's CPU fusions call) multiplied
the model's own layer shapes 1.25-1.5x faster, on the same fp32 weights (no copy, no packing) and
with fp32 accumulation: results differ from MKL's only by the order of the additions, as MKL's own
differ between call sizes. Which is faster depends on the CPU, so `choose` times both on the
model's shapes when the model loads (load and warm-up took 0.2-0.5 s longer with it) and switches
only where oneDNN wins by `FASTER` and agrees with `linear` to fp32 rounding; the layers stay
`nn.Linear` modules with their weights, only their forward changes (`use_onednn`, undone by
`use_default`). Under `--compile` the compiled graph calls oneDNN through an operator of this
module's own (`gemma_batch::onednn_linear`), which inductor leaves as it is.

Not for quantized layers (`--quantize` replaces the modules it changes), the output layer (the
word table and the greedy head's screens serve it), or a GPU.

oneDNN keeps a compiled primitive for every call size it meets (about 0.65 MB each on the AMD EPYC
of docs/PERFORMANCE.md, whatever the layer's shape), in two caches of up to 1,024 entries each by
default, oneDNN's own and PyTorch's (ideep's). A serving worker meets hundreds of call sizes: five
layer shapes at 1,000 row counts each grew RSS by 3.8 GB. `bound_caches` holds both to
`CACHE_CAPACITY` entries (the same run grew RSS by 252 MB; 600 row counts four times over, 110-150
MB), where a missed size costs about a millisecond to compile again, against a forward pass of
tens to hundreds. Both caches read their capacity from the environment when oneDNN first runs, so
`bound_caches` runs when the loader is imported, before any model work."""
from __future__ import annotations

import logging
import os
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

FASTER = 1.05  # oneDNN must beat `linear` by this much on the probe to be used
CACHE_CAPACITY = 64  # compiled primitives each cache keeps (module docstring)
PROBE_ROWS = 256  # rows per probe call: between a decode step's and an embedding pass's
PROBE_ROUNDS = 5


@dataclass(frozen=True)
class Choice:
    """The probe's outcome: seconds per pass over the model's layer shapes for each kernel (best of
    `PROBE_ROUNDS`), whether oneDNN was switched on, and how many layers it took."""

    onednn_s: float | None
    default_s: float | None
    used: bool
    layers: int
    why: str


def bound_caches(capacity: int = CACHE_CAPACITY) -> None:
    """Hold oneDNN's primitive cache and PyTorch's oneDNN cache to `capacity` entries each, unless
    the environment already sets them (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, `LRU_CACHE_CAPACITY`).
    Takes effect only before oneDNN first runs in the process."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))


def available() -> bool:
    """Whether this PyTorch build has oneDNN's fp32 linear for CPU tensors."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("gemma_batch::onednn_linear", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
def _opaque_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear as an operator `torch.compile` calls as it is. Inductor lowers
    `mkldnn._linear_pointwise` itself only for weights frozen into the graph as constants, and
    fails on the module parameters the engine's compiled forward pass takes as inputs."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_opaque_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.nn.functional.linear` through oneDNN (any number of leading dimensions). Inside a
    `torch.compile`d graph (`--compile`) the same call, as an operator the graph does not lower."""
    if torch.compiler.is_compiling():
        return _opaque_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if type(weight) is not torch.nn.Parameter or weight.dtype != torch.float32 or x.dtype != torch.float32:
        # changed since it was switched (a quantizer's tensor subclass, another dtype): PyTorch's own
        return torch.nn.functional.linear(x, weight, self.bias)
    return linear(x, weight, self.bias)


def layers(root: torch.nn.Module, *, skip: torch.nn.Module | None = None) -> Iterator[torch.nn.Linear]:
    """Plain fp32 CPU `nn.Linear` modules under `root` but `skip`."""
    for module in root.modules():
        if (type(module) is torch.nn.Linear and module is not skip and module.weight.dtype == torch.float32
                and module.weight.device.type == "cpu"):
            yield module


def use_onednn(root: torch.nn.Module, *, skip: torch.nn.Module | None = None) -> int:
    """Run every layer of `layers(root, skip=skip)` through oneDNN; returns how many."""
    count = 0
    for module in layers(root, skip=skip):
        module.forward = types.MethodType(_onednn_forward, module)
        count += 1
    return count


def runs_onednn(module: torch.nn.Module) -> bool:
    """Whether `use_onednn` switched this module (other instance-level forwards, such as the word
    table's on the output layer, are not its)."""
    return getattr(vars(module).get("forward"), "__func__", None) is _onednn_forward


def use_default(root: torch.nn.Module) -> int:
    """Undo `use_onednn` under `root`; returns how many layers went back to `linear`."""
    count = 0
    for module in root.modules():
        if runs_onednn(module):
            del module.forward
            count += 1
    return count


def probe(shapes: list[tuple[int, int]], *, rows: int = PROBE_ROWS, rounds: int = PROBE_ROUNDS) -> tuple[float, float]:
    """(oneDNN, `linear`) seconds for one pass over layers of these (out, in) shapes at `rows` rows,
    as a forward pass meets them (each weight read once per pass), best of `rounds`, the two kernels
    alternating. Raises ValueError if oneDNN's outputs are not `linear`'s to fp32 rounding."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.05 for shape in shapes]
    inputs = [torch.randn(rows, shape[1], generator=generator) for shape in shapes]
    kernels = {"onednn": linear, "default": torch.nn.functional.linear}
    best = dict.fromkeys(kernels, float("inf"))
    with torch.inference_mode():
        for x, w in zip(inputs, weights):
            want, got = torch.nn.functional.linear(x, w), linear(x, w)
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
                raise ValueError(f"oneDNN's linear differs from PyTorch's on a {tuple(w.shape)} layer "
                                 f"by {float((got - want).abs().max()):.3g}")
        for r in range(rounds):
            for name in (kernels if r % 2 == 0 else reversed(list(kernels))):
                started = time.perf_counter()
                for x, w in zip(inputs, weights):
                    kernels[name](x, w)
                best[name] = min(best[name], time.perf_counter() - started)
    return best["onednn"], best["default"]


def choose(root: torch.nn.Module, *, skip: torch.nn.Module | None = None) -> Choice:
    """Time oneDNN against `linear` on the layer shapes of `root` (but `skip`) and switch those
    layers to oneDNN where it is `FASTER`; logs and returns the outcome."""
    shapes = sorted({tuple(module.weight.shape) for module in layers(root, skip=skip)})
    if not shapes:
        return Choice(None, None, False, 0, "no fp32 CPU linear layer")
    if not available():
        choice = Choice(None, None, False, 0, "this PyTorch has no oneDNN linear")
    else:
        try:
            onednn_s, default_s = probe(shapes)
        except (RuntimeError, ValueError) as exc:  # an op this build lacks for these shapes, or a disagreement
            choice = Choice(None, None, False, 0, f"oneDNN probe failed: {exc}")
        else:
            used = default_s >= FASTER * onednn_s
            choice = Choice(onednn_s, default_s, used, use_onednn(root, skip=skip) if used else 0,
                            f"oneDNN {default_s / onednn_s:.2f}x PyTorch's linear on the model's layer shapes")
    log.info("linear layers: %s (%s)", f"oneDNN, {choice.layers} layers" if choice.used else "PyTorch's linear",
             choice.why)
    return choice
