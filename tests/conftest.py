"""Shared fixtures: one real Kafka broker per test session, an isolated namespace per test.

The broker is the one in RAGSTREAM_TEST_BROKER when set (``.ci/run`` starts one with
``ragstream kafka up``); otherwise the session starts its own on a free port and stops it
at the end. Each test gets its own topic prefix, consumer groups and Milvus Lite file,
so tests share the broker without seeing each other's messages.

Every test that reaches the ``broker`` fixture, directly or through ``settings``, is
marked ``kafka`` at collection, so ``-m "not kafka"`` (``scripts/test.sh --fast``) is
exactly the tests that need no broker; a test that only wants configuration takes
``unit_settings``. With RAGSTREAM_TEST_NO_BROKER set (the fast tier sets it), asking for
the broker fails the test instead of starting one: the fast tier never pays for a broker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from streams.settings import MINILM, Settings, get_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The fast tier's property tests try 25 cases each instead of 100 (``--hypothesis-profile
#: fast``, set by ``scripts/test.sh --fast``): a quick first signal; the full suite and CI
#: run the default. A test that sets its own ``max_examples`` keeps it.
hypothesis_settings.register_profile("fast", max_examples=25)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``kafka`` what needs the broker: by its fixtures, not by memory. A test that
    takes ``settings`` (or any fixture built on ``broker``) needs it, marked or not."""
    for item in items:
        if (
            "broker" in getattr(item, "fixturenames", ())
            and item.get_closest_marker("kafka") is None
        ):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("RAGSTREAM_TEST_NO_BROKER"):
        pytest.fail("this run has no broker (RAGSTREAM_TEST_NO_BROKER): mark the test kafka")
    given = os.environ.get("RAGSTREAM_TEST_BROKER")
    if given:
        yield given
        return
    from devtools import kafka_local

    home = tmp_path_factory.mktemp("kafka-home")
    port = kafka_local.free_port()
    settings = Settings(home=home, broker=f"127.0.0.1:{port}")
    info = kafka_local.up(settings)
    try:
        yield info.bootstrap
    finally:
        kafka_local.down(settings)


def _test_settings(broker: str, home: Path) -> Settings:
    ns = f"t{uuid.uuid4().hex[:10]}"
    return Settings(
        home=home,
        broker=broker,
        app_id=ns,
        topic_prefix=f"{ns}.",
        model=MINILM,
        session_timeout_s=6.0,
        commit_interval_s=0.5,
        window_s=1.0,
        fetch_backoff_s=0.1,
        fetch_timeout_s=5.0,
        # The SSRF guard is on by default: tests serve from 127.0.0.1 and allow exactly that
        # (127.0.0.2 stays forbidden: the SSRF tests keep their secret there).
        fetch_allow="127.0.0.1/32",
        # One export of each model's ONNX graph for the whole run (and later runs), not one
        # per test home: keyed by the weights' fingerprint, built under a lock.
        models_dir=Settings().cache_dir / "test-models",
    )


@pytest.fixture
def settings(broker: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own topics, groups and Milvus file on the shared broker."""
    return _test_settings(broker, tmp_path / "home")


#: Where ``unit_settings`` points its clients: the discard port, where no broker listens,
#: so a unit test that reaches for Kafka by mistake fails instead of finding one.
NO_BROKER = "127.0.0.1:9"


@pytest.fixture
def unit_settings(tmp_path: Path) -> Settings:
    """The same settings as ``settings`` without a broker: for tests of configuration and
    pure logic, which then run in the fast tier."""
    return _test_settings(NO_BROKER, tmp_path / "home")


@pytest.fixture(scope="session")
def django_docs() -> Path:
    from devtools.corpus import ensure_django_docs

    return ensure_django_docs(Settings().cache_dir)


@pytest.fixture(scope="session")
def chunker():
    from streams.chunking import Chunker
    from streams.model import resolve_model_path

    s = Settings(model=MINILM)
    return Chunker.from_model(resolve_model_path(s.model), s.chunk_tokens, s.chunk_overlap)


class MilvusServer:
    """``milvus-lite server`` in a child process: lets a test read Milvus while a worker
    writes (Lite allows one process per file), and stop Milvus to test an outage."""

    def __init__(self, data_dir: Path) -> None:
        from devtools.kafka_local import free_port

        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = Path(sys.executable).with_name("milvus-lite")
        log = open(self.data_dir.with_suffix(".log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(exe),
                "server",
                "--data-dir",
                str(self.data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            assert self.proc.poll() is None, "milvus-lite server exited"
            time.sleep(0.2)
        raise AssertionError("milvus-lite server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def milvus_server(tmp_path: Path) -> Iterator[MilvusServer]:
    server = MilvusServer(tmp_path / "milvus-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def random_m3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BGE-M3-shaped model (dense 1024 + sparse head) with random weights, built once."""
    from devtools.random_m3 import make_random_m3

    return make_random_m3(tmp_path_factory.mktemp("models") / "random-m3")


@pytest.fixture
def cli_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Settings], None]]:
    """Run the CLI (or ``ragstream.Index``) in this process with given settings: their
    environment set, and the process's cached ``get_settings()`` forgotten before and
    after, so a test never reads the settings an earlier test left behind."""

    def use(settings: Settings) -> None:
        for name, value in settings.to_env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("MILVUS_URI", raising=False)
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()
