"""Local folders: ``file://`` URLs read from disk only under an allowed directory, and
``ragstream publish ./docs`` end to end (Markdown, reStructuredText, text and a PDF made
here), searchable, and free to publish again when nothing changed."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from agents.fetcher import Fetcher
from agents.filereader import read_local, validator
from ops.localfiles import expand, file_url, is_local_path
from streams.chunking import Chunker
from streams.documents import chunk_document
from streams.errors import BadRequest, ConfigError, FetchFailed
from streams.messages import UrlRequest, decode_url, encode_url
from streams.netpolicy import AddressPolicy
from streams.pdf import MAX_PDF_PAGES
from streams.settings import Settings
from tests.helpers import Worker, milvus_rows
from tests.hostile import make_pdf, pdf_many_pages

MIB = 1024 * 1024


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "guide").mkdir(parents=True)
    (root / "index.md").write_text("# Index\n\nWelcome to the gadget docs.\n")
    (root / "guide" / "setup.rst").write_text("Setup\n=====\n\nPlug the gadget in.\n")
    (root / "notes.txt").write_text("Notes on gadgets.\n")
    return root


def policy_for(*roots: Path) -> AddressPolicy:
    return AddressPolicy.parse(",".join(f"file://{r}" for r in roots))


def failure(url: str, policy: AddressPolicy, max_bytes: int = MIB) -> FetchFailed:
    with pytest.raises(FetchFailed) as info:
        read_local(url, policy, max_bytes)
    assert not info.value.transient
    return info.value


# --- reading one file ----------------------------------------------------------------------


def test_a_file_under_the_allowed_directory_is_read_with_type_and_validator(docs: Path) -> None:
    page = read_local(file_url(str(docs / "index.md")), policy_for(docs), MIB)
    assert (page.status, page.body) == (200, b"# Index\n\nWelcome to the gadget docs.\n")
    assert page.content_type == "text/markdown"
    assert page.etag == validator(os.stat(docs / "index.md"))
    assert page.last_modified and page.last_modified.endswith("GMT")
    rst = read_local(file_url(str(docs / "guide" / "setup.rst")), policy_for(docs), MIB)
    assert rst.content_type == "text/x-rst"


def test_an_unchanged_file_is_not_modified_and_a_changed_one_is_read(docs: Path) -> None:
    url, policy = file_url(str(docs / "notes.txt")), policy_for(docs)
    first = read_local(url, policy, MIB)
    again = read_local(url, policy, MIB, etag=first.etag)
    assert again.not_modified and again.body == b""
    (docs / "notes.txt").write_text("Notes on gadgets, revised.\n")
    changed = read_local(url, policy, MIB, etag=first.etag)
    assert changed.status == 200 and changed.body == b"Notes on gadgets, revised.\n"
    assert changed.etag != first.etag


def test_a_missing_file_is_gone(docs: Path) -> None:
    page = read_local(file_url(str(docs / "deleted.md")), policy_for(docs), MIB)
    assert page.gone


def test_nothing_is_read_without_a_directory_in_the_allow_list(docs: Path) -> None:
    url = file_url(str(docs / "index.md"))
    for policy in (AddressPolicy(), AddressPolicy.parse("127.0.0.1/32")):
        assert failure(url, policy).error_class == "forbidden_path"
    sibling = docs.parent / "docs-private"
    sibling.mkdir()
    (sibling / "x.md").write_text("secret")
    assert failure(file_url(str(sibling / "x.md")), policy_for(docs)).error_class == (
        "forbidden_path"
    )


def test_symlinks_may_not_lead_out_of_the_allowed_directory(docs: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("TOP SECRET")
    (docs / "escape.txt").symlink_to(outside)
    (docs / "escdir").symlink_to(tmp_path)  # a directory link: everything beside docs/
    (docs / "inside.txt").symlink_to(docs / "notes.txt")  # a link that stays is followed
    policy = policy_for(docs)
    for name in ("escape.txt", "escdir/secret.txt"):
        exc = failure(file_url(str(docs / name)), policy)
        assert exc.error_class == "forbidden_path" and "outside" in str(exc), name
        assert "TOP SECRET" not in str(exc)
    assert read_local(file_url(str(docs / "inside.txt")), policy, MIB).body == (
        b"Notes on gadgets.\n"
    )


def test_dot_segments_are_refused_before_the_disk_is_asked(docs: Path) -> None:
    url = f"file://{docs}/guide/../../docs-private/x.md"
    exc = failure(url, policy_for(docs))
    assert exc.error_class == "forbidden_path" and "'..'" in str(exc)


def test_directories_fifos_and_devices_are_not_files(docs: Path) -> None:
    fifo = docs / "pipe.md"
    os.mkfifo(fifo)
    started = time.monotonic()
    for path in (docs / "guide", fifo):
        assert failure(file_url(str(path)), policy_for(docs)).error_class == "not_a_file"
    assert time.monotonic() - started < 1.0  # the FIFO was never opened (it would block)
    exc = failure("file:///dev/zero", AddressPolicy.parse("file:///dev"))
    assert exc.error_class == "not_a_file"


def test_a_file_over_the_size_limit_is_too_large(docs: Path) -> None:
    (docs / "big.txt").write_bytes(b"x" * 5000)
    assert failure(file_url(str(docs / "big.txt")), policy_for(docs), 4999).error_class == (
        "too_large"
    )
    assert len(read_local(file_url(str(docs / "big.txt")), policy_for(docs), 5000).body) == 5000


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_a_permanent_failure(docs: Path) -> None:
    path = docs / "locked.md"
    path.write_text("locked")
    path.chmod(0)
    try:
        assert failure(file_url(str(path)), policy_for(docs)).error_class == "unreadable"
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_the_fetcher_reads_file_urls_but_refuses_a_redirect_to_one(docs: Path) -> None:
    settings = Settings(fetch_allow=f"file://{docs}", fetch_backoff_s=0.01)
    url = file_url(str(docs / "index.md"))
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": url})

    async def main() -> None:
        fetcher = Fetcher(settings, transport=httpx.MockTransport(handler))
        try:
            page = await fetcher.fetch(url)
            assert page.status == 200 and b"gadget docs" in page.body
            assert (await fetcher.fetch(url, etag=page.etag)).not_modified
            assert seen == []  # no robots.txt, no HTTP at all
            with pytest.raises(FetchFailed) as info:
                await fetcher.fetch("https://docs.example/page")
            assert info.value.error_class == "forbidden_address"
            assert "redirects to" in str(info.value)
        finally:
            await fetcher.aclose()

    asyncio.run(main())


# --- the HTTP API and the schema -------------------------------------------------------------


def test_the_webhook_server_refuses_file_urls() -> None:
    from ops.webhooks import check_url, plan_urls

    for url in ("file:///etc/passwd", "FILE://localhost/etc/passwd"):
        with pytest.raises(BadRequest, match="only http and https"):
            check_url(url, "urls[0]")
        with pytest.raises(BadRequest):
            plan_urls({"urls": [url]})


def test_the_urls_schema_takes_file_urls() -> None:
    req = decode_url(encode_url(UrlRequest(url="file:///srv/docs/a.md", source="cli")))
    assert req.url == "file:///srv/docs/a.md"


# --- expanding a folder ----------------------------------------------------------------------


def test_a_folder_expands_to_the_files_the_extractor_reads(docs: Path, tmp_path: Path) -> None:
    (docs / "manual.pdf").write_bytes(make_pdf(["x"]))
    (docs / "logo.png").write_bytes(b"\x89PNG")
    (docs / ".hidden.md").write_text("hidden")
    (docs / ".git").mkdir()
    (docs / ".git" / "HEAD.md").write_text("not docs")
    (docs / "my notes.md").write_text("spaces")
    (tmp_path / "outside.md").write_text("outside")
    (docs / "link.md").symlink_to(tmp_path / "outside.md")
    found = expand([str(docs)], policy_for(docs))
    assert found.urls == [
        file_url(str(docs / name))
        for name in ("index.md", "manual.pdf", "my notes.md", "notes.txt", "guide/setup.rst")
    ]
    assert "my%20notes.md" in found.urls[2]
    assert found.skipped == 4  # .git, .hidden.md, link.md, logo.png
    # a file named on its own is taken whatever its suffix; duplicates go
    one = expand([str(docs / "logo.png"), str(docs / "notes.txt"), str(docs)], policy_for(docs))
    assert one.urls[:2] == [file_url(str(docs / "logo.png")), file_url(str(docs / "notes.txt"))]
    assert len(one.urls) == 6


def test_a_folder_the_policy_refuses_fails_naming_the_setting(docs: Path) -> None:
    for policy in (AddressPolicy(), policy_for(docs / "guide")):
        with pytest.raises(ConfigError) as info:
            expand([str(docs)], policy)
        assert f"add file://{docs} to RAGSTREAM_FETCH_ALLOW" in str(info.value)


def test_which_arguments_are_local_paths(docs: Path) -> None:
    assert is_local_path(str(docs)) and is_local_path(str(docs / "index.md"))
    assert not is_local_path(str(docs / "missing"))
    assert not is_local_path("https://example.org/")
    assert not is_local_path("-")


def test_cli_publish_of_a_refused_folder_fails_before_kafka(
    docs: Path,
    unit_settings: Settings,
    cli_environ: Callable[[Settings], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ragstream.cli import main

    cli_environ(unit_settings)  # 127.0.0.1 only; its broker is the discard port
    assert main(["publish", str(docs)]) == 2
    err = capsys.readouterr().err
    assert "RAGSTREAM_FETCH_ALLOW" in err and f"file://{docs}" in err


# --- end to end: the real worker, broker and Milvus -------------------------------------------

PDF_TEXT = [
    "The flux capacitor needs 1.21 gigawatts of power to work.\nLightning is one source.",
    "Chapter two: the time circuits are set with the keypad.",
]
FILES = {
    "index.md": "# Gadgets\n\nThe gadget catalogue lists every gadget we sell.\n",
    "guide/setup.rst": "Setup\n=====\n\nPlug the gadget into a wall socket and wait.\n",
    "notes.txt": "Release notes: version two fixes the blinking light.\n",
}


@pytest.mark.kafka
def test_publish_a_folder_then_search_its_pdf_and_publish_it_again_for_free(
    settings: Settings,
    tmp_path: Path,
    cli_environ: Callable[[Settings], None],
    capsys: pytest.CaptureFixture[str],
    chunker: Chunker,
) -> None:
    from ragstream.cli import main

    root = tmp_path / "checkout" / "docs"
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "manual.pdf").write_bytes(make_pdf(PDF_TEXT, title="Time Machine Manual"))
    # hostile ones beside it: dead letters that name why, the others indexed all the same
    (root / "locked.pdf").write_bytes(make_pdf(["the secret plans"], password="hunter2"))
    (root / "pages.pdf").write_bytes(pdf_many_pages(MAX_PDF_PAGES + 5))
    s = settings.model_copy(update={"fetch_allow": f"127.0.0.1/32,file://{root}"})
    cli_environ(s)
    worker = Worker(s)
    try:
        assert main(["publish", str(root), "--wait", "--timeout", "300"]) == 1, worker.tail()
        first = capsys.readouterr()
        assert worker.alive(), worker.tail()
        rows = milvus_rows(s, ("id", "url", "text", "section", "title"))
        assert main(["search", "how much power does the flux capacitor need", "--json"]) == 0
        hits = orjson.loads(capsys.readouterr().out)["hits"]
        # again, nothing changed: fetched, found unmodified, nothing embedded or written
        assert main(["publish", str(root), "--wait", "--timeout", "300"]) == 1, worker.tail()
        again = capsys.readouterr()
    finally:
        worker.stop()
    assert "found 6 files" in first.err
    assert "published 6 URLs" in first.out
    assert f"  fetch too_large: 1  (e.g. PDF has more than {MAX_PDF_PAGES} pages" in first.out, (
        first.out
    )
    assert "  fetch unsupported_content: 1  (e.g. encrypted PDF" in first.out, first.out
    urls = {r["url"] for r in rows}
    assert urls == {file_url(str(root / n)) for n in [*FILES, "manual.pdf"]}, rows
    pdf_url = file_url(str(root / "manual.pdf"))
    pdf = sorted((r for r in rows if r["url"] == pdf_url), key=lambda r: r["id"])
    body = (root / "manual.pdf").read_bytes()
    assert [(r["section"], r["text"]) for r in pdf] == chunk_document(
        body, "application/pdf", pdf_url, chunker
    )
    assert {r["title"] for r in pdf} == {"Time Machine Manual"}
    # two short pages share a chunk, each under its page heading
    assert "Page 1\nThe flux capacitor needs 1.21 gigawatts" in pdf[0]["text"]
    assert "Page 2\nChapter two" in pdf[0]["text"]
    assert hits[0]["url"] == file_url(str(root / "manual.pdf")), hits
    assert "1.21 gigawatts" in hits[0]["text"]
    assert "chunks:          0" in again.out, again.out
    assert "vectors written: 0" in again.out, again.out
    assert "pages fetched:   4" in again.out, again.out  # and the 2 hostile ones failed again
