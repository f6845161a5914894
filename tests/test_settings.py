"""Settings come from the environment, with the documented names and defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.settings import MINILM, Settings


def test_defaults_and_env_names(monkeypatch) -> None:
    for key in list(os.environ):
        if key.startswith("RAGSTREAM_") or key.startswith("MILVUS_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.broker == "127.0.0.1:9092"
    assert s.model == "BAAI/bge-m3"
    assert s.milvus_is_lite and s.milvus_target.endswith("milvus.db")
    monkeypatch.setenv("RAGSTREAM_BROKER", "kafka:29092")
    monkeypatch.setenv("RAGSTREAM_MODEL", MINILM)
    monkeypatch.setenv("MILVUS_URI", "http://milvus:19530")
    s = Settings()
    assert (s.broker, s.model, s.milvus_target) == ("kafka:29092", MINILM, "http://milvus:19530")
    assert not s.milvus_is_lite


def test_to_env_round_trips(tmp_path: Path) -> None:
    s = Settings(home=tmp_path, broker="h:1", window_rows=7, milvus_uri=str(tmp_path / "m.db"))
    env = s.to_env()
    back = Settings(
        **{k[len("RAGSTREAM_") :].lower(): v for k, v in env.items() if k.startswith("RAGSTREAM_")}
    )
    assert back == s.model_copy(
        update={"home": tmp_path.resolve(), "cache_dir": s.cache_dir.resolve()}
    )


@pytest.mark.slow  # starts Milvus Lite in a child process
def test_a_lite_path_in_milvus_uri_opens(tmp_path: Path) -> None:
    """pymilvus itself rejects a non-http MILVUS_URI at import; ragstream must not."""
    db = tmp_path / "lite.db"
    code = (
        "from streams.settings import Settings; from streams.store import MilvusStore;"
        "s = MilvusStore(Settings()); print(s.count()); s.close()"
    )
    env = {**os.environ, "MILVUS_URI": str(db)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("0")
    assert db.exists()


def test_configuration_doc_is_current() -> None:
    """docs/configuration.md lists every setting with its default (regenerate with
    `python scripts/config_doc.py`)."""
    import importlib.util

    path = Path(__file__).parent.parent / "scripts" / "config_doc.py"
    spec = importlib.util.spec_from_file_location("config_doc", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.OUT.read_text() == mod.render()
    for name in Settings.model_fields:
        assert name.upper() in mod.OUT.read_text()


# --- production connections ------------------------------------------------------------------

KAFKA_SASL = {
    "RAGSTREAM_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
    "RAGSTREAM_KAFKA_SASL_MECHANISM": "scram-sha-512",
    "RAGSTREAM_KAFKA_USERNAME": "svc",
    "RAGSTREAM_KAFKA_PASSWORD": "pa55-w0rd",
}


def _env(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for key in list(os.environ):
        if key.startswith("RAGSTREAM_") or key.startswith("MILVUS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_kafka_security_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, **KAFKA_SASL)
    s = Settings()
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert s.kafka_sasl and s.kafka_tls
    assert s.kafka_password.get_secret_value() == "pa55-w0rd"
    assert "pa55-w0rd" not in repr(s) and "pa55-w0rd" not in str(s)
    # a child process (a stage) gets the secret itself, and reads back the same settings
    env = s.to_env()
    assert env["RAGSTREAM_KAFKA_PASSWORD"] == "pa55-w0rd"
    _env(monkeypatch, **env)
    back = Settings()
    assert back.kafka_password == s.kafka_password
    assert back.model_copy(update={"home": s.home, "cache_dir": s.cache_dir}) == s


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RAGSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "RAGSTREAM_KAFKA_SASL_MECHANISM"),
        ({**KAFKA_SASL, "RAGSTREAM_KAFKA_PASSWORD": ""}, "RAGSTREAM_KAFKA_PASSWORD"),
        (
            {"RAGSTREAM_KAFKA_SASL_MECHANISM": "PLAIN"},
            "SASL_SSL (or SASL_PLAINTEXT), not PLAINTEXT",
        ),
        ({"RAGSTREAM_KAFKA_USERNAME": "svc"}, "used only with"),
        ({"RAGSTREAM_KAFKA_SECURITY_PROTOCOL": "TLS"}, "RAGSTREAM_KAFKA_SECURITY_PROTOCOL"),
        (
            {"RAGSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "RAGSTREAM_KAFKA_CA_FILE": "/no/ca.pem"},
            "RAGSTREAM_KAFKA_CA_FILE=/no/ca.pem: no such file",
        ),
        (
            {"RAGSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "RAGSTREAM_KAFKA_CERT_FILE": __file__},
            "RAGSTREAM_KAFKA_CERT_FILE and RAGSTREAM_KAFKA_KEY_FILE go together",
        ),
        ({"RAGSTREAM_KAFKA_CA_FILE": __file__}, "TLS files are used only with"),
        ({"MILVUS_USER": "root"}, "MILVUS_USER and MILVUS_PASSWORD go together"),
        (
            {"MILVUS_TOKEN": "t", "MILVUS_USER": "root", "MILVUS_PASSWORD": "pw"},
            "not both",
        ),
        (
            {"RAGSTREAM_MILVUS_CERT_FILE": __file__, "RAGSTREAM_MILVUS_KEY_FILE": __file__},
            "needs RAGSTREAM_MILVUS_CA_FILE",
        ),
    ],
)
def test_connection_settings_that_cannot_work_stop_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict, named: str
) -> None:
    """A combination that cannot connect is refused when the settings load, with the
    variable named, before any client tries (and hangs or fails obscurely)."""
    from ragstream.cli import EXIT_ERROR, main
    from streams.settings import get_settings

    _env(monkeypatch, **env)
    get_settings.cache_clear()
    try:
        assert main(["status"]) == EXIT_ERROR
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith("ragstream: error: invalid setting") and named in err, err
    assert "pa55-w0rd" not in err
