"""Every `cli.py` command that the image, the Cloud Run specs and the deploy script start exists, with
the flags they pass: found by reading those files, not from a list kept beside them."""
from __future__ import annotations

import pytest

from tests.conftest import REPO, run_cli
from tests.deploy.helpers import DEPLOY_FILES, CliCall, cli_calls, dockerfile_instructions, exec_form, yaml_cli_calls


def all_calls() -> list[CliCall]:
    calls = [call for path in DEPLOY_FILES for call in cli_calls((REPO / path).read_text(), source=path)]
    return calls + yaml_cli_calls("service.yaml") + yaml_cli_calls("job.yaml")


def test_the_files_name_the_service_and_job_commands_and_nothing_unknown() -> None:
    # Given every `cli.py ...` in the deployment files, comments included (a doc that names a command
    # that does not exist misleads as much as a spec that runs one)
    calls = all_calls()
    # When the words after `cli.py` are resolved against the CLI's own command tree
    unknown = [call.source for call in calls if not call.command]
    found = {call.command for call in calls}
    # Then each names a real command, and the image's two entry points are among them
    assert not unknown, f"`cli.py` followed by no known command at {unknown}"
    assert {("serve",), ("reembed-task",), ("model", "prepare")} <= found


def test_the_image_default_command_is_serve_in_exec_form() -> None:
    # Given the runtime stage's CMD and ENTRYPOINT
    instructions = dockerfile_instructions()
    cmd = [i for i in instructions if i.keyword == "CMD"]
    entrypoint = [i for i in instructions if i.keyword == "ENTRYPOINT"]
    # When they are read as the builder reads them
    command = exec_form(cmd[-1])
    # Then the container runs `python cli.py serve` itself (PID 1 gets Cloud Run's SIGTERM), with no
    # entrypoint in front that would stop the job from replacing the command with reembed-task
    assert command == ["python", "cli.py", "serve"] and not entrypoint
    # And it passes no --port, so the PORT that Cloud Run sets is what serve listens on
    assert not any(arg.startswith("--port") for arg in command)


@pytest.mark.parametrize("command", sorted({c.command for c in all_calls() if c.command}), ids=" ".join)
def test_each_named_command_answers_help_and_knows_its_flags(command: tuple[str, ...]) -> None:
    # Given a command the deployment files start, and every flag they pass it
    flags = sorted({flag for call in all_calls() if call.command == command for flag in call.flags})
    # When its help is asked for, in a fresh process as the container would start it
    result = run_cli(*command, "--help", timeout=120)
    # Then it exists and documents each of those flags
    assert result.returncode == 0, result.stderr
    missing = [flag for flag in flags if flag not in result.stdout]
    assert not missing, f"`cli.py {' '.join(command)}` has no {missing}"
