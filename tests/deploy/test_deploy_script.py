"""deploy/deploy.sh on a machine without gcloud: its dry run is the whole plan, in order, with the
values the specs fix, and a real run refuses clearly instead of half-deploying."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.deploy.helpers import env_of, load_yaml, path_without

SCRIPT = REPO / "deploy" / "deploy.sh"
NO_GCLOUD = ("gcloud", "gsutil", "bq", "docker")


def deploy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the script with a PATH on which gcloud (and docker) do not exist."""
    env = {"PATH": path_without(tmp_path, *NO_GCLOUD), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60,
                          cwd=tmp_path)


def commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def first(plan: list[str], pattern: str) -> int:
    index = next((n for n, line in enumerate(plan) if re.search(pattern, line)), None)
    assert index is not None, f"the plan has no step matching {pattern!r}"
    return index


def test_bash_parses_it_and_shellcheck_passes_where_installed() -> None:
    # Given the script
    # When bash parses it without running it
    parsed = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    # Then it is valid bash; and where shellcheck is installed (Debian package shellcheck; neither the
    # Makefile nor CI installs it, so it is not required) it has no findings
    assert parsed.returncode == 0, parsed.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        checked = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout
    assert SCRIPT.read_text().splitlines()[1:].count("set -euo pipefail") == 1


def test_dry_run_prints_the_whole_plan_in_order_without_gcloud(tmp_path: Path) -> None:
    # Given no gcloud on PATH and a project from the environment-free flags
    # When the script is asked for a dry run
    result = deploy(tmp_path, "--project", "demo-project", "--dry-run", "--tag", "t1")
    plan = commands(result.stdout)
    # Then it exits 0 and lists every step, APIs before the build before the service before the push
    # subscription (which needs the service's URL) before the nightly trigger
    assert result.returncode == 0, result.stderr
    order = [
        first(plan, r"^gcloud services enable .*run\.googleapis\.com.*pubsub\.googleapis\.com"),
        first(plan, r"gcloud artifacts repositories create gemma-batch .*--repository-format=docker"),
        first(plan, r"gcloud storage buckets create gs://demo-project-gemma-batch"),
        first(plan, r"gcloud iam service-accounts create gemma-batch-push"),
        first(plan, r"--member=serviceAccount:gemma-batch@demo-project\.iam\.gserviceaccount\.com "
                    r"--role=roles/storage\.objectAdmin"),
        first(plan, r"^gcloud builds submit \. --config=deploy/cloudbuild\.yaml"),
        first(plan, r"^gcloud run services replace \S+/service\.yaml --region=europe-west1"),
        first(plan, r"^gcloud run services add-iam-policy-binding gemma-batch .*gemma-batch-push@.*roles/run\.invoker"),
        first(plan, r"^gcloud run jobs replace \S+/job\.yaml"),
        first(plan, r"gcloud pubsub topics create gemma-tasks$"),
        first(plan, r"gcloud pubsub topics create gemma-tasks-dead-letter$"),
        first(plan, r"--role=roles/iam\.serviceAccountTokenCreator"),
        first(plan, r"gcloud pubsub subscriptions create gemma-tasks-push --topic=gemma-tasks --push-endpoint=\S+/pubsub/push"),
        first(plan, r"gcloud scheduler jobs create http gemma-reembed-nightly"),
    ]
    assert order == sorted(order), order
    # And no command makes the service public
    assert not any("allUsers" in line and "add-iam-policy-binding" in line for line in plan)
    assert any("remove-iam-policy-binding gemma-batch" in line and "allUsers" in line for line in plan)


def test_the_push_subscription_authenticates_as_the_spec_expects(tmp_path: Path) -> None:
    # Given a dry run that keeps the specs it rendered
    rendered = tmp_path / "rendered"
    result = deploy(tmp_path, "--project", "demo-project", "--dry-run", "--render-dir", str(rendered))
    assert result.returncode == 0, result.stderr
    push = next(line for line in commands(result.stdout) if "subscriptions create gemma-tasks-push" in line)
    words = shlex.split(push.split("; else ", 1)[1].removesuffix("; fi"))
    flags = dict(w.split("=", 1) for w in words if w.startswith("--") and "=" in w)
    service = yaml.safe_load((rendered / "service.yaml").read_text())
    env = env_of(service)
    # When the subscription's push settings are compared with the deployed service's
    audiences = json.loads(service["metadata"]["annotations"]["run.googleapis.com/custom-audiences"])
    # Then Pub/Sub signs tokens as the account and for the audience that the app checks, with
    # a dead-letter topic, a retry backoff, and an ack deadline as long as the service's timeout
    assert flags["--push-auth-service-account"] == env["GEMMA_BATCH_PUSH_SERVICE_ACCOUNT"]
    assert flags["--push-auth-token-audience"] == env["GEMMA_BATCH_PUSH_AUDIENCE"] in audiences
    assert flags["--push-endpoint"].endswith("/pubsub/push")
    assert int(flags["--ack-deadline"]) == service["spec"]["template"]["spec"]["timeoutSeconds"]
    assert flags["--dead-letter-topic"] == "gemma-tasks-dead-letter" and "--min-retry-delay" in flags
    assert int(flags["--max-delivery-attempts"]) > int(env["GEMMA_BATCH_MAX_ATTEMPTS"])


def test_rendered_specs_carry_this_deployment_and_no_placeholders(tmp_path: Path) -> None:
    # Given a dry run for another project, bucket, region and tag
    rendered = tmp_path / "rendered"
    result = deploy(tmp_path, "--dry-run", "--project", "p-2", "--bucket", "b-2", "--region", "europe-west4",
                    "--tag", "v9", "--render-dir", str(rendered))
    assert result.returncode == 0, result.stderr
    # When the rendered service, job and scheduler specs are read
    texts = {name: (rendered / name).read_text() for name in ("service.yaml", "job.yaml", "scheduler.yaml")}
    service, job = yaml.safe_load(texts["service.yaml"]), yaml.safe_load(texts["job.yaml"])
    image = "europe-west4-docker.pkg.dev/p-2/gemma-batch/gemma-batch-gpu:v9"
    # Then every placeholder is replaced, both workloads run the tagged image just built, and the
    # plan deploys exactly these files
    for name, text in texts.items():
        assert not re.search(r"\bPROJECT\b|\bBUCKET\b|europe-west1", text), name
    assert service["spec"]["template"]["spec"]["containers"][0]["image"] == image
    assert job["spec"]["template"]["spec"]["template"]["spec"]["containers"][0]["image"] == image
    assert f"gcloud run services replace {rendered}/service.yaml --region=europe-west4" in commands(result.stdout)


def test_the_scheduler_is_created_with_the_values_of_scheduler_yaml(tmp_path: Path) -> None:
    # Given the checked-in scheduler resource and a dry run
    spec = load_yaml("deploy/scheduler.yaml")
    result = deploy(tmp_path, "--project", "PROJECT", "--dry-run")
    create = next(line for line in commands(result.stdout) if "scheduler jobs create http" in line)
    words = shlex.split(create.split("; else ", 1)[1].removesuffix("; fi"))
    flags = dict(w.split("=", 1) for w in words if w.startswith("--"))
    # When the flags are compared with the resource (the project placeholder kept as PROJECT)
    # Then they are the same job: name, schedule, target, identity, deadline and retries
    assert words[:6] == ["gcloud", "scheduler", "jobs", "create", "http", spec["name"].rsplit("/", 1)[1]]
    assert flags["--schedule"] == spec["schedule"] and flags["--time-zone"] == spec["timeZone"]
    assert flags["--uri"] == spec["httpTarget"]["uri"] and flags["--http-method"] == spec["httpTarget"]["httpMethod"]
    assert flags["--oauth-service-account-email"] == spec["httpTarget"]["oauthToken"]["serviceAccountEmail"]
    assert flags["--oauth-token-scope"] == spec["httpTarget"]["oauthToken"]["scope"]
    assert flags["--attempt-deadline"] == spec["attemptDeadline"]
    assert int(flags["--max-retry-attempts"]) == spec["retryConfig"]["retryCount"]


def test_pull_mode_deploys_a_worker_pool_on_a_pull_subscription_instead(tmp_path: Path) -> None:
    # Given a dry run in pull (worker pool) mode
    result = deploy(tmp_path, "--project", "demo-project", "--delivery", "pull", "--dry-run")
    plan = commands(result.stdout)
    # When its Pub/Sub and worker steps are read
    pool = plan[first(plan, r"gcloud beta run worker-pools deploy gemma-batch-worker")]
    # Then there is a pull subscription the runtime account may read, a GPU worker pool running
    # `cli.py worker` on it, and no push subscription (both would process every task twice)
    assert result.returncode == 0, result.stderr
    assert first(plan, r"subscriptions create gemma-tasks-pull --topic=gemma-tasks --ack-deadline=60") < plan.index(pool)
    assert "--command=python" in pool and r"--args=cli.py\,worker" in pool and "--gpu-type=nvidia-l4" in pool
    assert "GEMMA_BATCH_SUBSCRIPTION=projects/demo-project/subscriptions/gemma-tasks-pull" in pool
    assert not any("--push-endpoint" in line for line in plan)


@pytest.mark.parametrize(("args", "message"), [
    (("--project", "demo-project"), "gcloud is not on PATH"),
    (("--dry-run", "--delivery", "carrier-pigeon"), "--delivery must be push or pull"),
    (("--dry-run", "--bogus"), "unknown option: --bogus"),
    (("--dry-run", "--skip-build"), "--skip-build needs --tag"),
])
def test_bad_invocations_stop_before_doing_anything(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    # Given no gcloud and an invocation that cannot work
    # When the script runs
    result = deploy(tmp_path, *args)
    # Then it exits 2 with a line that says why, having printed no command
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not commands(result.stdout)
