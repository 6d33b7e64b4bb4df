"""service.yaml carries what a GPU Cloud Run service needs and agrees with the app's own limits, the
image and job.yaml (whose own checks are in tests/jobs/test_deploy.py)."""
from __future__ import annotations

import json

from tests.conftest import run_cli
from tests.deploy.helpers import container, env_of, load_yaml


def revision() -> dict:
    return load_yaml("service.yaml")["spec"]["template"]


def test_one_l4_with_16gi_and_at_least_4_cpu_in_europe_west1() -> None:
    # Given the service spec
    spec = load_yaml("service.yaml")
    limits = container(spec)["resources"]["limits"]
    # When its placement and resources are read
    # Then it is a Knative service on one L4, with Cloud Run's minimum (or more) for an L4 instance
    assert spec["apiVersion"] == "serving.knative.dev/v1" and spec["kind"] == "Service"
    assert spec["metadata"]["labels"]["cloud.googleapis.com/location"] == "europe-west1"
    assert revision()["spec"]["nodeSelector"] == {"run.googleapis.com/accelerator": "nvidia-l4"}
    assert limits["nvidia.com/gpu"] == "1" and limits["memory"] == "16Gi" and int(limits["cpu"]) >= 4


def test_scales_from_zero_to_two_with_cpu_always_allocated() -> None:
    # Given the revision template's annotations
    annotations = revision()["metadata"]["annotations"]
    # When the scaling and billing settings are read
    # Then it scales to zero, never past two GPUs, and keeps CPU allocated as GPU services must
    assert annotations["autoscaling.knative.dev/minScale"] == "0"
    assert annotations["autoscaling.knative.dev/maxScale"] == "2"
    assert annotations["run.googleapis.com/cpu-throttling"] == "false"


def test_probes_wait_for_the_model_on_readyz_and_watch_healthz_on_the_serving_port() -> None:
    # Given the container's port and probes
    serving = container(load_yaml("service.yaml"))
    port = serving["ports"][0]["containerPort"]
    startup, liveness = serving["startupProbe"], serving["livenessProbe"]
    # When their paths and budgets are read
    startup_budget = startup.get("initialDelaySeconds", 0) + startup["failureThreshold"] * startup["periodSeconds"]
    # Then startup waits on /readyz (503 until the model is warm) for minutes, within what Cloud Run
    # accepts (each of initialDelaySeconds and periodSeconds at most 240; 240 s in all under older limits)
    assert port == 8080 and serving["ports"][0]["name"] == "http1"
    assert startup["httpGet"] == {"path": "/readyz", "port": port}
    assert 180 <= startup_budget and startup["failureThreshold"] * startup["periodSeconds"] <= 240
    assert startup["timeoutSeconds"] <= startup["periodSeconds"]
    # And liveness asks /healthz, which answers while the model loads or works
    assert liveness["httpGet"] == {"path": "/healthz", "port": port}
    assert liveness["timeoutSeconds"] <= liveness["periodSeconds"]


def test_concurrency_is_matched_to_the_batcher_and_the_apps_admission_limit() -> None:
    # Given Cloud Run's per-instance concurrency and the app's limits from the environment
    concurrency = revision()["spec"]["containerConcurrency"]
    env = env_of(load_yaml("service.yaml"))
    # When they are compared
    # Then an instance takes enough requests at once to fill a forward batch, and no more than the app
    # admits (beyond that it would answer 429 while Cloud Run could have used the other instance)
    assert int(env["GEMMA_BATCH_MAX_BATCH_SIZE"]) <= concurrency == int(env["GEMMA_BATCH_MAX_QUEUED_REQUESTS"])
    assert concurrency <= 1000  # Cloud Run's ceiling


def test_environment_names_are_options_of_serve_and_carry_the_deployment_settings() -> None:
    # Given the container environment and serve's help (which lists no env names, so read the CLI)
    from cli import main

    env = env_of(load_yaml("service.yaml"))
    serve = main.commands["serve"]
    envvars = {name for p in serve.params for name in ([p.envvar] if isinstance(p.envvar, str) else p.envvar or [])}
    # When each GEMMA_BATCH_* variable is looked up
    unknown = [name for name in env if name.startswith("GEMMA_BATCH_") and name not in envvars]
    # Then serve reads every one (a misspelt variable would be ignored silently), and the required
    # settings are there: INFO logs, a results bucket, and push authentication
    assert not unknown, unknown
    assert env["GEMMA_BATCH_LOG_LEVEL"] == "INFO"
    assert env["GEMMA_BATCH_RESULTS"].startswith("gs://")
    assert env["GEMMA_BATCH_PUSH_SERVICE_ACCOUNT"].endswith(".iam.gserviceaccount.com")
    assert run_cli("serve", "--help").returncode == 0


def test_push_tokens_are_checked_for_one_audience_by_cloud_run_and_by_the_app() -> None:
    # Given the service's custom audiences and the app's push audience
    spec = load_yaml("service.yaml")
    audiences = json.loads(spec["metadata"]["annotations"]["run.googleapis.com/custom-audiences"])
    # When they are compared
    # Then Cloud Run's IAM check accepts the token Pub/Sub mints, and the app requires that same audience
    assert env_of(spec)["GEMMA_BATCH_PUSH_AUDIENCE"] in audiences


def test_request_timeout_allows_a_push_to_wait_for_its_result() -> None:
    # Given the service's request timeout
    timeout = revision()["spec"]["timeoutSeconds"]
    # When it is compared with Pub/Sub's longest ack deadline for push (600 s)
    # Then a push is never cut off before Pub/Sub itself would give up on it
    assert 600 <= timeout <= 3600


def test_service_and_job_run_the_same_image_in_the_same_region() -> None:
    # Given both specs
    service, job = load_yaml("service.yaml"), load_yaml("job.yaml")
    # When their images and locations are compared
    # Then deploy.sh's one substitution points both at the image it built
    assert container(service)["image"] == container(job)["image"]
    assert container(service)["image"].startswith("europe-west1-docker.pkg.dev/PROJECT/")
    location = "cloud.googleapis.com/location"
    assert service["metadata"]["labels"][location] == job["metadata"]["labels"][location]
