"""Static checks of the deployment files: docker/Dockerfile, docker/compose.yaml,
otel-collector.yaml, scripts/bull-board/ and docs/operations.md.

There is no Docker engine or collector binary on the build machines, so these tests read the
files: everything they name exists, the images are pinned, the runner image installs the project
itself and runs as a non-root user, the collector's pipelines name defined components, and every
``RUNNER_*`` variable they mention is a real setting. Each checker is also shown a bad input, so
that it is known to be able to fail.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.settings import settings_table

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
OTEL = ROOT / "otel-collector.yaml"
BULL_BOARD = ROOT / "scripts" / "bull-board"
OPERATIONS = ROOT / "docs" / "operations.md"

EXACT_VERSION = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$")
COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


# --- helpers ------------------------------------------------------------------------------------


def interpolate(value: str) -> str:
    """Compose-style ``${VAR:-default}`` with the environment left out: the file's defaults."""
    return COMPOSE_VAR.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def exec_form(args: str) -> list[str]:
    """The argv of a CMD/ENTRYPOINT/HEALTHCHECK CMD, exec form or shell form."""
    if args.startswith("["):
        parsed = json.loads(args)
        assert isinstance(parsed, list)
        return [str(part) for part in parsed]
    return ["/bin/sh", "-c", args]


def image_is_pinned(image: str) -> bool:
    """A tag that names a release (``7.2.5``, ``15.8``; not ``latest`` or ``7``) or a digest."""
    if "@sha256:" in image:
        return True
    name_and_tag = image.rsplit("/", 1)[-1]
    if ":" not in name_and_tag:
        return False
    tag = name_and_tag.split(":", 1)[1]
    return "latest" not in tag and bool(re.match(r"v?\d+\.\d+", tag))


def dockerfile_problems(text: str) -> list[str]:
    """What is wrong with a runner Dockerfile; empty when it is fine."""
    problems: list[str] = []
    instructions = dockerfile_instructions(text)
    args: dict[str, str] = {}
    stages: set[str] = set()
    froms = 0
    for keyword, rest in instructions:
        if keyword == "ARG" and froms == 0:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        if keyword == "FROM":
            froms += 1
            parts = rest.split()
            parts = [p for p in parts if not p.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), parts[0])
            if image not in stages and not image_is_pinned(image):
                problems.append(f"base image not pinned: {image!r}")
            elif image.startswith("python:") and not re.match(r"python:\d+\.\d+\.\d+", image):
                problems.append(f"python base image without its patch version: {image!r}")
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
    if froms < 2:
        problems.append("not multi-stage")

    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    installs_project = False
    for run in runs:
        for command in re.split(r"&&|;|\|\|?", run):
            words = shlex.split(command)
            if "pip" not in " ".join(words[:3]) or "install" not in words:
                continue
            targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
            for target in targets:
                if target == "." or target.endswith(".whl") or target.endswith("/*.whl"):
                    installs_project = True
                elif target != "pip":
                    problems.append(f"pip installs something other than the project: {target!r}")
            if any(w in ("-r", "--requirement") or w.startswith("-r") for w in words):
                problems.append("pip installs from a requirements list")
    if not installs_project:
        problems.append("no `pip install .` (or of a wheel built from the project)")

    last_from = max((i for i, (kw, _) in enumerate(instructions) if kw == "FROM"), default=0)
    users = [rest for keyword, rest in instructions[last_from:] if keyword == "USER"]
    if not users:
        problems.append("no USER in the final stage")
    elif users[-1].split(":")[0] in ("root", "0"):
        problems.append("final USER is root")

    cmds = [exec_form(rest) for keyword, rest in instructions if keyword == "CMD"]
    if not cmds or cmds[-1][-3:] != ["python", "-m", "runner"]:
        problems.append("CMD does not run `python -m runner`")
    return problems


def pipeline_problems(config: dict[str, Any]) -> list[str]:
    """Pipelines that name a receiver, processor or exporter the config does not define."""
    problems: list[str] = []
    pipelines = (config.get("service") or {}).get("pipelines") or {}
    if not pipelines:
        problems.append("no pipelines")
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            defined = set((config.get(kind) or {}).keys())
            for component in pipeline.get(kind) or []:
                if component not in defined:
                    problems.append(f"{name}: {kind[:-1]} {component!r} is not defined")
        if not pipeline.get("receivers") or not pipeline.get("exporters"):
            problems.append(f"{name}: needs receivers and exporters")
    for extension in (config.get("service") or {}).get("extensions") or []:
        if extension not in (config.get("extensions") or {}):
            problems.append(f"extension {extension!r} is not defined")
    return problems


def unpinned_dependencies(package: dict[str, Any]) -> list[str]:
    deps = {**package.get("dependencies", {}), **package.get("devDependencies", {})}
    return [f"{name}@{spec}" for name, spec in deps.items() if not EXACT_VERSION.match(spec)]


def bind_sources(service: dict[str, Any]) -> list[str]:
    """Host paths of a service's bind mounts (named volumes left out)."""
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                sources.append(str(volume["source"]))
            continue
        source = interpolate(str(volume)).split(":", 1)[0]
        if source.startswith((".", "/", "~")):
            sources.append(source)
    return sources


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def runner_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services built from docker/Dockerfile."""
    picked = {}
    for name, service in services.items():
        build = service.get("build")
        if isinstance(build, dict):
            dockerfile = COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")
            if dockerfile.resolve() == DOCKERFILE.resolve():
                picked[name] = service
    return picked


# --- docker/Dockerfile --------------------------------------------------------------------------


def test_the_runner_dockerfile_has_no_problems() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_the_dockerfile_checker_catches_what_it_claims_to() -> None:
    bad = (
        "FROM python:latest\n"
        "COPY requirements.txt .\n"
        "RUN pip install -r requirements.txt && pip install aiohttp\n"
        "USER root\n"
        'CMD ["python", "app.py"]\n'
    )
    problems = " | ".join(dockerfile_problems(bad))
    for expected in (
        "base image not pinned",
        "not multi-stage",
        "requirements list",
        "'aiohttp'",
        "no `pip install .`",
        "final USER is root",
        "CMD does not run",
    ):
        assert expected in problems


def test_the_dockerfile_copies_only_files_that_exist() -> None:
    for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = rest.split()
        for source in sources:
            if any(ch in source for ch in "*?["):
                continue  # a glob may match nothing on purpose (README.m[d])
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"


def test_the_dockerfile_healthcheck_uses_the_port_it_sets_and_exposes() -> None:
    text = DOCKERFILE.read_text()
    port = re.search(r"RUNNER_HEALTH_PORT=(\d+)", text)
    assert port is not None
    assert re.search(rf"^EXPOSE {port.group(1)}$", text, re.M)
    assert "RUNNER_HEALTH_PORT" in text.split("HEALTHCHECK", 1)[1]
    assert "/healthz" in text.split("HEALTHCHECK", 1)[1]


# --- docker/compose.yaml ------------------------------------------------------------------------


def test_every_service_has_an_image_or_a_build(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name


def test_every_pulled_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            continue
        image = interpolate(service["image"])
        assert image_is_pinned(image), f"{name}: {image}"


def test_every_build_context_and_dockerfile_exists(services: dict[str, dict[str, Any]]) -> None:
    built = 0
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = COMPOSE.parent / build["context"]
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        built += 1
    assert built >= 3  # the runner, Bull Board and the status sink


def test_every_mounted_repository_file_exists(services: dict[str, dict[str, Any]]) -> None:
    mounted = []
    for name, service in services.items():
        for source in bind_sources(service):
            path = (COMPOSE.parent / source).resolve()
            assert path.exists(), f"{name}: mounts {source}, which does not exist"
            assert ROOT in path.parents or path == ROOT, f"{name}: mounts {source} outside the repo"
            mounted.append(path)
    assert OTEL.resolve() in mounted


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set((compose.get("volumes") or {}).keys())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "~")):
                assert volume.split(":", 1)[0] in declared, f"{name}: {volume}"


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name


def test_dependencies_name_services_and_wait_on_a_condition(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for dependency, how in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert how["condition"] in ("service_healthy", "service_started"), name
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency


def test_the_runner_services_run_the_package(services: dict[str, dict[str, Any]]) -> None:
    runners = runner_services(services)
    assert runners, "no service is built from docker/Dockerfile"
    for name, service in runners.items():
        command = service.get("command")
        if command is None:
            continue  # the image's CMD, checked above
        argv = command if isinstance(command, list) else shlex.split(command)
        assert argv[-3:] == ["python", "-m", "runner"], name
        redis = interpolate(service["environment"]["RUNNER_REDIS_URL"])
        assert redis.startswith("redis://redis:"), name
        replicas = interpolate(str(service["deploy"]["replicas"]))
        assert int(replicas) == 2, name
        grace_s = float(service["environment"]["RUNNER_SHUTDOWN_GRACE_S"])
        stop_s = float(service["stop_grace_period"].rstrip("s"))
        assert stop_s > grace_s, f"{name}: Docker would kill runs before the runner's grace ends"
        health_port = service["environment"]["RUNNER_HEALTH_PORT"]
        assert f":{health_port}/healthz" in " ".join(service["healthcheck"]["test"]), name


def test_redis_never_evicts(services: dict[str, dict[str, Any]]) -> None:
    argv = [interpolate(str(part)) for part in services["redis"]["command"]]
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"
    assert services["redis"]["image"].startswith("redis:7.")


def test_the_stack_has_the_pinned_majors(services: dict[str, dict[str, Any]]) -> None:
    assert services["postgres"]["image"].startswith("postgres:15.")
    assert services["mongodb"]["image"].startswith("mongo:7.")
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")


def test_the_status_sink_is_an_image_started_as_its_package_says(
    services: dict[str, dict[str, Any]],
) -> None:
    sink = ROOT / "scripts" / "status-sink"
    service = services["status-sink"]
    # Built from its own folder, so a container start needs no npm registry: nothing runs npm
    # at start and nothing mounts the checkout.
    assert (COMPOSE.parent / service["build"]["context"]).resolve() == sink.resolve()
    assert "command" not in service and "volumes" not in service
    dockerfile = (sink / "Dockerfile").read_text()
    problems = [
        p
        for p in dockerfile_problems(dockerfile)
        if p.startswith(("base image", "final USER", "no USER"))
    ]
    assert problems == []
    assert re.search(r"^RUN npm ci --omit=dev", dockerfile, re.M)
    assert "node_modules" in (sink / ".dockerignore").read_text().split()
    start = json.loads((sink / "package.json").read_text())["scripts"]["start"]
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd is not None
    # node directly (npm's sh would swallow SIGTERM): the same entry as the package's start.
    assert " ".join(json.loads(cmd.group(1))) == start.removeprefix("exec ")
    assert (sink / start.removeprefix("exec ").split()[1]).is_file()
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (sink / copied).exists(), copied


def test_the_collector_healthcheck_and_sink_healthcheck_are_well_formed(
    services: dict[str, dict[str, Any]],
) -> None:
    collector = services["otel-collector"]["healthcheck"]["test"]
    assert "validate" in collector
    sink_js = interpolate(services["status-sink"]["healthcheck"]["test"][3])
    # $$ in compose is a literal $; the RESP bulk-string marker must survive interpolation.
    assert "'$'" in sink_js


# --- otel-collector.yaml ------------------------------------------------------------------------


def test_the_collector_config_is_consistent() -> None:
    config = yaml.safe_load(OTEL.read_text())
    assert pipeline_problems(config) == []
    pipelines = config["service"]["pipelines"]
    assert set(pipelines["traces"]["exporters"]) == {"debug", "otlp"}
    assert set(pipelines["metrics"]["exporters"]) == {"debug", "prometheus", "otlp"}
    for pipeline in pipelines.values():
        # memory_limiter must come first to refuse data before batching holds it.
        assert pipeline["processors"][0] == "memory_limiter"
        assert "batch" in pipeline["processors"]
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    assert config["exporters"]["prometheus"]["endpoint"] == "0.0.0.0:8889"
    assert re.fullmatch(
        r"\$\{env:OTLP_UPSTREAM_ENDPOINT:-[^}]+\}", config["exporters"]["otlp"]["endpoint"]
    )


def test_the_pipeline_checker_catches_undefined_components() -> None:
    config = {
        "receivers": {"otlp": {}},
        "exporters": {"debug": {}},
        "service": {
            "extensions": ["health_check"],
            "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["debug", "jaeger"]}},
        },
    }
    assert pipeline_problems(config) == [
        "traces: exporter 'jaeger' is not defined",
        "extension 'health_check' is not defined",
    ]


# --- scripts/bull-board -------------------------------------------------------------------------


def test_bull_board_pins_its_dependencies() -> None:
    package = json.loads((BULL_BOARD / "package.json").read_text())
    assert unpinned_dependencies(package) == []
    assert package["scripts"]["start"] == "node server.js"
    for name in ("express", "@bull-board/api", "@bull-board/express", "bullmq", "ioredis"):
        assert name in package["dependencies"], name


def test_bull_board_lock_matches_its_pins() -> None:
    package = json.loads((BULL_BOARD / "package.json").read_text())
    lock = json.loads((BULL_BOARD / "package-lock.json").read_text())
    assert lock["packages"][""]["dependencies"] == package["dependencies"]
    for name, version in package["dependencies"].items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version, name


def test_the_image_pin_checker_wants_a_release() -> None:
    assert image_is_pinned("redis:7.2.5-bookworm")
    assert image_is_pinned("postgres:15.8-bookworm")
    assert image_is_pinned("otel/opentelemetry-collector-contrib:0.120.0")
    assert image_is_pinned("python@sha256:" + "0" * 64)
    for floating in ("redis", "redis:latest", "redis:7", "redis:7-alpine", "mongo:latest-7.0"):
        assert not image_is_pinned(floating), floating
    problems = dockerfile_problems(DOCKERFILE.read_text().replace("3.11.10-slim", "3.11-slim"))
    assert any("patch version" in problem for problem in problems)


def test_the_pin_checker_catches_ranges() -> None:
    package = {"dependencies": {"a": "^1.0.0", "b": "~2.1.0", "c": "latest", "d": "1.2.3"}}
    assert unpinned_dependencies(package) == ["a@^1.0.0", "b@~2.1.0", "c@latest"]


def test_the_bull_board_image_is_pinned_and_not_root() -> None:
    problems = [
        problem
        for problem in dockerfile_problems((BULL_BOARD / "Dockerfile").read_text())
        if problem.startswith(("base image", "final USER", "no USER"))
    ]
    assert problems == []


# --- settings named in the deployment files -----------------------------------------------------


@pytest.mark.parametrize(
    "path", [DOCKERFILE, COMPOSE, OPERATIONS, ROOT / "docker" / "README.md"], ids=lambda p: p.name
)
def test_every_runner_variable_mentioned_is_a_setting(path: Path) -> None:
    known = {env for env, *_ in settings_table()}
    mentioned = set(re.findall(r"\bRUNNER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    # RUNNER_REPLICAS is compose's own knob (how many runner containers), not a runner setting.
    mentioned.discard("RUNNER_REPLICAS")
    assert mentioned, "mentions no setting at all"
    assert mentioned <= known, sorted(mentioned - known)


def test_the_node_side_redis_url_helper_is_one_file_in_two_places() -> None:
    # The status sink and Bull Board are deployed alone, so each carries its own copy of the
    # URL helper; they must stay the same file, or the two would read RUNNER_REDIS_URL apart.
    sink = (ROOT / "scripts/status-sink/src/redis-url.js").read_bytes()
    board = (ROOT / "scripts/bull-board/redis-url.js").read_bytes()
    assert sink == board
