"""docker-compose.kafka.yml is a valid Compose file, checked without a Docker engine.

The Compose specification's JSON Schema is vendored in ``tests/data/compose-spec.json``
(compose-spec/compose-spec, ``schema/compose-spec.json``, commit 00655e22), so the check runs
on a fresh machine with nothing but the project's Python dependencies.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.kafka.yml"
SCHEMA = Path(__file__).with_name("data") / "compose-spec.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    # It declares "https://json-schema.org/draft-07/schema", a spelling jsonschema does not
    # map to a draft on its own: name the draft.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


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


def test_compose_file_is_valid(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any]
) -> None:
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
def test_a_broken_copy_is_rejected(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any], breakage: Any
) -> None:
    broken = copy.deepcopy(compose)
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
