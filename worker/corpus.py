"""Real text that is on every machine: docstrings and sources of Python's standard library.

Used by the demo, the tests and the benchmarks, so they all run on the same real inputs."""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path


def stdlib_files() -> list[Path]:
    """Top-level standard-library modules, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))


def stdlib_docstrings(limit: int | None = None, *, min_chars: int = 40, max_chars: int | None = None) -> list[str]:
    """Module, class and function docstrings, read with `ast` (nothing is imported), de-duplicated."""
    seen: set[str] = set()
    texts: list[str] = []
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < min_chars or doc in seen:
                continue
            seen.add(doc)
            texts.append(doc if max_chars is None else doc[:max_chars])
            if limit is not None and len(texts) >= limit:
                return texts
    return texts
