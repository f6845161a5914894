"""Running a real pipeline from tests: worker processes, waiting, and the expected index."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from devtools.corpus import CorpusServer
from ops.progress import Snapshot, snapshot_raw, wait_indexed
from ops.publisher import publish
from streams.chunking import Chunker
from streams.documents import page_chunks
from streams.ids import chunk_id, normalize_url
from streams.messages import UrlRequest
from streams.settings import Settings
from streams.store import MilvusStore
from streams.topics import ensure_topics


class Worker:
    """``ragstream worker`` as a child process with the test's settings in its environment."""

    def __init__(
        self,
        settings: Settings,
        stages: str = "fetch,embed,write",
        log: Path | None = None,
        fetchers: int = 1,
    ) -> None:
        self.settings = settings
        self.log = log or settings.home / f"worker-{stages.replace(',', '-')}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1"}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ragstream.cli",
                    "worker",
                    "--stages",
                    stages,
                    "--fetchers",
                    str(fetchers),
                ],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the supervisor only: its stages die with it (parent-death signal)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # anything left (should be nothing)
            os.killpg(self.proc.pid, signal.SIGKILL)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def run(coro):
    return asyncio.run(coro)


def baseline(settings: Settings) -> dict[str, int]:
    run(ensure_topics(settings))
    return run(snapshot_raw(settings))


def publish_urls(settings: Settings, urls: list[str], **kw: object) -> int:
    return run(publish(settings, [UrlRequest(url=u, source="test", **kw) for u in urls]))


def wait_for(
    settings: Settings,
    base: dict[str, int],
    n: int,
    worker: Worker | None = None,
    timeout_s: float = 300,
) -> Snapshot:
    def check(_snap: Snapshot) -> None:
        if worker is not None and not worker.alive():
            raise AssertionError(f"worker died ({worker.proc.returncode}):\n{worker.tail()}")

    return run(wait_indexed(settings, base, n, check, timeout_s=timeout_s, poll_s=0.5))


def expected_index(chunker: Chunker, server: CorpusServer, files: list[Path]) -> dict[str, str]:
    """chunk id -> text, as the chunker gives them for these pages (no Kafka involved)."""
    out: dict[str, str] = {}
    for path in files:
        url = normalize_url(server.url_of(path))
        ctype = (
            "text/html; charset=utf-8" if path.suffix == ".html" else "text/plain; charset=utf-8"
        )
        for c in page_chunks(url, path.read_bytes(), ctype, chunker):
            out[chunk_id(c.doc_id, c.chunk_index)] = c.text
    return out


def milvus_rows(settings: Settings, fields: tuple[str, ...] = ("id", "text")) -> list[dict]:
    store = MilvusStore(settings)
    try:
        return store.rows(fields)
    finally:
        store.close()
