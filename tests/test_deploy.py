"""The deployment files agree with the code, checked without Docker, Prometheus or Grafana.

- ``Dockerfile``: what it copies is in the build context and is all the CLI imports; its
  entry point is the project's script; its environment is real settings, served on the port
  it exposes; its HEALTHCHECK, run as written, passes against a live stage endpoint and
  fails against a stalled or absent one.
- ``deploy/grafana`` and ``deploy/alerts.yml``: every metric and label a PromQL expression
  names is one ``streams/metrics.py`` exports (the test that catches dashboard/code drift),
  and the dashboard is what Grafana loads, from the data source provisioned beside it.
- ``deploy/k8s``: the example manifests parse and probe the port the stage serves.

The compose files have their own tests (tests/test_compose.py).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from agents import telemetry
from streams import messages, metrics
from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ragstream.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "ragstream.yml"
ALERTS = DEPLOY / "alerts.yml"
STACK = DEPLOY / "docker-compose.yml"


# --- the Dockerfile ------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def runtime_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last stage: what the image is."""
    last = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last:]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"exec form expected: {rest}"
    return [str(v) for v in value]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether ``docker build`` leaves ``path`` out of the context: the last pattern that
    matches it or a folder above it decides (``!`` lets it back in)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        bare = pattern.removeprefix("**/")
        if any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, bare) for p in prefixes):
            out = not keep
    return out


def local_imports(package: str) -> set[str]:
    """Top-level packages of this repository that ``package``'s modules import (lazily
    imported ones too: a verb imports them when it runs)."""
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if (ROOT / top / "__init__.py").is_file():
                    found.add(top)
    return found


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def copied(steps: list[tuple[str, str]]) -> list[str]:
    """Sources the build copies from the context (not from another stage)."""
    out = []
    for keyword, rest in steps:
        if keyword == "COPY" and "--from=" not in rest:
            out += [s for s in rest.split() if not s.startswith("--")][:-1]
    return [s.removeprefix("./") for s in out]


def test_what_the_image_copies_is_in_the_build_context(steps: list[tuple[str, str]]) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = copied(steps)
    assert "pyproject.toml" in sources and "constraints.txt" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
        assert not dockerignored(source, patterns), f"COPY {source}: .dockerignore leaves it out"
    # what must stay out of the context does
    assert dockerignored(".venv/bin/python", patterns)
    assert dockerignored("streams/__pycache__/x.pyc", patterns)


def test_the_image_holds_every_package_the_cli_imports(steps: list[tuple[str, str]]) -> None:
    sources = set(copied(steps))
    needed, todo = set(), ["ragstream"]
    while todo:
        package = todo.pop()
        if package not in needed:
            needed.add(package)
            todo += sorted(local_imports(package))
    assert {"ragstream", "streams", "agents", "ops"} <= needed
    assert needed <= sources, f"not copied: {sorted(needed - sources)}"
    # The topic schemas are read from beside the packages (not package data): the image
    # copies them and installs the project editable, from the copied tree.
    schema_dir = messages.SCHEMA_DIR.relative_to(ROOT)
    assert str(schema_dir) in sources
    if len(schema_dir.parts) == 1:
        installs = [r for k, r in steps if k == "RUN" and "pip install" in r and ".[" in r]
        assert installs and all(" -e " in r for r in installs)


def test_the_entry_point_is_the_project_script(steps: list[tuple[str, str]]) -> None:
    image = runtime_stage(steps)
    entrypoint = exec_form(dict(image)["ENTRYPOINT"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["ragstream"] and "ragstream" in scripts
    verb = exec_form(dict(image)["CMD"])[0]
    assert (ROOT / "ragstream" / "cli" / f"{verb}.py").is_file(), f"no verb {verb}"
    assert dict(image)["USER"] not in ("root", "0")
    # torch's version comes from constraints.txt, whatever index the build names
    assert len(re.findall(r"^torch==\S+$", (ROOT / "constraints.txt").read_text(), re.M)) == 1


def test_the_image_serves_probes_on_the_port_it_exposes(
    steps: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = runtime_stage(steps)
    env = env_of(image)
    for name, value in env.items():
        if name.startswith("RAGSTREAM_"):
            monkeypatch.setenv(name, value)
    settings = Settings()  # the image's variables are settings (a misspelt one is ignored)
    assert settings.metrics_host == "0.0.0.0"
    assert settings.metrics_port > 0
    assert dict(image)["EXPOSE"].split() == [str(settings.metrics_port)]
    assert settings.log_format == env["RAGSTREAM_LOG_FORMAT"]


def _healthcheck(steps: list[tuple[str, str]]) -> list[str]:
    rest = dict(runtime_stage(steps))["HEALTHCHECK"]
    return exec_form(rest.split(" CMD ", 1)[1])


def _probe(command: list[str], port: int) -> int:
    """Run the image's health check as written, with this interpreter for ``python`` and
    the port in ``RAGSTREAM_METRICS_PORT``: it must follow the port the image is given."""
    argv = [sys.executable if arg == "python" else arg for arg in command]
    env = {"RAGSTREAM_METRICS_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


def test_the_healthcheck_passes_on_a_live_stage_and_fails_otherwise(
    steps: list[tuple[str, str]], unit_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = _healthcheck(steps)
    assert command[0] == "python"  # the slim image has no curl
    served = telemetry.serve(unit_settings, "healthcheck-test")
    assert served is not None
    server, run_file = served
    try:
        port = server.server_address[1]
        monkeypatch.setattr(telemetry.HEALTH, "beat", time.monotonic())
        monkeypatch.setattr(telemetry.HEALTH, "stall_s", 60.0)
        assert _probe(command, port) == 0
        monkeypatch.setattr(telemetry.HEALTH, "beat", time.monotonic() - 120)  # loop stalled
        assert _probe(command, port) != 0
    finally:
        server.shutdown()
        server.server_close()
        run_file.unlink(missing_ok=True)
    assert _probe(command, port) != 0  # nothing listens


# --- PromQL: the dashboard and the alerts name what streams/metrics.py exports ------------

#: Sample names Prometheus makes itself, not ragstream.
BUILTIN_SERIES = {"up"}
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
FUNCTIONS = {
    "abs", "avg", "avg_over_time", "bottomk", "ceil", "clamp_max", "clamp_min", "count",
    "delta", "deriv", "floor", "histogram_quantile", "idelta", "increase", "irate",
    "label_replace", "max", "max_over_time", "min", "min_over_time", "quantile",
    "rate", "round", "scalar", "sort", "sort_desc", "stddev", "sum", "time", "topk", "vector",
}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"[^\"]*\"")
_IDENT = re.compile(r"[a-zA-Z_:][\w:]*")


def exported() -> dict[str, set[str]]:
    """Every sample name ragstream's processes expose, with its labels."""
    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        family = value.describe()[0]
        labels = set(value._labelnames)
        suffixes = {
            "counter": ["_total"],
            "gauge": [""],
            "histogram": ["_bucket", "_sum", "_count"],
        }
        for suffix in suffixes[family.type]:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def promql_names(expr: str) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """(series names, functions, (series or '', label)) named in one PromQL expression.

    Not a parser: enough of the grammar to find names (strings, durations, Grafana's
    ``$variables`` and numbers are not names; a name before ``(`` is a function).
    """
    expr = re.sub(r"\$\{?\w+\}?", "", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery selectors
    labels: set[tuple[str, str]] = set()
    for match in _SELECTOR.finditer(expr):
        labels |= {(match.group(1) or "", m.group(1)) for m in _MATCHER.finditer(match.group(2))}
    expr = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", expr)
    for match in _GROUPING.finditer(expr):
        labels |= {("", name.strip()) for name in match.group(2).split(",") if name.strip()}
    expr = _GROUPING.sub(" ", expr)
    expr = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", expr)
    series, functions = set(), set()
    for match in _IDENT.finditer(expr):
        name = match.group(0)
        if name.lower() in KEYWORDS:
            continue
        if expr[match.end() :].lstrip().startswith("("):
            functions.add(name)
        else:
            series.add(name)
    return series, functions, labels


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def unknown_names(exprs: list[str]) -> list[str]:
    known = exported()
    problems = []
    for expr in exprs:
        series, functions, labels = promql_names(expr)
        problems += [f"{expr}: no function {f}" for f in functions - FUNCTIONS]
        problems += [f"{expr}: no metric {s}" for s in series - set(known) - BUILTIN_SERIES]
        usable = set(TARGET_LABELS).union(*(known.get(s, set()) for s in series))
        for owner, label in labels:
            allowed = known.get(owner, usable) | TARGET_LABELS if owner else usable
            if label not in allowed:
                problems.append(f"{expr}: {owner or 'no series here'} has no label {label}")
    return problems


def test_the_promql_reader_finds_names() -> None:
    series, functions, labels = promql_names(
        "histogram_quantile(0.99, sum by (le, status_class) (rate(ragstream_fetch_seconds_bucket"
        '{status_class!="error"}[$__rate_interval]))) > 0.5 and on (job) up{job=~"ragstream-.*"}'
    )
    assert series == {"ragstream_fetch_seconds_bucket", "up"}
    assert functions == {"histogram_quantile", "sum", "rate"}
    assert labels == {
        ("", "le"),
        ("", "status_class"),
        ("", "job"),
        ("ragstream_fetch_seconds_bucket", "status_class"),
        ("up", "job"),
    }
    # and the check reports what is wrong in one
    assert len(unknown_names(["sum by (stages) (rate(ragstream_mesages_in_total[1m]))"])) == 2
    assert unknown_names(['rate(ragstream_embed_busy_seconds_total{stage="embed"}[1m])'])


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_and_label_in_promql_is_exported(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert exprs
    assert unknown_names(exprs) == []


def test_the_dashboard_shows_what_operating_it_needs() -> None:
    used = set().union(*(promql_names(e)[0] for e in dashboard_exprs()))
    base = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    required = {
        "ragstream_messages_in_total",  # throughput
        "ragstream_messages_out_total",
        "ragstream_consumer_lag",  # lag
        "ragstream_freshness_seconds",  # freshness, per page and per chunk
        "ragstream_chunk_freshness_seconds",
        "ragstream_embed_busy_seconds_total",  # busy fraction
        "ragstream_dead_letters_total",
        "ragstream_fetch_seconds",
        "ragstream_window_write_seconds",
        "ragstream_milvus_errors_total",
    }
    assert required <= base, f"not on the dashboard: {sorted(required - base)}"


def test_the_dashboard_is_what_grafana_loads() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {d["uid"] for d in datasources if d["type"] == "prometheus"}
    ids, cells = set(), set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["targets"]
        assert panel["datasource"]["uid"] in uids
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] in uids


def test_grafana_is_provisioned_from_the_files_compose_mounts() -> None:
    grafana = yaml.safe_load(STACK.read_text())["services"]["grafana"]
    mounts = dict(str(v).split(":")[:2] for v in grafana["volumes"])
    folder = "./" + str(DASHBOARD.parent.relative_to(DEPLOY))
    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts[folder]]
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or home == f"{mounts[folder]}/{DASHBOARD.name}"
    assert (
        mounts["./" + str(PROVIDERS.parents[1].relative_to(DEPLOY))] == "/etc/grafana/provisioning"
    )
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    host = re.match(r"http://([\w-]+):\d+$", source["url"])
    assert host and host.group(1) == "prometheus"


# --- Kubernetes examples -------------------------------------------------------------------


def test_kubernetes_probes_and_annotations_use_the_port_each_process_serves() -> None:
    from streams.topics import STAGES

    docs = [
        d
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
    ]
    (config,) = [d["data"] for d in docs if d["kind"] == "ConfigMap"]
    assert config["RAGSTREAM_METRICS_HOST"] == "0.0.0.0"
    stages = []
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        args = container["args"]
        if args[0] == "webhooks":
            port = int(args[args.index("--port") + 1])
            assert args[args.index("--host") + 1] == "0.0.0.0"
        else:
            stages.append(args[args.index("--stages") + 1])
            env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            port = int(env.get("RAGSTREAM_METRICS_PORT", config["RAGSTREAM_METRICS_PORT"]))
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        probes = {k: v["httpGet"] for k, v in container.items() if k.endswith("Probe")}
        assert probes["livenessProbe"]["path"] == "/livez"
        assert probes["readinessProbe"]["path"] == "/readyz"
        for probe in probes.values():
            assert named.get(probe["port"], probe["port"]) == port, container["name"]
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port
        limits = container["resources"]["limits"]
        assert (int(limits.get("nvidia.com/gpu", 0)) >= 1) == (args[-1] == "embed")
        if args[0] == "webhooks" or args[-1] in ("fetch", "embed"):
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            assert any(config["RAGSTREAM_MODEL"].startswith(m + "/") for m in mounts)
    assert sorted(stages) == sorted(STAGES)


@pytest.mark.slow
def test_a_wheel_carries_the_schemas(tmp_path: Path) -> None:
    """Messages are validated against schemas/*.json, read beside the packages: a wheel
    (pip install from an index, a container built from it) must ship them. Built from a
    copy of the tree, so a stale ``build/`` here cannot lend it files."""
    import shutil
    import subprocess
    import sys
    import zipfile

    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    src = tmp_path / "src"
    for rel in listed:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out)],
        cwd=src,
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"schemas/{p.name}" for p in (ROOT / "schemas").glob("*.json")}
    assert wanted and wanted <= names, sorted(wanted - names)
    assert "streams/messages.py" in names
