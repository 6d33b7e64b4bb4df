"""Startup (`worker/app.py`): a serving process keeps one OpenMP team, the engine thread's."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import REPO

# Builds a runtime as `cli.py worker` and `cli.py serve` do (or, with "main", from an engine loaded on
# the main thread, as before), runs one embedding pass on the engine thread, then counts the process's
# OS threads once they have settled (a thread that exits takes its OpenMP team with it, shortly after).
_CENSUS = textwrap.dedent("""
    import json, os, sys, time
    from worker.app import build_runtime
    from worker.engine import build_engine
    from worker.settings import Settings

    settings = Settings(device="cpu")
    engine = None
    if sys.argv[1] == "main":
        engine = build_engine(settings)
        engine.warm_up()
    runtime = build_runtime(settings, results=None, engine=engine)
    items = runtime.engine.tokenize(["A text long enough for the forward pass to run parallel kernels. " * 8] * 4,
                                    truncate=True, what="text")
    runtime.batcher.submit_embed(items, dims=None, normalize=True).result()
    counts = []
    while len(counts) < 10 or len(set(counts[-10:])) > 1:
        counts.append(len(os.listdir("/proc/self/task")))
        time.sleep(0.1)
    runtime.close()
    print(json.dumps({"threads": counts[-1]}))
""")


def _settled_threads(where: str) -> int:
    done = subprocess.run([sys.executable, "-c", _CENSUS, where], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])["threads"]


@pytest.mark.slow
def test_the_runtime_loads_the_model_on_a_thread_that_takes_its_openmp_team_with_it() -> None:
    # Given a machine where PyTorch runs its CPU kernels on more than one thread
    assert torch.get_num_threads() > 1, "needs at least 2 cores to have OpenMP teams to count"
    # When a runtime loads the model itself, and when it is given one loaded on the main thread, and each
    # has run an embedding pass on its engine thread
    own, main = _settled_threads("own"), _settled_threads("main")
    # Then the one loaded on the main thread holds that thread's OpenMP team besides the engine thread's
    # (torch.get_num_threads() - 1 more threads), and the runtime that loaded the model holds only the latter
    assert main - own == torch.get_num_threads() - 1, (own, main)
