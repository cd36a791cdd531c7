"""Dockerfile and docker-compose.yml, checked without a Docker engine.

The compose file is parsed and its service checked (ports on loopback, GPU reservation, read-only models,
settings, healthcheck, restart, the `cpu` profile); the settings it and the Dockerfile pass are fed to the
real Settings; both healthcheck commands run against a real server; the Dockerfile's install steps run here
under `pip --dry-run` against the venv the Makefile built, so their pins and package set cannot drift from it.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.settings import Settings
from tests.conftest import ROOT
from tests.server import running_server

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"


# ------------------------------------------------------------------------------------------ parsing


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def parse_env(args: str) -> dict[str, str]:
    """ENV a=b c=d (the key=value form)."""
    return dict(item.split("=", 1) for item in shlex.split(args))


def make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(.+)$", MAKEFILE.read_text(), re.M)
    assert match, f"no {name} in the Makefile"
    return match.group(1).strip()


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} / ${VAR} substitution."""
    env = env or {}
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


@pytest.fixture(scope="module")
def instructions():
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def args_of(instructions, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions if kw == keyword]


def dockerfile_env(instructions) -> dict[str, str]:
    env = {}
    for rest in args_of(instructions, "ENV"):
        env.update(parse_env(rest))
    return env


def dockerfile_args(instructions) -> dict[str, str]:
    out = {}
    for rest in args_of(instructions, "ARG"):
        name, _, default = rest.partition("=")
        out[name] = shlex.split(default)[0] if default.strip() else ""
    return out


# ------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_base_and_torch_match_the_makefile(instructions):
    base = args_of(instructions, "FROM")
    assert len(base) == 1
    python = make_variable("PYTHON").removeprefix("python")  # python3.11
    assert base[0] == f"python:{python}-slim"
    assert dockerfile_args(instructions)["TORCH"] == make_variable("TORCH")
    runs = args_of(instructions, "RUN")
    assert any(re.match(r"pip install .*\$TORCH\b", r) for r in runs), "torch is installed from the TORCH pin"
    assert "pip install ." in runs, "the service is installed (without test extras)"


def test_dockerfile_runs_as_a_user_with_a_healthcheck_and_serves_the_service(instructions):
    keywords = [kw for kw, _ in instructions]
    users = args_of(instructions, "USER")
    assert users and users[-1] not in ("root", "0")
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert "RUN" not in keywords[last_user:], "nothing runs as root after switching users"
    assert any("useradd" in r and users[-1] in r for r in args_of(instructions, "RUN"))
    env = dockerfile_env(instructions)
    assert env["SALIENCY_HOST"] == "0.0.0.0"
    assert args_of(instructions, "EXPOSE") == [env["SALIENCY_PORT"]]
    assert "/readyz" in args_of(instructions, "HEALTHCHECK")[0]
    cmd = args_of(instructions, "CMD")
    assert cmd == ['["python", "-m", "service"]']


def test_dockerfile_copies_what_exists_and_is_not_ignored(instructions):
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")]

    def excluded(rel: str) -> bool:
        out = False
        for pattern in ignored:  # the last matching pattern wins, as in .dockerignore
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").removeprefix("**/")
            if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(Path(rel).name, pat) or rel.startswith(pat + "/"):
                out = not negate
        return out

    copied = []
    for rest in args_of(instructions, "COPY"):
        *sources, _ = shlex.split(rest)
        for source in sources:
            path = ROOT / source
            assert path.exists(), source
            assert not excluded(source), f"{source} is excluded by .dockerignore"
            copied.append(source)
    assert {"pyproject.toml", "service", "models"} <= set(copied)
    # what the service needs at run time lands in the image; what it does not is kept out of the context
    assert not excluded("service/static/viewer.js") and not excluded("models/efficientnet_lite0.toml")
    assert not excluded("models/weights/tiny_cnn.safetensors")
    for heavy in (".venv", ".git", "artifacts", "models/weights/resnet50.safetensors"):
        assert excluded(heavy), heavy


def test_dockerfile_settings_are_valid_and_refuse_an_open_bind_by_default(instructions, monkeypatch):
    env = dockerfile_env(instructions)
    names = {k.upper() for k in Settings.model_fields}
    for key in (k for k in env if k.startswith("SALIENCY_")):
        assert key.removeprefix("SALIENCY_") in names, f"{key} is not a setting"
    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        settings = Settings()
        assert settings.host == "0.0.0.0" and str(settings.models_dir) == "/app/models"
        # a bare `docker run` must not expose an unauthenticated service: it asks for a key or the override
        with pytest.raises(SystemExit, match="SALIENCY_API_KEY"):
            settings.check_bind()


@pytest.mark.slow
def test_dockerfile_install_steps_resolve_against_the_makefiles_venv(instructions, tmp_path):
    """Each RUN line that installs or imports, run here with pip in --dry-run, offline: the venv `make` built
    must already hold every pinned package the image installs, and the build-time import check must pass."""
    args = dockerfile_args(instructions)
    dry_run = "--dry-run --no-index --no-build-isolation --quiet"
    shims = (f'pip() {{ "{sys.executable}" -m pip "$@" {dry_run}; }}\n'
             f'python() {{ "{sys.executable}" "$@"; }}\n')
    ran = 0
    for run in args_of(instructions, "RUN"):
        if not run.startswith(("pip ", "python ")):
            continue  # useradd and friends only make sense in the image
        env = {**os.environ, **args}
        done = subprocess.run(["bash", "-ec", shims + run], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"RUN {run}\n{done.stdout}\n{done.stderr}"
        ran += 1
    assert ran >= 3


# ------------------------------------------------------------------------------------------ compose


def services_without_profiles(compose) -> dict:
    return {name: s for name, s in compose["services"].items() if not s.get("profiles")}


def test_compose_api_service_on_the_gpu(compose):
    api = compose["services"]["api"]
    assert not api.get("profiles"), "`docker compose up` starts the GPU service"
    assert set(services_without_profiles(compose)) == {"api"}
    assert api["build"] in (".", {"context": "."})
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert api["environment"]["SALIENCY_DEVICE"] == "cuda"


@pytest.mark.parametrize("name", ["api", "api-cpu"])
def test_compose_ports_volumes_settings_and_restart(compose, name, monkeypatch):
    service = compose["services"][name]
    env = {k: str(v) for k, v in service["environment"].items()}
    assert env["SALIENCY_HOST"] == "0.0.0.0"
    for port in service["ports"]:
        host_ip, host_port, container_port = interpolate(str(port)).split(":")
        assert host_ip == "127.0.0.1", f"{port} must be published on the host's loopback only"
        assert int(host_port) == 8000 and container_port == env["SALIENCY_PORT"]
    assert interpolate(str(service["ports"][0]), {"PUBLISH_PORT": "9000"}).startswith("127.0.0.1:9000:")
    assert "./models:/app/models:ro" in service["volumes"]
    assert env["SALIENCY_MODELS_DIR"] == "/app/models"
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    names = {k.upper() for k in Settings.model_fields}
    for key in env:
        assert key.startswith("SALIENCY_"), key
        assert key.removeprefix("SALIENCY_") in names, f"{key} is not a setting"
    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        settings = Settings()
    assert settings.allow_insecure_bind, "the compose file binds 0.0.0.0 in the container: it says so"
    settings.check_bind()  # `python -m service` starts with these settings
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace and int(grace.group(1)) > settings.shutdown_grace_s
    assert "/readyz" in " ".join(service["healthcheck"]["test"])


def test_compose_cpu_profile_has_no_gpu(compose):
    cpu = [s for s in compose["services"].values() if "cpu" in (s.get("profiles") or [])]
    assert len(cpu) == 1
    service = cpu[0]
    assert "deploy" not in service or "devices" not in str(service["deploy"])
    assert service["environment"]["SALIENCY_DEVICE"] == "cpu"
    api = compose["services"]["api"]
    for key in ("build", "image", "volumes", "healthcheck", "restart"):
        assert service[key] == api[key], key


@pytest.mark.slow
def test_healthchecks_pass_on_a_ready_server_and_fail_without_one(compose, instructions, registry):
    """The healthcheck commands themselves, as the container would run them (python = this venv's)."""
    compose_cmd = compose["services"]["api"]["healthcheck"]["test"]
    assert compose_cmd[:2] == ["CMD", "python"]
    docker_cmd = re.search(r"CMD (\[.*\])", args_of(instructions, "HEALTHCHECK")[0]).group(1)
    docker_cmd = yaml.safe_load(docker_cmd)
    assert docker_cmd[0] == "python"
    commands = [[sys.executable, *compose_cmd[2:]], [sys.executable, *docker_cmd[1:]]]
    with running_server(Settings(), registry) as (base, _):
        env = {**os.environ, "SALIENCY_PORT": base.rsplit(":", 1)[1]}
        for cmd in commands:
            done = subprocess.run(cmd, env=env, capture_output=True, timeout=30)
            assert done.returncode == 0, done.stderr
    for cmd in commands:  # the server is gone: unhealthy
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode != 0


def test_compose_config_with_docker_when_present():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI here: the compose file is checked statically above")
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("the docker CLI here has no compose plugin: the compose file is checked statically above")
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
