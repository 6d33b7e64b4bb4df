"""The GPU benchmark: `python -m bench.gpu` on a machine with CUDA, one run, one JSON file.

    python -m bench.gpu                                  # the default model
    python -m bench.gpu --random-weights DIR             # DIR: config.json + tokenizer files only

What it measures, each figure against a ceiling or a peer measured in this same process:
- the card's two ceilings: device-to-device copy bandwidth (bytes read + written) and the bf16
  matrix rate on the model's own layer shapes;
- embedding: our engine, input-order batches of 32 (the naive baseline) and sentence-transformers
  `encode` (batch 32, mean pooling, bf16) on the same texts; tokens/s and the share of the
  compute floor (non-embedding FLOPs per token x tokens, plus attention, over the matrix rate);
- generation: our merged decoder against Hugging Face `generate` one prompt at a time, greedy;
  output tokens/s, and the floor set by reading every weight and the key/value cache once per
  decode step at the copy bandwidth (plus the prefill at the matrix rate);
- `--quantize int8` and `int4` (torchao, weight-only) against bf16: speed, weight bytes, agreement;
- cold start: a fresh process from spawn to a loaded and warmed engine (`bench.rss`), and what
  its first real embedding and generation calls still pay against the second;
- fresh inputs: texts and prompts never seen before (so passes of sizes not met before), timed on
  their first pass and again, with the engine's attention backends (cuDNN attention off) and with
  cuDNN attention back on, and which backend attention picks: what traffic of new inputs pays;
- the same engine on this machine's CPU cores (fp32), for the CPU vs GPU table;
- the GPU metrics `/metrics` exports (NVML), read once.

Peers and modes need their packages (sentence-transformers from the [bench] extra, torchao from
the [gpu] extra); a section whose package is missing is recorded as an error and the rest runs.

`--random-weights` builds the model from its config with random weights, for a machine that
cannot hold the real checkpoint: speed does not depend on the weights' values, but agreement
figures (greedy tokens, cosines) between two modes then say nothing about quality."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import attention_flops, chosen_sections, embed_texts, flops_per_token, machine, table, timed
from bench.embedding import cosine_min, linear_shapes, run_naive
from bench.generation import agreement, prompts, run_ours, time_stock_one_at_a_time
from worker.corpus import stdlib_docstrings
from worker.engine import Engine, build_engine
from worker.settings import Settings

log = logging.getLogger(__name__)
FULL = {"texts": 2000, "prompts": 64, "naive_every": 8, "cpu_texts": 300, "cpu_prompts": 16, "fresh_texts": 390,
        "fresh_prompts": 32}
QUICK = {"texts": 32, "prompts": 4, "naive_every": 4, "cpu_texts": 8, "cpu_prompts": 2, "fresh_texts": 8, "fresh_prompts": 2}
NEW_TOKENS = 64
SECTIONS = ("embedding", "embedding_batch_sweep", "generation", "fresh_inputs", "cold_start", "quantized",
            "gpu_metrics", "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], Any], repeats: int = 10) -> float:
    """Median wall time of `fn` after one warm-up, synchronising the device around each run."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def copy_bandwidth(device: torch.device, megabytes: int = 2048) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and bytes written."""
    a = torch.randn(megabytes * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / median_seconds(lambda: b.copy_(a))


def matrix_rate(engine: Engine, tokens: int) -> float:
    """FLOP/s of the model's linear layers (its own shapes and dtype) on `tokens` rows, random data."""
    dtype, device = engine.model.placement.dtype, engine.device
    shapes = linear_shapes(engine)
    weights = [torch.randn(o, i, dtype=dtype, device=device) for i, o in shapes]
    inputs = {i: torch.randn(tokens, i, dtype=dtype, device=device) for i, _ in shapes}

    def one_pass() -> None:
        for (i, _), w in zip(shapes, weights):
            torch.nn.functional.linear(inputs[i], w)

    with torch.inference_mode():
        return sum(2.0 * tokens * i * o for i, o in shapes) / median_seconds(one_pass, repeats=5)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the parameters occupy, quantized tensors counted by their packed storage."""
    total = 0
    for p in module.parameters():
        inner = [getattr(p, name) for name in getattr(p, "__tensor_flatten__", lambda: ([], None))()[0]]
        total += sum(t.numel() * t.element_size() for t in inner) if inner else p.numel() * p.element_size()
    return total


def random_model(config_dir: Path, into: Path) -> Path:
    """A checkpoint built from `config_dir`'s config.json with random weights (seeded), saved with
    the tokenizer files found beside it, so the loader reads it like any local model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    into.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(into)
    for f in config_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) and not (into / f.name).exists():
            shutil.copy(f, into / f.name)
    return into


def st_on_device(engine: Engine, path: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers before 6.1
        from sentence_transformers.models import Pooling, Transformer

    dtype = "bfloat16" if engine.model.placement.dtype == torch.bfloat16 else "float32"
    transformer = Transformer(str(path), max_seq_length=engine.max_input_tokens,
                              model_kwargs={"dtype": dtype, "attn_implementation": "sdpa"})
    return SentenceTransformer(modules=[transformer, Pooling(engine.width, "mean")], device=str(engine.device))


def warm_then_time(fn: Callable[[], Any], runs: int = 2) -> tuple[Any, float, list[float]]:
    """One untimed run over the whole input (a GPU pays for new shapes once: allocations, kernel
    choice), then `runs` timed ones; the value of the last run, the fastest time, and every time."""
    fn()
    times, value = [], None
    for _ in range(runs):
        done = timed(fn)
        value = done.value
        times.append(done.seconds)
    return value, min(times), times


def embedding(engine: Engine, path: Path, texts: list[str], rate: float) -> dict[str, Any]:
    tokenized = timed(lambda: engine.tokenize(texts, truncate=True, what="text"))
    lengths = [len(t.ids) for t in tokenized.value]
    tokens = sum(lengths)
    ours, ours_s, ours_runs = warm_then_time(lambda: engine.embed(texts, truncate=True).vectors)
    naive, naive_s, naive_runs = warm_then_time(lambda: run_naive(engine, texts))
    out: dict[str, Any] = {"texts": len(texts), "tokens": tokens, "token_budget": engine.token_budget,
                           "tokenize_seconds": tokenized.seconds,
                           "ours": {"seconds": ours_s, "runs": ours_runs},
                           "naive_batches_of_32": {"seconds": naive_s, "runs": naive_runs},
                           "cosine_min_vs_naive": cosine_min(ours, naive)}
    try:
        st = st_on_device(engine, path)
        peer, peer_s, peer_runs = warm_then_time(
            lambda: st.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False))
        out["sentence_transformers"] = {"seconds": peer_s, "runs": peer_runs}
        out["cosine_min_vs_sentence_transformers"] = cosine_min(ours, np.asarray(peer, dtype=np.float32))
        del st
    except Exception as exc:  # noqa: BLE001 - the peer missing or failing is recorded, ours still stands
        out["sentence_transformers"] = {"error": f"{type(exc).__name__}: {exc}"}
    for key in ("ours", "naive_batches_of_32", "sentence_transformers"):
        if "seconds" in out[key]:
            out[key]["tokens_per_s"] = tokens / out[key]["seconds"]
            out[key]["texts_per_s"] = len(texts) / out[key]["seconds"]
    flops = tokens * flops_per_token(engine) + attention_flops(engine, lengths)
    out["floor"] = {"flops": flops, "matrix_flops_per_s": rate, "seconds": flops / rate,
                    "fraction_reached": flops / rate / ours_s}
    return out


def compiled(engine: Engine, texts: list[str], eager_seconds: float) -> dict[str, Any]:
    """`--compile` on this card: compile time, then the same texts warm, against eager."""
    eager = engine.embed(texts, truncate=True).vectors
    compile_seconds = engine.compile_embedding()
    try:
        vectors, seconds, runs = warm_then_time(lambda: engine.embed(texts, truncate=True).vectors)
    finally:
        engine._compiled_forward = None
    return {"compile_seconds": compile_seconds, "seconds": seconds, "runs": runs,
            "speedup_vs_eager": eager_seconds / seconds, "cosine_min_vs_eager": cosine_min(vectors, eager)}


def decode_floor(engine: Engine, prompt_lengths: list[int], new_tokens: int, bandwidth: float, rate: float) -> float:
    """Seconds no engine can beat for this generation call: the prefill's FLOPs at the matrix rate,
    then per decode step every weight read once (the output layer included) plus each row's
    key/value cache so far (a sliding layer at most its window), at the copy bandwidth (half of
    the figure measured: the copy counts bytes read and written)."""
    config = engine.model.body.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(config.num_hidden_layers)
    kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    window = getattr(config, "sliding_window", None) or 10**9
    per_position = (2 * int(config.num_key_value_heads) * int(config.head_dim)
                    * torch.finfo(engine.model.placement.dtype).bits // 8)
    weights = weight_bytes(engine.model.lm)  # the tied output layer counted once, read every step
    prefill = (sum(prompt_lengths) * flops_per_token(engine) + attention_flops(engine, prompt_lengths)) / rate
    steps = 0.0
    for step in range(new_tokens):
        positions = sum(min(n + step, window) if kind == "sliding_attention" else n + step
                        for n in prompt_lengths for kind in kinds)
        steps += (weights + positions * per_position) / (bandwidth / 2)
    return prefill + steps


def batch_sweep(engine: Engine, texts: list[str], sizes: tuple[int, ...] = (64, 128, 256, 512),
                rounds: int = 5) -> list[dict[str, Any]]:
    """Embedding tokens/s for several row caps per pass (the token budget unchanged): whether the
    default cap of 64 rows leaves the card idle. Each cap is warmed once over the texts, then the
    caps take turns for `rounds` rounds (so drift on a shared card hits all alike) and each
    reports its median. The engine's own cap is restored afterwards."""
    items = engine.tokenize(texts, truncate=True, what="text")
    tokens, kept = sum(len(it.ids) for it in items), engine.max_batch_size
    times: dict[int, list[float]] = {size: [] for size in sizes}
    try:
        for size in sizes:
            engine.max_batch_size = size
            engine.embed_tokenized(items)
        for _ in range(rounds):
            for size in sizes:
                engine.max_batch_size = size
                times[size].append(timed(lambda: engine.embed_tokenized(items)).seconds)  # returns host arrays: synced
    finally:
        engine.max_batch_size = kept
    return [{"max_batch_size": size, "tokens_per_s": tokens / float(np.median(runs)), "runs": runs}
            for size, runs in times.items()]


def generation(engine: Engine, path: Path, items: list[Any], naive_every: int, bandwidth: float,
               rate: float) -> dict[str, Any]:
    (ours_tokens, _), ours_s, ours_runs = warm_then_time(lambda: run_ours(engine, items, NEW_TOKENS))
    subset = [items[i] for i in range(0, len(items), naive_every)]
    naive_tokens, naive_s = time_stock_one_at_a_time(engine, path, subset, NEW_TOKENS, warm=subset[:2],
                                                     warm_tokens=NEW_TOKENS)
    lengths = [len(i.ids) for i in items]
    produced = sum(map(len, ours_tokens))
    floor = decode_floor(engine, lengths, NEW_TOKENS, bandwidth, rate)
    blocks: dict[str, Any] = {"default": engine.decoder.vocab_block}
    kept = engine.decoder.vocab_block
    try:  # the greedy head in the CPU's 4,096-word blocks, against the default, on the same prompts
        engine.decoder.vocab_block = 4096
        (block_tokens, _), block_s, block_runs = warm_then_time(lambda: run_ours(engine, items, NEW_TOKENS))
        blocks.update(blocks_of_4096_seconds=block_s, runs=block_runs, default_speedup=block_s / ours_s,
                      identical=sum(a == b for a, b in zip(block_tokens, ours_tokens)))
    finally:
        engine.decoder.vocab_block = kept
    return {"prompts": len(items), "prompt_tokens": sum(lengths), "max_new_tokens": NEW_TOKENS,
            "greedy_head": blocks,
            "ours": {"tokens": produced, "seconds": ours_s, "runs": ours_runs, "tokens_per_s": produced / ours_s},
            "hf_one_at_a_time": {"prompts": len(subset), "tokens": sum(map(len, naive_tokens)), "seconds": naive_s,
                                 "model": "stock",
                                 "tokens_per_s": sum(map(len, naive_tokens)) / naive_s},
            "greedy_agreement": agreement(ours_tokens[::naive_every], naive_tokens),
            "floor": {"seconds": floor, "fraction_reached": floor / ours_s,
                      "weight_bytes": weight_bytes(engine.model.lm)},
            "tokens": ours_tokens}


def quantized(settings: Settings, base: Engine, texts: list[str], items: list[Any],
              base_vectors: np.ndarray, base_tokens: list[list[int]]) -> dict[str, Any]:
    out: dict[str, Any] = {"bf16": {"weight_bytes": weight_bytes(base.model.lm)}}
    for mode in ("int8", "int4"):
        try:
            engine = build_engine(Settings(model=settings.model, cache_dir=settings.cache_dir, quantize=mode))
            vectors, embed_s, _ = warm_then_time(lambda: engine.embed(texts, truncate=True).vectors, runs=1)
            (gen_tokens, _), gen_s, _ = warm_then_time(lambda: run_ours(engine, items, NEW_TOKENS), runs=1)
            out[mode] = {"weight_bytes": weight_bytes(engine.model.lm), "embed_seconds": embed_s,
                         "generate_seconds": gen_s, "generate_tokens": sum(map(len, gen_tokens)),
                         "cosine_min_vs_bf16": cosine_min(vectors, base_vectors),
                         "greedy_agreement_vs_bf16": agreement(gen_tokens, base_tokens)}
            del engine
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - one mode failing is recorded, the others still run
            out[mode] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=6)}
    return out


def on_cpu(settings: Settings, texts: list[str], n_prompts: int) -> dict[str, Any]:
    engine = build_engine(Settings(model=settings.model, cache_dir=settings.cache_dir, device="cpu"))
    tokens = sum(len(t.ids) for t in engine.tokenize(texts, truncate=True, what="text"))
    _, embed_s, _ = warm_then_time(lambda: engine.embed(texts, truncate=True), runs=1)
    items = prompts(engine, n_prompts)
    engine.generate_tokenized(items[:2], max_new_tokens=4)
    gen_tokens, gen_s = run_ours(engine, items, NEW_TOKENS)
    return {"threads": torch.get_num_threads(), "texts": len(texts), "tokens": tokens,
            "embed_tokens_per_s": tokens / embed_s, "prompts": len(items),
            "generate_tokens_per_s": sum(map(len, gen_tokens)) / gen_s}


def sdpa_choice(engine: Engine, rows: int = 8, width: int = 256) -> dict[str, str]:
    """The backend `scaled_dot_product_attention` picks on this card for an attention call of the
    model's heads and dtype: causal without a mask (full-attention layers, no padding) and with a
    boolean mask (sliding-window layers)."""
    config = engine.model.body.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    shape = (rows, int(config.num_attention_heads), width, int(config.head_dim))
    q = torch.randn(shape, dtype=engine.model.placement.dtype, device=engine.device)
    mask = torch.ones(width, width, dtype=torch.bool, device=engine.device).tril()
    names = {int(b): name for name, b in torch.nn.attention.SDPBackend.__members__.items()}
    return {"causal": names.get(int(torch._fused_sdp_choice(q, q, q, None, 0.0, True)), "?"),
            "masked": names.get(int(torch._fused_sdp_choice(q, q, q, mask, 0.0, False)), "?")}


def fresh_inputs(engine: Engine, n_texts: int, size: int, n_prompts: int) -> dict[str, Any]:
    """Inputs never seen by this process (texts after the bench's, prompts picked apart from its
    set), each set timed on its first pass and then again: real traffic brings new pass sizes all
    the time, and a backend that prepares per size pays on every one. Three rounds, each on its own
    new inputs (`size` texts, `n_prompts` prompts): the engine's attention backends (cuDNN
    attention off, `worker.model.device.attention_without_per_shape_plans`), cuDNN attention on
    (torch's own choice), the engine's again."""
    pool = stdlib_docstrings(min_chars=20, max_chars=2000)  # embed_texts(n) is its first n
    size = min(size, (len(pool) - n_texts) // 3)
    text_sets = [pool[n_texts + k * size: n_texts + (k + 1) * size] for k in range(3)]
    prompt_pool = prompts(engine, 3 * n_prompts)
    prompt_sets = [prompt_pool[k::3] for k in range(3)]
    kept = torch.backends.cuda.cudnn_sdp_enabled()
    rounds = []
    try:
        for (label, cudnn), texts, items in zip((("engine", kept), ("cudnn_attention_on", True),
                                                 ("engine_again", kept)), text_sets, prompt_sets):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            tokens = sum(len(t.ids) for t in engine.tokenize(texts, truncate=True, what="text"))
            embed = [timed(lambda: engine.embed(texts, truncate=True)).seconds for _ in range(2)]
            generate = [run_ours(engine, items, NEW_TOKENS)[1] for _ in range(2)]
            rounds.append({"attention": label, "sdpa_choice": sdpa_choice(engine), "texts": len(texts),
                           "tokens": tokens, "embed_first_s": embed[0], "embed_again_s": embed[1],
                           "prompts": len(items), "generate_first_s": generate[0], "generate_again_s": generate[1]})
    finally:
        torch.backends.cuda.enable_cudnn_sdp(kept)
    return {"rounds": rounds}


def cold_start(model: str, cache_dir: Path, texts: int, prompts: int, device: str = "cuda") -> dict[str, Any]:
    """Two fresh processes on this card (`python -m bench.rss --device cuda`): spawn to ready (imports,
    CUDA set-up, load, the service's warm-up), then the bench's texts embedded, or its prompts
    generated, three times: what the first real call still pays shows against the later ones."""
    from bench import rss

    return {work: rss.measure(None, work=work, texts=texts, prompts=prompts, model=model, cache_dir=cache_dir,
                              device=device, calls=3) for work in ("embed", "generate")}


def gpu_metrics() -> dict[str, Any]:
    from prometheus_client import generate_latest

    from worker.metrics import Metrics

    metrics = Metrics()
    watching = metrics.watch_gpus()
    lines = [line for line in generate_latest(metrics.registry).decode().splitlines()
             if line.startswith("gemma_gpu_")]
    return {"watching": watching, "lines": lines}


def section(results: dict[str, Any], name: str, fn: Callable[[], Any], save: Path | None = None) -> Any:
    """Run one part; a failure is recorded and the run goes on. The JSON is rewritten after each
    part, so a run stopped at its time limit keeps what it measured."""
    started = time.perf_counter()
    try:
        value = fn()
        results[name] = value
        return value
    except Exception as exc:  # noqa: BLE001 - a failed section is recorded and the run goes on
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=8)}
        log.error("section %s failed: %s", name, exc)
        return None
    finally:
        log.info("section %s: %.1f s", name, time.perf_counter() - started)
        if save is not None:
            save.write_text(json.dumps(results, indent=2, default=str))


def render(r: dict[str, Any]) -> str:
    lines = [f"GPU BENCHMARK on {r['device'].get('name')} ({r.get('weights')} weights)"]
    c = r.get("ceilings", {})
    if "bandwidth" in c:
        lines.append(f"  ceilings: copy {c['bandwidth'] / 1e12:.2f} TB/s (read+write); matrix "
                     f"{c['matrix_flops_per_s'] / 1e12:.0f} TFLOP/s on the model's shapes, "
                     f"{c['tokens']} rows ({r['device'].get('dtype')})")
    e = r.get("embedding", {})
    if "ours" in e:
        rows = [[k, e[k]["tokens_per_s"], e[k]["seconds"], f"{e[k]['seconds'] / e['ours']['seconds']:.2f}x"]
                for k in ("ours", "sentence_transformers", "naive_batches_of_32") if "seconds" in e.get(k, {})]
        lines += [f"EMBEDDING: {e['texts']} texts, {e['tokens']} tokens, budget {e['token_budget']}",
                  table(["contender", "tokens/s", "seconds", "ours is"], rows),
                  f"  floor {e['floor']['seconds'] * 1e3:.1f} ms: ours reaches {e['floor']['fraction_reached']:.1%}"]
    g = r.get("generation", {})
    if "ours" in g:
        rows = [[k, g[k]["tokens"], g[k]["seconds"], g[k]["tokens_per_s"]] for k in ("ours", "hf_one_at_a_time")]
        lines += [f"GENERATION: {g['prompts']} prompts, {g['max_new_tokens']} new tokens, greedy",
                  table(["contender", "tokens", "seconds", "tokens/s"], rows),
                  f"  ours {g['ours']['tokens_per_s'] / g['hf_one_at_a_time']['tokens_per_s']:.2f}x HF one at a time; "
                  f"floor {g['floor']['seconds'] * 1e3:.1f} ms, ours reaches {g['floor']['fraction_reached']:.1%}; "
                  f"greedy identical {g['greedy_agreement']['identical']}/{g['greedy_agreement']['of']}"]
        h = g.get("greedy_head", {})
        if "blocks_of_4096_seconds" in h:
            lines.append(f"  greedy head in one block of {h['default']} words: {h['default_speedup']:.2f}x blocks of 4,096 "
                         f"({h['blocks_of_4096_seconds']:.2f} s); identical {h['identical']}/{g['prompts']}")
    q = r.get("quantized", {})
    if q:
        base = {"embed_seconds": e.get("ours", {}).get("seconds", "-"), "generate_seconds": g.get("ours", {}).get("seconds", "-")}
        rows = [[m, v.get("weight_bytes", 0) / 2**20, v.get("embed_seconds", base["embed_seconds"] if m == "bf16" else "-"),
                 v.get("generate_seconds", base["generate_seconds"] if m == "bf16" else "-"),
                 v.get("error", "")[:60]] for m, v in q.items() if isinstance(v, dict)]
        lines += ["QUANTIZED (weight-only, torchao)", table(["mode", "weights MiB", "embed s", "generate s", "error"], rows)]
    cpu = r.get("cpu", {})
    if "embed_tokens_per_s" in cpu and "ours" in e and "ours" in g:
        lines += [f"CPU vs GPU (same machine, CPU fp32 on {cpu['threads']} threads)",
                  table(["work", "CPU tokens/s", "GPU tokens/s", "GPU is"],
                        [["embed", cpu["embed_tokens_per_s"], e["ours"]["tokens_per_s"],
                          f"{e['ours']['tokens_per_s'] / cpu['embed_tokens_per_s']:.1f}x"],
                         ["generate", cpu["generate_tokens_per_s"], g["ours"]["tokens_per_s"],
                          f"{g['ours']['tokens_per_s'] / cpu['generate_tokens_per_s']:.1f}x"]])]
    sweep = r.get("embedding_batch_sweep")
    if isinstance(sweep, list):
        lines += ["EMBEDDING ROWS PER PASS", table(["max batch size", "tokens/s"],
                                                   [[x["max_batch_size"], x["tokens_per_s"]] for x in sweep])]
    comp = r.get("compile", {})
    if "seconds" in comp:
        lines.append(f"COMPILE: {comp['compile_seconds']:.0f} s to compile; embedding {comp['seconds']:.2f} s, "
                     f"{comp['speedup_vs_eager']:.2f}x eager; cosine min {comp['cosine_min_vs_eager']:.5f}")
    fresh = r.get("fresh_inputs", {})
    if "rounds" in fresh:
        lines += ["FRESH INPUTS (never seen: first pass, then again)",
                  table(["attention", "picks (causal/masked)", "embed first s", "again s", "generate first s", "again s"],
                        [[x["attention"], f"{x['sdpa_choice']['causal']}/{x['sdpa_choice']['masked']}",
                          x["embed_first_s"], x["embed_again_s"], x["generate_first_s"], x["generate_again_s"]]
                         for x in fresh["rounds"]])]
    cold = r.get("cold_start", {})
    if cold and "error" not in cold:
        lines += ["COLD START (fresh process, spawn to loaded and warmed; then the work three times)",
                  table(["work", "spawn to ready s", "imports s", "build s", "warm-up s", "calls s"],
                        [[w, c["spawn_to_ready_s"], c.get("imports_s", "-"), c["build_s"], c["warm_up_s"],
                          " / ".join(f"{t:.2f}" for t in c.get("calls_s") or [c["first_call_s"], c["second_call_s"]])]
                         for w, c in cold.items()])]
    m = r.get("gpu_metrics", {})
    if m:
        lines.append("METRICS: " + ("; ".join(m.get("lines", [])) or str(m)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-weights", type=Path, metavar="DIR",
                        help="build the model from DIR/config.json with random weights (tokenizer files beside it)")
    parser.add_argument("--model", default=None, help="model source (default: the embedded Gemma 3 270M)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a claim")
    parser.add_argument("--no-cpu", action="store_true", help="leave out the CPU comparison")
    parser.add_argument("--no-quantize", action="store_true", help="leave out int8/int4")
    parser.add_argument("--compile", action="store_true", help="also time --compile against eager (last; minutes)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (the ceilings always run; "
                             "quantized needs embedding and generation)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        wanted = set(chosen_sections(args.sections, SECTIONS))
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sizes = QUICK if args.quick else FULL
    out = args.json or Path(__file__).parent / "results" / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    results: dict[str, Any] = {"machine": machine(), "sizes": sizes, "weights": "real"}
    try:
        model = args.model
        if args.random_weights is not None:
            model = str(random_model(args.random_weights, work / "model"))
            results["weights"] = "random (speed only: agreement figures say nothing about quality)"
        settings = Settings(model=model, cache_dir=work / "cache") if model else Settings()
        engine = build_engine(settings)
        path = Path(model) if model else None
        results["device"] = {"name": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
                             "dtype": str(engine.model.placement.dtype), "torch": torch.__version__,
                             "cuda": torch.version.cuda, "load_seconds": engine.model.load_seconds}
        texts = embed_texts(sizes["texts"])
        tokens_per_pass = 16384 if engine.device.type == "cuda" else 1024
        ceilings = section(results, "ceilings", lambda: {
            "bandwidth": copy_bandwidth(engine.device, 2048 if engine.device.type == "cuda" else 256),
            "matrix_flops_per_s": matrix_rate(engine, tokens_per_pass), "tokens": tokens_per_pass}) or {}
        rate, bandwidth = ceilings.get("matrix_flops_per_s", float("nan")), ceilings.get("bandwidth", float("nan"))
        if path is None:
            from worker.model.source import prepare_model

            path = prepare_model(settings.model, settings.cache_dir).path
        emb = gen = None
        if "embedding" in wanted:
            emb = section(results, "embedding", lambda: embedding(engine, path, texts, rate), out)
        if "embedding_batch_sweep" in wanted:
            section(results, "embedding_batch_sweep", lambda: batch_sweep(engine, texts), out)
        items = prompts(engine, sizes["prompts"])
        if "generation" in wanted:
            gen = section(results, "generation",
                          lambda: generation(engine, path, items, sizes["naive_every"], bandwidth, rate), out)
        if engine.device.type == "cuda":
            results["device"]["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        base_tokens = gen.pop("tokens") if gen else None
        if "fresh_inputs" in wanted:
            section(results, "fresh_inputs", lambda: fresh_inputs(engine, sizes["texts"], sizes["fresh_texts"],
                                                                  sizes["fresh_prompts"]), out)
        if "cold_start" in wanted and engine.device.type == "cuda":
            section(results, "cold_start", lambda: cold_start(str(path), settings.cache_dir,
                                                              sizes["texts"], sizes["prompts"]), out)
        if "quantized" in wanted and not args.no_quantize and engine.device.type == "cuda" and emb and gen:
            vectors = engine.embed(texts, truncate=True).vectors
            section(results, "quantized",
                    lambda: quantized(settings, engine, texts, items, vectors, base_tokens), out)
        if "gpu_metrics" in wanted:
            section(results, "gpu_metrics", gpu_metrics, out)
        if "cpu" in wanted and not args.no_cpu:
            section(results, "cpu", lambda: on_cpu(settings, texts[: sizes["cpu_texts"]], sizes["cpu_prompts"]), out)
        if args.compile and engine.device.type == "cuda" and emb:
            section(results, "compile", lambda: compiled(engine, texts, emb["ours"]["seconds"]), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        out.write_text(json.dumps(results, indent=2, default=str))
        print(f"results: {out}")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
