"""Re-embedding throughput measured on this machine, and a projection (not a measurement) for
1,000,000 nodes on N Cloud Run L4 tasks.

    python -m bench.reembed                 # 10,000 nodes of standard-library docstrings
    python -m bench.reembed --nodes 500     # a quicker run

Measured here, in one process, one after another: reading and validating the node file; the raw
engine over the same texts (the baseline); the job's full path (one task: shard, chunks,
checkpoints, Parquet); an incremental re-run with 10% of texts changed. The L4 projection is
arithmetic on stated assumptions, printed with them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import flops_per_token
from jobs.nodes import read_nodes
from jobs.reembed import JobConfig, TaskEnv, run_task
from worker.corpus import stdlib_docstrings
from worker.engine import Engine, build_engine
from worker.settings import Settings

# Assumptions for the projection. None of these was measured on an L4.
L4_BF16_DENSE_TFLOPS = 121.0  # NVIDIA L4 datasheet: 242 TFLOPS bf16 "with sparsity", i.e. 121 dense
L4_UTILISATION = 0.25  # assumed share of that peak a small encoder pass reaches (short rows, padding, launches)
L4_UTILISATION_LOW = 0.10  # a pessimistic case, printed beside the assumed one
TASK_START_S = 60.0  # assumed: container start (~5 s per Cloud Run GPU docs) + model download and load
GCS_MB_S = 100.0  # assumed Cloud Storage read/write rate of one task, MB/s


def node_texts(n: int, *, max_chars: int) -> list[str]:
    """n real texts: standard-library docstrings, cycled with a marker when n exceeds the unique ones."""
    unique = stdlib_docstrings(max_chars=max_chars)
    return [unique[i % len(unique)] + ("" if i < len(unique) else f" [{i // len(unique)}]") for i in range(n)]


def _timed(fn: Any) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def measure(n: int, *, max_chars: int, chunk_rows: int, changed: float) -> dict[str, Any]:
    started = time.monotonic()
    engine = build_engine(Settings(device="cpu"))
    load_s = time.monotonic() - started
    texts = node_texts(n, max_chars=max_chars)
    tokens = sum(len(t.ids) for t in engine.tokenize(texts, truncate=True, what="text"))
    with tempfile.TemporaryDirectory(prefix="bench-reembed-") as tmp:
        src, out = Path(tmp) / "nodes.jsonl", Path(tmp) / "out"
        src.write_text("".join(json.dumps({"id": f"n{i:07d}", "text": t}) + "\n" for i, t in enumerate(texts)))
        t0 = time.monotonic()
        read_nodes(str(src))
        read_s = time.monotonic() - t0
        baseline_s = [_timed(lambda: engine.embed(texts, truncate=True))]
        t0 = time.monotonic()
        run_task(JobConfig(nodes=str(src), out=str(out), run_id="full", previous="none", chunk_rows=chunk_rows),
                 TaskEnv(), engine_factory=lambda: engine)
        job_s = time.monotonic() - t0
        input_bytes, output_bytes = src.stat().st_size, (out / "full" / "part-00000.parquet").stat().st_size
        step = max(1, round(1 / changed))
        src.write_text("".join(json.dumps({"id": f"n{i:07d}", "text": t + (" (edited)" if i % step == 0 else "")})
                               + "\n" for i, t in enumerate(texts)))
        t0 = time.monotonic()
        summary = run_task(JobConfig(nodes=str(src), out=str(out), run_id="incremental", chunk_rows=chunk_rows),
                           TaskEnv(), engine_factory=lambda: engine)
        incremental_s = time.monotonic() - t0
        # A second baseline after the job: on a shared machine load drifts, so the job sits between two.
        baseline_s.append(_timed(lambda: engine.embed(texts, truncate=True)))
    return {"nodes": n, "tokens": tokens, "model": engine.name, "model_load_s": load_s, "read_s": read_s,
            "load_average": os.getloadavg(), "baseline_runs_s": baseline_s, "baseline_s": sum(baseline_s) / 2,
            "job_s": job_s, "incremental_s": incremental_s, "input_bytes": input_bytes, "output_bytes": output_bytes,
            "incremental_embedded": summary.embedded, "incremental_reused": summary.reused,
            "flops_per_token": flops_per_token(engine)}


def project(m: dict[str, Any], *, total: int, tasks: list[int], changed: float) -> dict[str, Any]:
    """Wall time for `total` nodes on N L4 tasks, from this run's per-node figures and the assumptions above."""
    tokens_per_node = m["tokens"] / m["nodes"]
    cpu_tokens_s = m["tokens"] / m["baseline_s"]
    # Every task reads every node (shards are hashes of ids); parsing is single-threaded Python, so
    # this machine's per-node parse time is taken as the Cloud Run CPU's.
    read_s = m["read_s"] / m["nodes"] * total + m["input_bytes"] / m["nodes"] * total / (GCS_MB_S * 1e6)
    # Job overhead beyond the raw engine (chunks, Parquet, checkpoints), as measured here.
    overhead = max(m["job_s"] / m["baseline_s"], 1.0)
    out_bytes_per_node = m["output_bytes"] / m["nodes"]
    rows = []
    for n in tasks:
        shard = math.ceil(total / n)
        # chunks written, read back and joined into the part; a nightly run also reads its previous part
        io_s = 3 * shard * out_bytes_per_node / (GCS_MB_S * 1e6)
        row: dict[str, Any] = {"tasks": n}
        for label, share in (("", L4_UTILISATION), ("_low", L4_UTILISATION_LOW)):
            embed_s = shard * tokens_per_node / (L4_BF16_DENSE_TFLOPS * 1e12 * share / m["flops_per_token"]) * overhead
            row[f"full_s{label}"] = round(TASK_START_S + read_s + io_s + embed_s)
            row[f"nightly_s{label}"] = round(TASK_START_S + read_s + io_s * 4 / 3 + embed_s * changed)
        rows.append(row)
    l4_tokens_s = L4_BF16_DENSE_TFLOPS * 1e12 * L4_UTILISATION / m["flops_per_token"]
    return {"total_nodes": total, "tokens_per_node": round(tokens_per_node, 1), "l4_tokens_per_s": round(l4_tokens_s),
            "cpu_tokens_per_s": round(cpu_tokens_s), "assumed_speedup_vs_this_cpu": round(l4_tokens_s / cpu_tokens_s),
            "read_s_per_task": round(read_s), "rows": rows}


def report(m: dict[str, Any], p: dict[str, Any], *, changed: float) -> str:
    rate = m["nodes"] / m["job_s"]
    lines = [
        f"measured on this machine (CPU, fp32), {m['nodes']} nodes of stdlib docstrings, model {m['model']}, "
        f"{p['tokens_per_node']} tokens/node:",
        f"  (load average {', '.join(f'{x:.1f}' for x in m['load_average'])} on {os.cpu_count()} cores at the end;"
        " other work shares this machine, so rates vary from run to run)",
        f"  model load              {m['model_load_s']:8.1f} s",
        f"  read + validate nodes   {m['nodes'] / m['read_s']:8.0f} nodes/s",
        f"  engine alone (baseline) {m['nodes'] / m['baseline_s']:8.1f} nodes/s  ({p['cpu_tokens_per_s']} tokens/s; "
        f"mean of {' and '.join(f'{x:.1f}' for x in m['baseline_runs_s'])} s, before and after the job)",
        f"  job, full run           {rate:8.1f} nodes/s  ({m['job_s'] / m['baseline_s']:.2f}x the baseline's time)",
        f"  job, {changed:.0%} changed       {m['nodes'] / m['incremental_s']:8.1f} nodes/s  "
        f"(embedded {m['incremental_embedded']}, reused {m['incremental_reused']})",
        "",
        f"PROJECTION, not measured: {p['total_nodes']:,} nodes on N Cloud Run L4 tasks. Assumptions:",
        f"  L4 speed {p['l4_tokens_per_s']:,} tokens/s = {L4_BF16_DENSE_TFLOPS:g} TFLOPS bf16 dense (NVIDIA L4 "
        f"datasheet) x {L4_UTILISATION:.0%} assumed utilisation / {m['flops_per_token'] / 1e6:.0f} MFLOP per token "
        "(2 x non-embedding parameters of this model)",
        f"  = an assumed {p['assumed_speedup_vs_this_cpu']}x speed-up over this CPU's measured "
        f"{p['cpu_tokens_per_s']} tokens/s",
        f"  every task reads all nodes: {p['read_s_per_task']} s (this machine's parse rate, {GCS_MB_S:g} MB/s "
        f"assumed from Cloud Storage); {TASK_START_S:g} s assumed per task for container start and model load",
        f"  the job's overhead over the bare engine is this run's {m['job_s'] / m['baseline_s']:.2f}x (at least 1x)",
        f"  tasks   full run (at {L4_UTILISATION_LOW:.0%} util.)   nightly, {changed:.0%} changed (at {L4_UTILISATION_LOW:.0%})",
    ]
    lines += [f"  {r['tasks']:5d}  {r['full_s'] / 60:6.1f} min ({r['full_s_low'] / 60:5.1f} min)   "
              f"{r['nightly_s'] / 60:6.1f} min ({r['nightly_s_low'] / 60:5.1f} min)" for r in p["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000, help="nodes to measure with (default 10,000)")
    parser.add_argument("--max-chars", type=int, default=1000, help="longest node text, in characters")
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--changed", type=float, default=0.1, help="share of texts changed for the incremental run")
    parser.add_argument("--total", type=int, default=1_000_000, help="nodes in the projection")
    parser.add_argument("--tasks", default="4,8,16,32", help="task counts in the projection")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    args = parser.parse_args(argv)
    m = measure(args.nodes, max_chars=args.max_chars, chunk_rows=args.chunk_rows, changed=args.changed)
    p = project(m, total=args.total, tasks=[int(t) for t in args.tasks.split(",")], changed=args.changed)
    print(report(m, p, changed=args.changed))
    if args.json:
        print(json.dumps({"measured": m, "projection": p}))


if __name__ == "__main__":
    main()
