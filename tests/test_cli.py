"""The CLI's one entry: every verb is listed, settings are read once, and the error tree
becomes one line and an exit status there (no broker: the verbs are replaced)."""

from __future__ import annotations

import argparse
import ast
import asyncio
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ops.follow
import ragstream.cli.status
from ops.demo import demo_settings, worker_env
from ops.progress import Snapshot
from ragstream import cli
from streams.errors import (
    ConfigError,
    InputError,
    KafkaUnavailable,
    PageTooLarge,
    RagstreamError,
    StoreUnavailable,
)
from streams.settings import MINILM, Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
CLI_DIR = ROOT / "ragstream" / "cli"


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """main() reads the environment through the cached get_settings()."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def verb_raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> list[Settings]:
    """Make ``ragstream status`` raise ``exc``; returns the settings it was handed."""
    seen: list[Settings] = []

    def fake(args: argparse.Namespace, settings: Settings) -> int:
        seen.append(settings)
        raise exc

    monkeypatch.setattr(ragstream.cli.status, "cmd_status", fake)
    return seen


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (ConfigError("RAGSTREAM_BROKER is empty"), 2),
        (InputError("no URLs to publish"), 2),
        (PageTooLarge("page of 9 MB"), 2),
        (RagstreamError("group g has 1 live member"), 2),
        (KafkaUnavailable("cannot reach Kafka at 127.0.0.1:9"), 69),
        (StoreUnavailable("Milvus at http://m:19530 does not answer"), 69),
    ],
)
def test_the_error_tree_is_one_line_and_a_status(
    exc: RagstreamError, status: int, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    verb_raising(monkeypatch, exc)
    rc, err = run_main(["status"], capsys)
    assert rc == status
    assert err == [f"ragstream: error: {exc}"]


def test_a_message_of_several_lines_is_printed_on_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    verb_raising(monkeypatch, RagstreamError("formatting failed:\n  line one\n  line two"))
    rc, err = run_main(["status"], capsys)
    assert rc == 2
    assert err == ["ragstream: error: formatting failed: line one line two"]


def test_an_error_without_a_message_says_what_it_is(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    verb_raising(monkeypatch, KafkaUnavailable())
    rc, err = run_main(["status"], capsys)
    assert rc == 69
    assert err == [f"ragstream: error: {KafkaUnavailable.__doc__}"]


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    verb_raising(monkeypatch, ZeroDivisionError("a bug, not a user error"))
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli.main(["status"])


def test_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    verb_raising(monkeypatch, KeyboardInterrupt())
    assert cli.main(["status"]) == 130


def test_settings_are_read_once_and_handed_to_the_verb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGSTREAM_BROKER", "kafka.example:9092")
    calls: list[Settings] = []
    real = cli.get_settings

    def counted() -> Settings:
        calls.append(real())
        return calls[-1]

    monkeypatch.setattr(cli, "get_settings", counted)
    seen = verb_raising(monkeypatch, KafkaUnavailable("away"))
    assert cli.main(["status"]) == 69
    assert len(calls) == 1 and seen == calls
    assert seen[0].broker == "kafka.example:9092"


def test_a_setting_that_does_not_validate_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAGSTREAM_URL_PARTITIONS", "many")
    seen = verb_raising(monkeypatch, AssertionError("the verb must not run"))
    rc, err = run_main(["status"], capsys)
    assert rc == 2 and not seen
    assert len(err) == 1
    assert err[0].startswith("ragstream: error: invalid setting RAGSTREAM_URL_PARTITIONS: ")


def cli_modules() -> list[str]:
    """Every verb module in ragstream/cli/, whether COMMANDS names it or not."""
    return sorted(p.stem for p in CLI_DIR.glob("*.py") if p.stem not in ("__init__", "__main__"))


def test_help_lists_every_verb_and_the_exit_statuses() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ragstream.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("positional arguments:")[1].split("options:")[0]
    verbs = {m[1] for m in re.finditer(r"^ {4}(\S+)", listed, re.MULTILINE)}
    assert verbs == set(cli_modules())
    statuses = proc.stdout.split("exit status:")[1]
    for code in ("0", "1", "2", "3", "69", "130"):
        assert f"\n  {code} " in statuses


def _calls(path: Path, name: str) -> list[int]:
    """Lines of ``path`` that call ``name(...)`` (a function or attribute of that name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hits: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if called == name:
                hits.append(node.lineno)
    return hits


def test_only_main_reads_the_environment() -> None:
    """The libraries and the verbs take settings; get_settings() is called in main() only,
    and in ``ragstream.Index`` (the Python API: a RAG application's process starts there)."""
    readers = {
        str(p.relative_to(ROOT)): lines
        for folder in ("ragstream", "ops", "devtools")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if (lines := _calls(p, "get_settings"))
    }
    assert list(readers) == ["ragstream/__init__.py", "ragstream/cli/__init__.py"]
    assert len(readers["ragstream/cli/__init__.py"]) == 1
    assert len(readers["ragstream/__init__.py"]) == 1


def test_the_demo_hands_its_own_settings_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the demo's worker and search use comes from the settings it derived, not from
    a changed environment (the demo no longer writes os.environ)."""
    monkeypatch.delenv("RAGSTREAM_MODEL", raising=False)
    chosen = demo_settings(Settings(fetch_allow="10.0.0.0/8"))
    assert chosen.model == MINILM
    assert chosen.fetch_allow == "10.0.0.0/8,127.0.0.1/32"
    assert demo_settings(Settings(model="BAAI/bge-small-en-v1.5")).model == "BAAI/bge-small-en-v1.5"
    env = worker_env(chosen.model_copy(update={"broker": "127.0.0.1:9"}))
    assert env["RAGSTREAM_MODEL"] == MINILM and env["RAGSTREAM_BROKER"] == "127.0.0.1:9"
    assert env["RAGSTREAM_FETCH_ALLOW"] == "10.0.0.0/8,127.0.0.1/32"


def test_publish_wait_reports_the_last_snapshot_when_it_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``publish --wait --timeout``: the summary shows where the URLs were when time ran
    out (exit 3), not an exception."""
    seen = Snapshot(urls=3, fetched=2, chunks=5, embedded=5, vectors=5, written=4, dead={})

    async def times_out(
        settings: Settings,
        base: dict[str, int],
        n: int,
        on_update: Callable[[Snapshot], None],
        timeout_s: float,
    ) -> Snapshot:
        on_update(seen)
        raise TimeoutError(f"not indexed after {timeout_s:.0f}s")

    monkeypatch.setattr(ops.follow, "wait_indexed", times_out)
    updates: list[Snapshot] = []
    base = ops.follow.Baseline(offsets={}, dead={})
    got = asyncio.run(ops.follow.follow(Settings(), base, 3, updates.append, timeout_s=1))
    assert got == (seen, True) and updates == [seen]
