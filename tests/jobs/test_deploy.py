"""job.yaml, deploy/scheduler.yaml and docs/REEMBED.md agree with each other and with the CLI."""
from __future__ import annotations

import re

import yaml

from tests.conftest import REPO, run_cli


def load(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def test_job_runs_the_task_command_on_an_l4_in_europe_west1() -> None:
    # Given the Cloud Run Job definition
    job = load("job.yaml")
    execution = job["spec"]["template"]["spec"]
    task = execution["template"]["spec"]
    container = task["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    # When its command is checked against the CLI's own help
    help_text = run_cli("reembed-task", "--help").stdout
    # Then it is a real CLI command whose flags exist, on one L4 with 4 CPU / 16Gi, in europe-west1
    assert container["command"] == ["python", "cli.py", "reembed-task"]
    flags = [a for a in container["args"] if a.startswith("--")]
    assert {"--nodes", "--out"} <= set(flags) and all(f in help_text for f in flags)
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert task["nodeSelector"] == {"run.googleapis.com/accelerator": "nvidia-l4"}
    assert job["metadata"]["labels"]["cloud.googleapis.com/location"] == "europe-west1"
    assert "run.googleapis.com/launch-stage" in job["metadata"]["annotations"]
    assert execution["taskCount"] >= execution["parallelism"] >= 1 and task["maxRetries"] >= 1
    # And the task's time budget is the job's timeout, so it checkpoints before Cloud Run kills it
    assert env["CLOUD_RUN_TASK_TIMEOUT"] == str(task["timeoutSeconds"])


def test_scheduler_and_docs_start_this_job_nightly_with_an_oauth_service_account() -> None:
    # Given the job, the scheduler resource and the docs
    job, scheduler = load("job.yaml"), load("deploy/scheduler.yaml")
    docs = (REPO / "docs" / "REEMBED.md").read_text()
    uri = ("https://run.googleapis.com/v2/projects/PROJECT/locations/europe-west1/jobs/"
           f"{job['metadata']['name']}:run")
    # When their targets are compared / Then all three call the job's :run with an OAuth token, nightly
    target = scheduler["httpTarget"]
    assert target["uri"] == uri and target["httpMethod"] == "POST"
    assert target["oauthToken"]["serviceAccountEmail"].endswith(".iam.gserviceaccount.com")
    assert re.fullmatch(r"\d+ \d+ \* \* \*", scheduler["schedule"])
    command = docs[docs.index("gcloud scheduler jobs create http"):]
    command = command[:command.index("```")]
    assert f'--uri="{uri}"' in command and "--oauth-service-account-email=" in command
    assert f'--schedule="{scheduler["schedule"]}"' in command and "--location=europe-west1" in command
