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
