"""CPU int4 (`--quantize int4` on CPU, lossy): every linear layer of a causal model, the output
layer included, as 4-bit weights in groups of 32 along the input with one bf16 scale and offset per
group, run by PyTorch's own CPU kernel (`aten._weight_int4pack_mm_for_cpu`). Activations enter the
kernel in bf16 and its bf16 output goes back to the model's dtype, so the residual stream, norms and
attention stay fp32. The kernel reads an eighth of the fp32 weight bytes and, on the AVX2 CPU
measured, runs the model's layer shapes 1.5x (1,024 rows) to 4x (32 rows at the output layer)
faster than fp32 `linear` (docs/PERFORMANCE.md gives the figures and the quality cost).

A group whose values lie on a 16-level grid reaching both ends comes back exactly (up to the bf16
rounding of its scale and offset). The embedded checkpoint's weights mostly do not: its Q5_0, Q6_K
and Q8_0 tensors have more levels than 4 bits hold, and its Q4_K blocks seldom use both ends, so
the weights carry 3.6-8.1% relative error after the least-squares refits (measured on layers 3-4
and the output layer). The fp32 checkpoint pages read to quantize are released afterwards
(`release_file_pages`): a process on int4 peaks at 2.17 GB RSS generating the bench's 64 prompts,
against 2.68 GB in fp32 (`python -m bench.rss [--quantize int4]`, docs/PERFORMANCE.md)."""
from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import time
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

GROUP = 32
LEVELS = 15  # 4 bits: 0..15
MIDPOINT = 8  # the kernel computes (q - 8) * scale + offset
REFITS = 2  # least-squares passes after the first rounding (see quantize_groups)
CHUNK_ROWS = 16384  # quantize and pack the output layer's 262,144 rows this many at a time
PACK_ROWS = 64  # the CPU packing interleaves rows in blocks of 64: chunks must be a multiple of it


def supported(linear: torch.nn.Linear) -> bool:
    """Whether the kernel takes this layer's shape (input a multiple of the group, output of 16)."""
    out_features, in_features = linear.weight.shape
    return in_features % GROUP == 0 and out_features % 16 == 0


def quantize_groups(weight: torch.Tensor, *, refits: int = REFITS) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes (int32, [out, in]) and bf16 scales and offsets ([in / 32, out, 2]) such that
    `(code - 8) * scale + offset` approximates `weight`: each group starts from its own minimum to
    maximum, then `refits` times takes the least-squares scale and offset for its codes and re-rounds."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = (high - low) / LEVELS
    offset = low + MIDPOINT * scale
    sum_w = groups.sum(-1)
    codes = torch.empty_like(groups)
    for attempt in range(refits + 1):
        scale = scale.to(torch.bfloat16).float()
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))  # a constant group: every code 8
        offset = offset.to(torch.bfloat16).float()
        torch.sub(groups, offset[..., None], out=codes)
        codes.div_(scale[..., None]).round_().clamp_(-MIDPOINT, LEVELS - MIDPOINT)
        if attempt == refits:
            break
        # least squares over the group: minimise sum((scale * c + offset - w)^2) for these codes c
        sum_c = codes.sum(-1)
        sum_cc, sum_cw = torch.linalg.vecdot(codes, codes), torch.linalg.vecdot(codes, groups)
        det = GROUP * sum_cc - sum_c * sum_c
        ok = det > 0
        fitted = (GROUP * sum_cw - sum_c * sum_w) / torch.where(ok, det, torch.ones_like(det))
        scale = torch.where(ok, fitted, scale)
        offset = torch.where(ok, (sum_w - scale * sum_c) / GROUP, offset)
    scales_offsets = torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return codes.add_(MIDPOINT).reshape(out_features, in_features).to(torch.int32), scales_offsets


def dequantize(codes: torch.Tensor, scales_offsets: torch.Tensor) -> torch.Tensor:
    """The fp32 weights the kernel multiplies by (for checks and tests)."""
    out_features, in_features = codes.shape
    so = scales_offsets.float().transpose(0, 1)  # [out, groups, 2]
    groups = codes.float().reshape(out_features, in_features // GROUP, GROUP)
    return ((groups - MIDPOINT) * so[..., 0:1] + so[..., 1:2]).reshape(out_features, in_features)


class Int4Linear(torch.nn.Module):
    """A linear layer on packed 4-bit weights (see the module docstring). Not an `nn.Linear`, so code
    that reads `.weight` directly (the decoder's blockwise greedy head) takes the module's output instead."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        if linear.weight.device.type != "cpu":
            raise ValueError("Int4Linear runs on CPU only")
        self.out_features, self.in_features = linear.weight.shape
        packed, scales_offsets = [], []
        chunk = max(PACK_ROWS, CHUNK_ROWS // PACK_ROWS * PACK_ROWS)
        with torch.no_grad():
            for start in range(0, self.out_features, chunk):
                codes, so = quantize_groups(linear.weight[start: start + chunk])
                packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
                scales_offsets.append(so)
        self.register_buffer("packed", torch.cat(packed))
        self.register_buffer("scales_offsets", torch.cat(scales_offsets, dim=1))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_offsets)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}"


def kernel_against_fp32(*, rows: int = 256, shape: tuple[int, int] = (2048, 640), rounds: int = 3,
                        make: Any = None) -> tuple[float, float]:
    """Seconds (best of `rounds`) a cheaper layer (`make(linear)`, by default the int4 kernel's
    `Int4Linear`) and fp32 `linear` take for one layer of the given (out, in) shape over `rows` rows:
    which is faster depends on the CPU. On the AVX2 machine of docs/PERFORMANCE.md the int4 kernel
    won on every layer shape; on an AVX-512/AMX machine it took 5.7 ms against 3.1 ms at these defaults."""
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(shape, generator=generator) * 0.05)
    quantized = (make or Int4Linear)(layer)
    x = torch.randn(rows, shape[1], generator=generator)

    def best(run: Any) -> float:
        run()
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times)

    with torch.inference_mode():
        return best(lambda: quantized(x)), best(lambda: torch.nn.functional.linear(x, layer.weight))


def slower_than_fp32_warning(kernel_s: float, fp32_s: float, *, mode: str = "int4", kernel: str = "its kernel",
                             why: str = "") -> str | None:
    """What to tell a user whose CPU runs a lossy mode's kernel (by default int4's) no faster than
    fp32 (None otherwise); `why` adds a reason after the figures."""
    if kernel_s < fp32_s:
        return None
    return (f"--quantize {mode} is lossy and, on this CPU, no faster: {kernel} took {kernel_s * 1000:.1f} ms for a "
            f"256-row layer that fp32 ran in {fp32_s * 1000:.1f} ms{why}, so the exact engine is likely faster here "
            "(docs/PERFORMANCE.md)")


def quantize_model(root: torch.nn.Module) -> int:
    """Replace every supported `nn.Linear` under `root` (the output layer included) with an
    `Int4Linear`; returns how many were replaced. Layers the kernel cannot take stay as they are.
    Each fp32 weight read from the memory-mapped checkpoint has its pages released once quantized
    (`release_file_pages`), so quantizing does not leave the whole checkpoint resident."""
    return replace_linears(root, lambda module: isinstance(module, torch.nn.Linear) and supported(module), Int4Linear)


def replace_linears(root: torch.nn.Module, select: Any, make: Any) -> int:
    """Replace every module under `root` that `select(module)` picks with `make(module)`, releasing
    the replaced weight's checkpoint pages (`release_file_pages`); returns how many were replaced."""
    targets = [(name, module) for name, module in root.named_modules() if select(module)]
    mapped = file_ranges()
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, make(module))
        release_file_pages(module.weight, mapped)
    return len(targets)


@functools.cache
def _madvise() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def file_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's file mappings (Linux `/proc/self/maps`; empty elsewhere).
    transformers maps the safetensors checkpoint privately and points the weights into it."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/"):
                    low, high = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((low, high))
    except OSError:
        pass
    return ranges


def _untouched_file_pages(first: int, last: int) -> bool:
    """Whether every page of [first, last) that is resident or swapped is still the file's own page
    (`/proc/self/pagemap` bit 61), none a private copy made by a write."""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first // page * 8)
            entries = np.frombuffer(pagemap.read((last - first) // page * 8), dtype=np.uint64)
    except OSError:
        return False
    if entries.size != (last - first) // page:
        return False
    used = (entries >> np.uint64(62)) != 0  # bit 63 present, bit 62 swapped
    file_page = ((entries >> np.uint64(61)) & np.uint64(1)) == 1
    return bool(np.all(file_page | ~used))


def release_file_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]], *, whole_storage: bool = True) -> bool:
    """Drop this process's resident pages of a tensor that lies in a file mapping
    (`madvise(MADV_DONTNEED)`), when none of them was ever written: such pages are the file's own
    bytes, so a later read faults them back in unchanged (the tied input embedding keeps working);
    nothing is lost but resident memory. Memory the process owns, a page it wrote, or a platform
    without madvise is left alone. `whole_storage=False`: only the pages under this (contiguous)
    tensor's own elements, not its whole storage. Returns whether pages were released."""
    if whole_storage:
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    else:
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in mapped) or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if last <= first or not _untouched_file_pages(first, last):
        return False
    if _madvise()(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED) != 0:
        log.debug("madvise failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True
