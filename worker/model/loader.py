"""Load a prepared checkpoint onto the chosen device, from safetensors only."""
from __future__ import annotations

import ctypes
import json
import logging
import time
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from worker.model import onednn
from worker.model.device import Placement, attention_without_per_shape_plans, choose_placement
from worker.model.source import MARKER, ModelSourceError, PreparedModel, prepare_model
from worker.settings import QUANTIZE_MODES, Settings

log = logging.getLogger(__name__)
onednn.bound_caches()  # before oneDNN first runs in this process (worker/model/onednn.py)


@dataclass(frozen=True)
class LoadedModel:
    """The model, split into the transformer body (for embeddings) and the causal LM (for generation)."""

    name: str
    body: torch.nn.Module
    lm: Any | None  # None for embedding-only checkpoints
    tokenizer: Any
    placement: Placement
    max_positions: int
    hidden_size: int
    load_seconds: float
    table: Any | None = None  # the word table as exact int8 blocks (worker/model/table.py), CPU fp32 only
    linear: onednn.Choice | None = None  # whether the body's linear layers run through oneDNN (CPU fp32)


def load_model(prepared: PreparedModel, placement: Placement) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    # The tokenizer classes are imported here, not first on the tokenizer's thread, so that thread
    # imports nothing while this one imports the model's code.
    from transformers import AutoTokenizer  # noqa: F401
    from transformers.tokenization_utils_tokenizers import TokenizersBackend  # noqa: F401

    started = time.monotonic()
    config = AutoConfig.from_pretrained(prepared.path)
    text_config = config.get_text_config()
    is_causal = any(a.endswith("ForCausalLM") or a.endswith("ForConditionalGeneration") for a in (config.architectures or []))
    kwargs = dict(dtype=placement.dtype, use_safetensors=True, attn_implementation="sdpa")
    # The tokenizer's file parse (Rust, mostly outside the GIL) runs beside the model's build
    # (imports of the model's code, then the checkpoint mapped in).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer") as pool:
        pending = pool.submit(load_tokenizer, prepared.path)
        try:
            if is_causal:
                lm = AutoModelForCausalLM.from_pretrained(prepared.path, **kwargs).to(placement.device).eval()
                body = lm.get_decoder()
            else:
                lm = None
                body = AutoModel.from_pretrained(prepared.path, **kwargs).to(placement.device).eval()
            tokenizer = pending.result()
        except OSError as exc:
            raise ModelSourceError(f"cannot load {prepared.path}: {exc}") from exc
    release_free_heap()  # the parsers' freed memory, before the work's allocations land on top of it
    fuse_norms(lm if lm is not None else body)
    if placement.device.type == "cpu":  # measured and tested on CPU only (worker/model/attention.py)
        from worker.model.attention import use_packed_attention

        use_packed_attention(lm if lm is not None else body)
    tokenizer.padding_side = "left"  # generation appends on the right, so pads go left
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        name=prepared.name,
        body=body,
        lm=lm,
        tokenizer=tokenizer,
        placement=placement,
        max_positions=int(getattr(text_config, "max_position_embeddings", 8192)),
        hidden_size=int(text_config.hidden_size),
        load_seconds=time.monotonic() - started,
    )


# Special-token settings a converted checkpoint's tokenizer_config.json carries (see `load_tokenizer`).
_TOKENIZER_SETTINGS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "model_max_length")


def load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer. A directory this project converted from GGUF (it has the
    `prepared.json` marker) holds the tokenizer.json that transformers' own GemmaTokenizer saved,
    so the tokenizer is built straight from that file: the same Rust tokenizer, ids and special
    tokens as `AutoTokenizer` gives (tests/worker/model/test_loader.py compares them), in about
    half the time, since AutoTokenizer also parses the 33 MB file in Python and rebuilds the
    vocabulary from it. Any other directory loads through `AutoTokenizer`."""
    from transformers import AutoTokenizer

    settings = _direct_tokenizer_settings(path)
    if settings is None:
        return AutoTokenizer.from_pretrained(path)
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TokenizersBackend(tokenizer_file=str(path / "tokenizer.json"), name_or_path=str(path), **settings)


def _direct_tokenizer_settings(path: Path) -> dict[str, Any] | None:
    """The settings to build a converted checkpoint's tokenizer from its file with, or None where
    the directory is not such a checkpoint (or carries anything the direct build would leave out)."""
    if not (path / MARKER).is_file() or not (path / "tokenizer.json").is_file() or any(path.glob("chat_template*")):
        return None
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("tokenizer_class") != "GemmaTokenizer" or "chat_template" in config:
        return None
    return {key: config[key] for key in _TOKENIZER_SETTINGS if key in config}


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`; elsewhere nothing).
    Reading a tokenizer.json parses it whole (33 MB of JSON for Gemma 3's 262,144 words): the parse
    leaves about 200 MB freed but still resident in the heap, which later allocations would
    otherwise pin. Returns whether anything was given back."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _fused_gemma_rms_norm(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm (normalise in fp32, scale by 1 + weight) as one `rms_norm` kernel."""
    return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).type_as(x)


def fuse_norms(root: torch.nn.Module) -> int:
    """Run every Gemma RMSNorm through PyTorch's fused `rms_norm` instead of its five separate
    element-wise passes (same arithmetic, same fp32 accumulation; about 2% of an embedding pass on
    CPU in a development timing, docs/PERFORMANCE.md). Returns how many norms it changed; other models are left as they are."""
    count = 0
    for module in root.modules():
        if type(module).__name__ in ("Gemma3RMSNorm", "Gemma2RMSNorm", "GemmaRMSNorm") and hasattr(module, "eps"):
            module.forward = types.MethodType(_fused_gemma_rms_norm, module)
            count += 1
    return count


def quantize(loaded: LoadedModel, mode: str) -> LoadedModel:
    """A lossy mode asked for by name (`int8`, `int4` or `bf16`). On CUDA, weight-only quantization
    of the body's linear layers through torchao (int8 per row; int4 in groups of 128 on the tinygemm
    kernel), so a larger Gemma fits the card with room for batches; the output layer, tied to the
    input embedding, stays in the model's dtype. On CPU, `int8` is PyTorch's dynamic quantization
    (`quantize_int8`), `int4` PyTorch's own int4 CPU kernel over every linear layer, the output
    layer included (`quantize_int4_cpu`), and `bf16` the body's linear layers on bf16 weights
    (`quantize_bf16_cpu`)."""
    if mode not in QUANTIZE_MODES:
        raise ModelSourceError(f"quantize must be int8, int4 or bf16, got {mode!r}")
    if mode == "bf16":
        return quantize_bf16_cpu(loaded)
    if loaded.placement.device.type == "cuda":
        return quantize_weight_only(loaded, mode)
    if mode == "int4":
        return quantize_int4_cpu(loaded)
    return quantize_int8(loaded)


def quantize_bf16_cpu(loaded: LoadedModel) -> LoadedModel:
    """CPU bf16 (`worker/model/bf16.py`): the body's linear layers on bf16 weights, activations
    rounded to bf16 on the way in and back to fp32 on the way out; the output layer stays fp32 (so
    the greedy head's screens and word table apply as in fp32). Warns where this CPU multiplies bf16
    no faster than fp32."""
    if loaded.placement.device.type != "cpu":
        raise ModelSourceError(f"quantize=bf16 is for CPU: on {loaded.placement.device} the model already runs in "
                               f"{str(loaded.placement.dtype).removeprefix('torch.')}")
    from worker.model import bf16, int4

    warning = bf16.slower_than_fp32_warning(*int4.kernel_against_fp32(make=bf16.Bf16Linear))
    if warning:
        log.warning(warning)
    root, head = _root_and_head(loaded)
    if bf16.quantize_model(root, skip=head) == 0:
        raise ModelSourceError(f"quantize=bf16: {loaded.name} has no fp32 linear layer in its body")
    return replace(loaded, name=f"{loaded.name}+bf16")


def quantize_int4_cpu(loaded: LoadedModel) -> LoadedModel:
    """CPU int4 (`worker/model/int4.py`): 4-bit weights in groups of 32, activations through the
    kernel in bf16. The fp32 weights of the replaced layers are freed; the input embedding stays
    fp32 (a lookup reads one row per token), while the output layer tied to it gets its own int4 copy."""
    if loaded.placement.device.type != "cpu":
        raise ModelSourceError(f"the int4 CPU kernel runs on CPU only (this model is on {loaded.placement.device})")
    from worker.model import int4

    warning = int4.slower_than_fp32_warning(*int4.kernel_against_fp32())
    if warning:
        log.warning(warning)
    root, _head = _root_and_head(loaded)
    replaced = int4.quantize_model(root)
    if replaced == 0:
        raise ModelSourceError(f"quantize=int4: no linear layer of {loaded.name} has a shape the int4 kernel takes")
    return replace(loaded, name=f"{loaded.name}+int4")


def quantize_int8(loaded: LoadedModel) -> LoadedModel:
    """CPU int8: the body's linear layers with per-channel weight scales and activations quantized
    per call (PyTorch's dynamic quantization, CPU kernels). About 3x faster on the CPUs measured
    and clearly less exact: docs/PERFORMANCE.md gives the cost (embedding cosine, greedy agreement)."""
    if loaded.placement.device.type != "cpu":
        raise ModelSourceError(f"dynamic int8 runs on CPU only (this model is on {loaded.placement.device})")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    root, head = _root_and_head(loaded)
    spec = {name: per_channel_dynamic_qconfig for name, module in root.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated upstream in favour of torchao
        quantize_dynamic(root, spec, dtype=torch.qint8, inplace=True)
    return replace(loaded, name=f"{loaded.name}+int8")


def quantize_weight_only(loaded: LoadedModel, mode: str) -> LoadedModel:
    """torchao weight-only quantization of the body's linear layers, activations kept in the
    model's dtype: `int8` per output row (any device), `int4` in groups of 128 packed for the
    tinygemm CUDA kernel (bf16 only). Layers whose shape the mode cannot take are left as they are."""
    if mode not in ("int8", "int4"):
        raise ModelSourceError(f"quantize must be int8 or int4, got {mode!r}")
    if mode == "int4" and loaded.placement.dtype != torch.bfloat16:
        raise ModelSourceError(f"quantize=int4 needs bf16 weights (tinygemm); this model is {loaded.placement.dtype}")
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ModelSourceError(f"quantize={mode} on {loaded.placement.device} needs torchao: "
                               "pip install 'gemma-batch[gpu]' (the GPU image has it)") from exc
    config: Any = (Int8WeightOnlyConfig(version=2, set_inductor_config=False) if mode == "int8" else
                   Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                        set_inductor_config=False))
    root, head = _root_and_head(loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(root, config, filter_fn=lambda module, _name: isinstance(module, torch.nn.Linear) and module is not head)
    return replace(loaded, name=f"{loaded.name}+{mode}")


def _root_and_head(loaded: LoadedModel) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    root = loaded.lm if loaded.lm is not None else loaded.body
    return root, (root.get_output_embeddings() if loaded.lm is not None else None)


def load_from_settings(settings: Settings) -> LoadedModel:
    """Prepare (convert or download once) and load the model the settings name."""
    prepared = prepare_model(settings.model, settings.cache_dir)
    placement = choose_placement(settings.device)
    attention_without_per_shape_plans(placement)
    loaded = load_model(prepared, placement)
    if settings.quantize is not None:
        loaded = quantize(loaded, settings.quantize)
    # the word table as int8 blocks where the output layer is still a tied fp32 one (`install` checks:
    # dynamic int8 leaves it so, the CPU int4 mode replaces it)
    if loaded.lm is not None and placement.device.type == "cpu" and placement.dtype == torch.float32:
        from worker.model import table

        cache = settings.cache_dir.expanduser() / "tables" / f"{table.checkpoint_key(prepared.path)}.safetensors"
        loaded = replace(loaded, table=table.install(loaded.lm, cache))
    if settings.onednn and placement.device.type == "cpu" and placement.dtype == torch.float32:
        root, head = _root_and_head(loaded)
        loaded = replace(loaded, linear=onednn.choose(root, skip=head))
    log.info("model %s loaded on %s (%s) in %.1fs", loaded.name, placement.device, placement.dtype, loaded.load_seconds)
    return loaded
