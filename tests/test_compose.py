"""The Compose files are valid and agree with ragstream, checked without a Docker engine.

Two files: ``docker-compose.kafka.yml`` (Kafka and Milvus for a ragstream on the host) and
``deploy/docker-compose.yml`` (the whole stack: servers, stages, API, Prometheus, Grafana).
The Compose specification's JSON Schema is vendored in ``tests/data/compose-spec.json``
(compose-spec/compose-spec, ``schema/compose-spec.json``, commit 00655e22), so the check runs
on a fresh machine with nothing but the project's Python dependencies. The schema says a
file is well formed; the checks below say its parts fit together (health checks on the port
each process serves, every process scraped, the GPU reserved, one model for every stage).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.kafka.yml"
STACK = ROOT / "deploy" / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
SCHEMA = Path(__file__).with_name("data") / "compose-spec.json"
FILES = [pytest.param(COMPOSE, id="kafka"), pytest.param(STACK, id="stack")]


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    # It declares "https://json-schema.org/draft-07/schema", a spelling jsonschema does not
    # map to a draft on its own: name the draft.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return load(STACK)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port, from short ("[ip:]host:container") or long syntax."""
    out: dict[int, int] = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out[int(port["target"])] = int(port.get("published") or port["target"])
        else:
            parts = str(port).split("/")[0].split(":")
            out[int(parts[-1])] = int(parts[-2] if len(parts) > 1 else parts[-1])
    return out


def test_schema_is_the_compose_spec(validator: jsonschema.protocols.Validator) -> None:
    assert validator.schema["title"] == "Compose Specification"
    assert "service" in validator.schema["definitions"]


@pytest.mark.parametrize("path", FILES)
def test_compose_file_is_valid(validator: jsonschema.protocols.Validator, path: Path) -> None:
    compose = load(path)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda d: d["services"]["kafka"].update(portz=["9092:9092"]), id="typo"),
        pytest.param(lambda d: d["services"]["kafka"].update(ports="9092:9092"), id="wrong-type"),
        pytest.param(lambda d: d.update(servicez=d.pop("services")), id="top-level-key"),
        pytest.param(
            lambda d: d["services"]["milvus"]["depends_on"]["etcd"].update(condition="ready"),
            id="bad-enum",
        ),
    ],
)
@pytest.mark.parametrize("path", FILES)
def test_a_broken_copy_is_rejected(
    validator: jsonschema.protocols.Validator, path: Path, breakage: Any
) -> None:
    broken = copy.deepcopy(load(path))
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_kafka_is_kraft_and_reachable_from_the_host(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert "localhost:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert _published(kafka)[9092] == 9092
    assert "healthcheck" in kafka
    assert any(v.split(":")[0] in compose["volumes"] for v in kafka["volumes"])


def test_milvus_standalone_exposes_19530(compose: dict[str, Any]) -> None:
    services = compose["services"]
    milvus = services["milvus"]
    assert milvus["image"].startswith("milvusdb/milvus:v2.5.")
    assert _published(milvus)[19530] == 19530
    assert {"etcd", "minio"} <= set(milvus["depends_on"])
    for name in ("milvus", "etcd", "minio"):
        assert "healthcheck" in services[name], name
        assert all(v.split(":")[0] in compose["volumes"] for v in services[name]["volumes"])


def test_header_says_how_to_point_ragstream_at_it() -> None:
    head = COMPOSE.read_text().split("\nservices:", 1)[0]
    assert "RAGSTREAM_BROKER=localhost:9092" in head
    assert "MILVUS_URI=http://localhost:19530" in head


# --- the full stack: deploy/docker-compose.yml ----------------------------------------------

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
_URL = re.compile(r"https?://([\w.-]+):(\d+)(/[\w/-]*)")


def defaults(value: Any) -> str:
    """A value as Compose interpolates it when no variable is set: ``${X:-d}`` is ``d``."""
    return _VAR.sub(lambda m: m.group(2) or "", str(value))


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def ragstream_services(stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run a ragstream process (the image the Dockerfile builds)."""
    return {
        name: service
        for name, service in stack["services"].items()
        if str(service.get("image", "")).startswith("ragstream:")
    }


def serves_on(service: dict[str, Any]) -> int:
    """The port a ragstream process answers /metrics, /livez and /readyz on: the API's
    ``--port``, a stage's ``RAGSTREAM_METRICS_PORT`` (agents/telemetry.py)."""
    command = _command(service)
    if command[0] == "webhooks":
        return int(command[command.index("--port") + 1])
    return int(defaults(_env(service)["RAGSTREAM_METRICS_PORT"]))


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service.get("healthcheck", {}).get("test", [])
    return test if isinstance(test, str) else " ".join(str(t) for t in test)


def _depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def scrape_targets(config: dict[str, Any]) -> dict[tuple[str, int], str]:
    """(host, port) -> how Prometheus finds it: ``dns-a`` (each A record, so each replica)
    or ``static``."""
    out: dict[tuple[str, int], str] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                out[(name, int(sd["port"]))] = "dns-a" if sd.get("type") == "A" else "dns-srv"
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                out[(host, int(port))] = "static"
    return out


@pytest.mark.parametrize("path", FILES)
def test_every_dependency_is_a_service_that_can_be_waited_for(path: Path) -> None:
    services = load(path)["services"]
    for name, service in services.items():
        for dep, condition in _depends(service).items():
            assert dep in services, f"{name} depends on {dep}, which is no service"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health check"
                assert not services[dep]["healthcheck"].get("disable"), dep


def test_the_stack_runs_every_stage_and_the_api(stack: dict[str, Any]) -> None:
    from streams.topics import STAGES

    commands = [_command(s) for s in ragstream_services(stack).values()]
    stages = [c[c.index("--stages") + 1] for c in commands if c[0] == "worker"]
    # one stage per container: its own endpoint on the fixed port, its own restarts
    assert all("," not in s for s in stages), stages
    assert sorted(stages) == sorted(STAGES)
    assert any(c[0] == "webhooks" for c in commands)
    assert {"kafka", "milvus", "etcd", "minio", "prometheus", "grafana"} <= set(stack["services"])


def test_fetchers_are_replicas_and_each_has_a_partition(stack: dict[str, Any]) -> None:
    fetch = stack["services"]["fetch"]
    replicas = int(defaults(fetch["deploy"]["replicas"]))
    assert replicas == 4
    assert "--fetchers" not in _command(fetch)  # one process, one :9400, per container
    for service in ragstream_services(stack).values():
        assert int(defaults(_env(service)["RAGSTREAM_URL_PARTITIONS"])) >= replicas


def test_the_embedder_reserves_a_gpu_and_gets_cuda_torch(stack: dict[str, Any]) -> None:
    embed = stack["services"]["embed"]
    devices = embed["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"]]
    assert gpus and int(gpus[0]["count"]) >= 1
    # the Dockerfile's default torch index is the CPU one: the embedder's build replaces it
    build = embed["build"]
    dockerfile = (STACK.parent / build["context"] / build["dockerfile"]).read_text()
    cpu_index = re.search(r"^ARG TORCH_INDEX=(\S+)$", dockerfile, re.M)
    assert cpu_index is not None
    assert build["args"]["TORCH_INDEX"] != cpu_index.group(1)
    assert embed["image"] != stack["services"]["fetch"]["image"]
    assert _env(embed).get("RAGSTREAM_DEVICE", "auto").startswith(("cuda", "${"))


def test_each_ragstream_process_is_probed_on_the_port_it_serves(stack: dict[str, Any]) -> None:
    services = ragstream_services(stack)
    assert len(services) >= 4
    for name, service in services.items():
        urls = _URL.findall(_healthcheck_text(service))
        assert urls, f"{name} has no HTTP health check"
        assert [(port, path) for _, port, path in urls] == [(str(serves_on(service)), "/livez")]
        command = _command(service)
        if command[0] == "webhooks":
            assert command[command.index("--host") + 1] == "0.0.0.0"
        else:
            assert _env(service)["RAGSTREAM_METRICS_HOST"] == "0.0.0.0", name


def test_prometheus_scrapes_every_ragstream_process(stack: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = scrape_targets(config)
    for name, service in ragstream_services(stack).items():
        how = targets.get((name, serves_on(service)))
        assert how, f"Prometheus does not scrape {name}:{serves_on(service)}"
        if "replicas" in service.get("deploy", {}):
            assert how == "dns-a", f"{name} has replicas: scrape each A record, not one name"
    for host, _ in targets:
        assert host in stack["services"] or host == "localhost", f"no service {host}"


def test_every_process_uses_the_same_servers_and_model(stack: dict[str, Any]) -> None:
    services = ragstream_services(stack)
    envs = {name: _env(s) for name, s in services.items()}
    kafka_env = _env(stack["services"]["kafka"])
    listeners = kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    advertised = {listener.split("://", 1)[1] for listener in listeners}
    for name, env in envs.items():
        assert env["RAGSTREAM_BROKER"] in advertised, name
        milvus = _URL.match(env["MILVUS_URI"] + "/")
        assert milvus and milvus.group(1) in stack["services"], name
    # the chunker (fetch) and the encoder (embed, the API's queries) must read one model
    # (streams/model.py): one setting for all, and its folder mounted where it is read
    models = {env["RAGSTREAM_MODEL"] for env in envs.values()}
    assert len(models) == 1
    model = defaults(models.pop())
    for name, service in services.items():
        command = _command(service)
        if command[0] == "webhooks" or command[-1] in ("fetch", "embed"):
            targets = [defaults(v).split(":")[1] for v in service.get("volumes", [])]
            assert any(model.startswith(t + "/") for t in targets), f"{name} lacks {model}"


def test_files_the_stack_mounts_and_builds_exist(stack: dict[str, Any]) -> None:
    for name, service in stack["services"].items():
        for volume in service.get("volumes", []):
            source = defaults(volume).split(":")[0]
            if source.startswith("."):
                assert (STACK.parent / source).exists(), f"{name} mounts missing {source}"
        if "build" in service:
            build = service["build"]
            assert (STACK.parent / build["context"] / build["dockerfile"]).is_file(), name


def test_prometheus_is_given_its_config_and_rules(stack: dict[str, Any]) -> None:
    prometheus = stack["services"]["prometheus"]
    mounts = {
        target: source for source, target, *_ in (v.split(":") for v in prometheus["volumes"])
    }
    config_file = next(
        a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")
    )
    assert (STACK.parent / mounts[config_file]).resolve() == PROMETHEUS
    config = yaml.safe_load(PROMETHEUS.read_text())
    for rules in config["rule_files"]:
        in_container = str(Path(config_file).parent / rules)  # relative to the config file
        assert in_container in mounts, f"{rules} is not mounted beside the config"
        assert (STACK.parent / mounts[in_container]).is_file()
