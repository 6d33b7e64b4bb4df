"""The deployment docs say true things: the architecture diagram names real modules, every CLI call
in the docs exists, the deploy flags they show are the script's, and LOCAL_DEVELOPMENT.md's tested
blocks run as written."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.deploy.helpers import cli_calls
from worker.devservices import free_port

DOCS = ("docs/ARCHITECTURE.md", "docs/GPU_SETUP.md", "docs/LOCAL_DEVELOPMENT.md")
TESTED_BLOCK = re.compile(r"^```bash tested\n(.*?)^```", re.S | re.M)
MODULE = re.compile(r"\b(?:cli\.py|(?:worker|jobs|schemas)/[\w/]*?(?:\w+\.py|/))")


def read(path: str) -> str:
    return (REPO / path).read_text()


def mermaid(text: str) -> str:
    blocks = re.findall(r"^```mermaid\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) == 1, "ARCHITECTURE.md has one Mermaid diagram"
    return blocks[0]


def test_every_module_in_the_architecture_diagram_exists() -> None:
    # Given the Mermaid diagram of the whole path
    diagram = mermaid(read("docs/ARCHITECTURE.md"))
    # When every file and package path in it is collected
    named = set(MODULE.findall(diagram))
    missing = sorted(name for name in named if not (REPO / name).exists())
    # Then each is a file (or a package directory) in the repository, and the path's main stations are there
    assert not missing, f"the diagram names modules that do not exist: {missing}"
    assert {"worker/source.py", "worker/service.py", "worker/runner.py", "worker/batcher.py", "worker/engine.py",
            "worker/tasks/", "worker/store.py", "jobs/reembed.py"} <= named
    for station in ("Pub/Sub", "topic", "push subscription", "pull subscription", "Cloud Storage", "Cloud Scheduler"):
        assert station in diagram, station


def test_cli_calls_in_the_docs_name_real_commands_and_flags() -> None:
    # Given every `cli.py ...` in the deployment docs, tested blocks or not
    calls = [call for path in DOCS for call in cli_calls(read(path), source=path)]
    # When each is checked against the command's own help (asked once per command)
    helps: dict[tuple[str, ...], str] = {}
    for call in calls:
        assert call.command, f"{call.source}: `cli.py` followed by no known command"
        command = tuple(call.command)
        if command not in helps:
            helps[command] = run_cli(*command, "--help", timeout=120).stdout
        help_text = helps[command]
        missing = [flag for flag in call.flags if flag not in help_text]
        # Then the command and every flag shown exist
        assert not missing, f"{call.source}: `cli.py {' '.join(call.command)}` has no {missing}"
    assert len(calls) >= 10


def test_deploy_options_in_the_docs_are_the_scripts() -> None:
    # Given the script's usage text and the docs
    usage = subprocess.run(["bash", str(REPO / "deploy" / "deploy.sh"), "--help"], capture_output=True,
                           text=True, timeout=30).stdout
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", usage))
    # When each `deploy.sh --option` and each backquoted `--option` the GPU guide attributes to the
    # script is collected
    shown = set()
    for path in DOCS:
        for line in read(path).splitlines():
            for tail in re.findall(r"deploy\.sh([^`]*)", line):
                shown |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", tail))
    guide = read("docs/GPU_SETUP.md")
    section = guide[guide.index("Options:"):guide.index("**Access.**")]
    shown |= set(re.findall(r"`(--[a-z-]+)", section))
    # Then the script accepts every one of them
    assert shown and shown <= options, shown - options


def test_gpu_guide_states_quota_price_assumptions_and_where_utilisation_is() -> None:
    # Given the GPU set-up guide
    guide = read("docs/GPU_SETUP.md")
    # When its required sections are looked for
    # Then it covers the L4 quota in europe-west1, an hourly L4 price stated as an assumption with its
    # source, scale to zero, and the Cloud Monitoring GPU metrics
    assert "L4" in guide and "europe-west1" in guide and "quota" in guide.lower()
    assert re.search(r"Assumptions, not quotes", guide) and "cloud.google.com/run/pricing" in guide
    assert re.search(r"\$0\.6\d+", guide) and "minScale: 0" in guide
    assert "run.googleapis.com/container/gpu/utilizations" in guide


def blocks_marked_tested() -> list[str]:
    return TESTED_BLOCK.findall(read("docs/LOCAL_DEVELOPMENT.md"))


def scratch_copy(tmp_path: Path) -> Path:
    """The working tree without local state, with the real virtualenv linked in (commands say .venv/bin)."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "out", "results", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "*.egg-info"))
    (copy / ".venv").symlink_to(REPO / ".venv")
    return copy


@pytest.mark.slow
@pytest.mark.emulator
def test_local_development_tested_blocks_run_as_written(tmp_path: Path) -> None:
    # Given the tested blocks in document order, a scratch copy of the repository, a free PORT and a
    # private state directory for `dev up` (so a developer's own emulators are not touched)
    blocks = blocks_marked_tested()
    assert len(blocks) >= 5 and any("cli.py dev up" in b for b in blocks) and any("cli.py serve" in b for b in blocks)
    copy = scratch_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")}
    env.update(GEMMA_BATCH_DEV_DIR=str(tmp_path / "dev"), PORT=str(free_port()))
    # When they run as one bash script that stops at the first failing command
    process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", "\n".join(blocks)], cwd=copy, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        output = ""
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            output += process.communicate()[0]
        run_cli("dev", "down", env={"GEMMA_BATCH_DEV_DIR": env["GEMMA_BATCH_DEV_DIR"]}, timeout=60)
    # Then every command succeeded, the pulled and the pushed task left their results, and the
    # deploy plan and the lint ran
    assert process.returncode == 0, output[-6000:]
    assert (copy / "results" / "adhoc" / "t-push-1.json").is_file()
    assert len(list((copy / "results" / "adhoc").glob("t-*.json"))) == 2
    assert "gcloud run services replace" in output and re.search(r'"status":\s*"ready"', output)


RESULT_FILE = re.compile(r"`(bench/results/[\w./-]+?)/?`")


def test_results_files_the_docs_cite_are_in_the_repository() -> None:
    # Given every bench results file or folder the docs and README cite by path
    cited = {(path, name) for path in ("README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))
             for name in RESULT_FILE.findall(read(path))}
    # When each is looked up among the files git tracks (what a fresh clone has)
    tracked = subprocess.run(["git", "ls-files", "bench/results"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    missing = sorted(f"{path}: {name}" for path, name in cited
                     if not any(t == name or t.startswith(name + "/") for t in tracked))
    # Then every one is there: a figure's backing file never points at nothing
    assert not missing, f"cited but not committed: {missing}"
    assert len(cited) >= 10
