"""Extract and chunk pages in child processes that can be killed: the hard time bound.

Why a process: extraction runs C code (the HTML parser, whose tree building costs depth x
tags: 100,000 nested ``<div>`` take longer than a minute) and Python that no thread can
interrupt. A page that overruns ``extract_deadline_s`` must be stopped, and only a process
can be: its child is killed, the page is dead-lettered (``extract_timeout``) and a fresh
child takes its place, so the pages behind it on its partition wait no longer than that.

Why a pool of long-lived children rather than one per page: a child needs about a second to
start (imports, the tokenizer); a page then costs one pipe round trip of its body and its
chunks (about a millisecond for a 50 KB page, see docs/security.md).

Trust: the parent sends the child its configuration and pages; the child answers in JSON
only (never pickle), so a child that a hostile page subverted still cannot run code in the
stage. A child that dies (a crash in C code, the kernel's OOM killer) costs its page an
``extract`` dead letter, not the stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import orjson

from streams.chunking import Chunker
from streams.crawl import Links
from streams.documents import PageLimits
from streams.errors import ExtractUnavailable
from streams.extract import (
    ExtractTimeout,
    PageRefused,
    PageTooDeep,
    PageTooLarge,
    TooManyChunks,
    UnsupportedContent,
)
from streams.messages import Chunk
from streams.settings import Settings

__all__ = ["ExtractPool", "ExtractUnavailable"]

log = logging.getLogger(__name__)

#: The documented refusals, by dead-letter class: a child answers with a class, the stage
#: raises the same exception type that ``page_chunks`` would have raised in process.
_REFUSALS: dict[str, type[PageRefused]] = {
    cls.error_class: cls
    for cls in (UnsupportedContent, PageTooLarge, PageTooDeep, TooManyChunks, ExtractTimeout)
}

#: Longest wait for a new child to import its modules and build its chunker.
_STARTUP_S = 120.0


class _Child:
    """One child process and its two pipes (blocking calls: run them in a thread)."""

    def __init__(self, config: bytes) -> None:
        down_r, down_w = os.pipe()  # parent -> child
        up_r, up_w = os.pipe()  # child -> parent
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agents.extractor", str(down_r), str(up_w)],
                pass_fds=(down_r, up_w),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            for fd in (down_r, down_w, up_r, up_w):
                os.close(fd)
            raise ExtractUnavailable(f"cannot start an extraction process: {exc}") from exc
        os.close(down_r)
        os.close(up_w)
        self.out = Connection(down_w, readable=False)
        self.inp = Connection(up_r, writable=False)
        try:
            self.out.send_bytes(config)
            if not self.inp.poll(_STARTUP_S):
                raise ExtractUnavailable(f"extraction process not ready in {_STARTUP_S:.0f}s")
            reply = orjson.loads(self.inp.recv_bytes())
        except (OSError, EOFError, orjson.JSONDecodeError) as exc:
            self.kill()
            raise ExtractUnavailable(f"extraction process failed to start: {exc!r}") from exc
        except ExtractUnavailable:
            self.kill()
            raise
        if reply != {"ready": True}:
            self.kill()
            raise ExtractUnavailable(f"extraction process failed to start: {reply!r}")

    def call(self, header: bytes, body: bytes, deadline_s: float) -> dict[str, Any] | None:
        """The child's answer to one page, or None when it overran ``deadline_s`` (killed)."""
        start = time.monotonic()
        try:
            self.out.send_bytes(header)
            self.out.send_bytes(body)
            left = deadline_s - (time.monotonic() - start)
            if left <= 0 or not self.inp.poll(left):
                self.kill()
                return None
            raw = self.inp.recv_bytes()
        except (OSError, EOFError):
            code = self.kill()
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            return {"error": f"the extraction process died ({how})"}
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.kill()
            return {"error": "the extraction process answered garbage"}
        return reply if isinstance(reply, dict) else {"error": "unexpected answer"}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        code = self.proc.wait()
        for conn in (self.out, self.inp):
            with contextlib.suppress(OSError):
                conn.close()
        return code


class ExtractPool:
    """``page_chunks`` run by ``workers`` child processes, each page within ``deadline_s``.

    ``await pool.page_chunks(url, body, content_type, **kwargs)`` returns what
    ``streams.documents.page_chunks`` returns, raises its ``PageRefused`` errors, plus
    ``ExtractTimeout`` for a page that overran the deadline and ``PageRefused`` (class
    ``extract``) for one that crashed its child; ``ExtractUnavailable`` when no child starts.
    """

    def __init__(self, settings: Settings, chunker: Chunker) -> None:
        self._deadline = settings.extract_deadline_s
        self._config = orjson.dumps(
            {
                "tokenizer": chunker.tokenizer_json(),
                "max_tokens": chunker.max_tokens,
                "overlap": chunker.overlap,
                "max_chars": chunker.max_chars,
                "max_bytes": chunker.max_bytes,
                "limits": dataclasses.asdict(PageLimits.from_settings(settings)),
            }
        )
        self._size = settings.extract_workers
        self._idle: asyncio.Queue[_Child | None] = asyncio.Queue()
        self._all: set[_Child] = set()

    async def start(self) -> None:
        """Start every child now, so a broken environment fails the stage at once."""
        children = await asyncio.gather(
            *(asyncio.to_thread(_Child, self._config) for _ in range(self._size))
        )
        for child in children:
            self._all.add(child)
            self._idle.put_nowait(child)

    async def page_chunks(
        self, url: str, body: bytes, content_type: str | None, **kwargs: Any
    ) -> list[Chunk]:
        return (await self.page(url, body, content_type, **kwargs))[0]

    async def page(
        self,
        url: str,
        body: bytes,
        content_type: str | None,
        *,
        links: bool = False,
        base_url: str | None = None,
        **kwargs: Any,
    ) -> tuple[list[Chunk], Links | None]:
        """``page_chunks``, and with ``links`` (a crawl's page) the page's links too
        (``streams.crawl.extract_links``, relative to ``base_url``, where a redirect
        ended, else ``url``), read in the same child within the same deadline: a hostile
        page's links cost the stage no more than its text."""
        header = orjson.dumps(
            {
                "url": url,
                "content_type": content_type,
                "kwargs": kwargs,
                "links": links,
                "base": base_url or url,
            }
        )
        slot = await self._idle.get()
        try:
            child = slot if slot is not None and slot.alive() else await self._replace(slot)
        except BaseException:
            self._idle.put_nowait(None)  # tried again on next use
            raise
        try:
            reply = await asyncio.to_thread(child.call, header, body, self._deadline)
        except BaseException:
            self._retire(child)  # cancelled mid-call: it may still be busy with this page
            raise
        if reply is None or not child.alive():
            self._retire(child)
        else:
            self._idle.put_nowait(child)
        if reply is None:
            log.warning("extraction of %s overran %.1fs: child killed", url, self._deadline)
            raise ExtractTimeout(
                f"extracting and chunking took longer than {self._deadline:g}s "
                "(RAGSTREAM_EXTRACT_DEADLINE_S)"
            )
        if "chunks" in reply:
            found = None
            if "links" in reply:
                found = Links(tuple(reply["links"]), reply.get("canonical"))
            return [Chunk(**c) for c in reply["chunks"]], found
        if "refused" in reply:
            error_class, message = reply["refused"]
            raise _REFUSALS.get(error_class, PageRefused)(str(message))
        raise PageRefused(str(reply.get("error", reply)))

    def _retire(self, child: _Child) -> None:
        """Kill ``child``; its slot is refilled by a fresh child on next use."""
        child.kill()
        self._all.discard(child)
        self._idle.put_nowait(None)

    async def _replace(self, old: _Child | None) -> _Child:
        if old is not None:
            self._all.discard(old)
            await asyncio.to_thread(old.kill)
        child = await asyncio.to_thread(_Child, self._config)
        self._all.add(child)
        return child

    async def aclose(self) -> None:
        for child in list(self._all):
            await asyncio.to_thread(child.kill)
        self._all.clear()


# --- the child ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the stage that started it dies (else EOF on the
    pipe ends it, but only after the page at hand)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _serve(inp: Connection, out: Connection) -> None:
    from streams.crawl import extract_links, is_html
    from streams.documents import page_chunks

    cfg = orjson.loads(inp.recv_bytes())
    chunker = Chunker.from_tokenizer_json(
        cfg["tokenizer"],
        cfg["max_tokens"],
        cfg["overlap"],
        max_chars=cfg["max_chars"],
        max_bytes=cfg["max_bytes"],
    )
    limits = PageLimits(**cfg["limits"])
    del cfg
    out.send_bytes(orjson.dumps({"ready": True}))
    while True:
        try:
            header = orjson.loads(inp.recv_bytes())
            body = inp.recv_bytes()
        except EOFError:
            return
        try:
            chunks = page_chunks(
                header["url"],
                body,
                header["content_type"],
                chunker,
                **header["kwargs"],
                limits=limits,
            )
            reply: dict[str, Any] = {"chunks": [dataclasses.asdict(c) for c in chunks]}
            if header.get("links"):
                found = (
                    extract_links(body, header.get("base") or header["url"])
                    if is_html(header["content_type"], body)
                    else Links()
                )
                reply["links"] = list(found.links)
                reply["canonical"] = found.canonical
        except PageRefused as exc:
            reply = {"refused": [exc.error_class, str(exc)]}
        except MemoryError:
            reply = {"refused": ["too_large", "out of memory extracting the page"]}
        except Exception as exc:  # any other failure is this page's, not the stage's
            reply = {"error": repr(exc)[:4000]}
        del body
        out.send_bytes(orjson.dumps(reply))


def main(argv: list[str]) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stage decides when its children stop
    inp = Connection(int(argv[0]), writable=False)
    out = Connection(int(argv[1]), readable=False)
    _serve(inp, out)


if __name__ == "__main__":
    main(sys.argv[1:])
