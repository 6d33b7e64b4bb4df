"""Shared fixtures: the real embedded Gemma (prepared by `make setup`), loaded once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.corpus import stdlib_docstrings
from worker.engine import Engine, build_engine
from worker.model.loader import LoadedModel
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.fixtures.services"]


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(device="cpu")


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Engine:
    return build_engine(settings)


@pytest.fixture(scope="session")
def loaded_model(engine: Engine) -> LoadedModel:
    return engine.model


@pytest.fixture(scope="session")
def torchao() -> object:
    """torchao (the [gpu] extra), from beside the virtualenv where `make setup` puts it: installed
    into it, transformers would import it on every model load. Appended to this process's path
    only, so the processes tests start load models as a CPU user's would."""
    extras = Path(sys.prefix) / "extras"
    if str(extras) not in sys.path:
        sys.path.append(str(extras))
    try:
        import torchao
    except ImportError:
        pytest.fail(f"torchao is not in {extras}: run `make setup`")
    return torchao


@pytest.fixture(scope="session")
def docstrings() -> list[str]:
    return stdlib_docstrings(max_chars=3000)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cli.py` as a user would, in a fresh process."""
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, input=input, env={**os.environ, **(env or {})}, cwd=REPO)
