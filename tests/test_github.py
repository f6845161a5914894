"""``publish --github``: the pure rules (streams/github.py), the API client against a local
fake that enforces GitHub's limits (tests/fake_github.py), and the whole way to Milvus.

The client tests wait for real (the fake's window is a second or two), so the waits they
check are the waits the code would do against GitHub, only shorter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import ops.github
from agents.fetcher import Fetcher
from ops.github import list_repo, listing_requests
from ops.webhooks import plan_push
from streams.errors import ConfigError, Unavailable
from streams.github import (
    RESET_SLACK_S,
    RateHeaders,
    file_request,
    pace_s,
    parse_repo,
    rate_headers,
    rate_limit_wait,
    raw_auth_headers,
    raw_url,
    read_tree,
)
from streams.settings import Settings
from tests.fake_github import COMMIT, FakeGitHub

TOKEN = "ghp_s3cret-token-value"

# --- pure rules ---------------------------------------------------------------------------


def test_raw_url_quotes_each_segment() -> None:
    url = raw_url("https://raw.example/", "o/r", "feature/x y", "docs/a b#c?.txt")
    assert url == "https://raw.example/o/r/feature/x%20y/docs/a%20b%23c%3F.txt"


def test_a_listed_file_and_a_pushed_file_are_the_same_page(unit_settings: Settings) -> None:
    """The push webhook and --github must give one file one URL: the URL is the page's
    identity, so a push then replaces what a full ingestion indexed."""
    s = unit_settings.model_copy(update={"github_raw_base": "https://raw.example"})
    payload = {
        "ref": "refs/heads/main",
        "after": COMMIT,
        "repository": {"full_name": "o/r"},
        "commits": [{"added": ["docs/a b.txt"], "removed": [], "modified": []}],
    }
    pushed = plan_push(payload, s).requests[0]
    listed = file_request(s.github_raw_base, "o/r", "main", "docs/a b.txt", commit=COMMIT)
    assert pushed.url == listed.url
    assert pushed.metadata == {**(listed.metadata or {}), "ref": "refs/heads/main"}
    assert pushed.source == listed.source == "github"


@pytest.mark.parametrize(
    ("value", "ok"),
    [("django/django", True), ("o/r.git", True), ("a-b/c.d_e", True),
     ("https://github.com/o/r", False), ("o", False), ("o/r/x", False), ("o/..", False),
     ("-o/r", False)],
)  # fmt: skip
def test_parse_repo(value: str, ok: bool) -> None:
    if ok:
        assert parse_repo(value) == value.removesuffix(".git")
    else:
        with pytest.raises(ConfigError, match="OWNER/REPO"):
            parse_repo(value)


NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        # primary: Remaining 0 -> until the reset (plus slack), 403 or 429
        (403, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(NOW) + 30)}, "",
         (30 + RESET_SLACK_S, "primary")),
        (429, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW) - 5)}, "",
         (RESET_SLACK_S, "primary")),
        # secondary: Retry-After wins over everything
        (429, {"Retry-After": "7", "X-RateLimit-Remaining": "0",
               "X-RateLimit-Reset": str(int(NOW) + 99)}, "", (7.0, "secondary")),
        (403, {"Retry-After": "3"}, "", (3.0, "secondary")),
        # secondary without headers: the backoff step
        (429, {}, "", (60.0, "secondary")),
        (403, {}, '{"message": "You have exceeded a secondary rate limit"}', (60.0, "secondary")),
        (403, {"Retry-After": "soon"}, "Rate Limit", (60.0, "secondary")),
        # not a rate limit: a permission problem, or not a refusal at all
        (403, {"X-RateLimit-Remaining": "4999"}, '{"message": "Resource not accessible"}', None),
        (404, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"}, "", None),
        (200, {"Retry-After": "5"}, "", None),
    ],
)  # fmt: skip
def test_rate_limit_wait(
    status: int, headers: dict[str, str], body: str, expected: tuple[float, str] | None
) -> None:
    wait = rate_limit_wait(status, headers, body, NOW, backoff_s=60.0)
    assert (None if wait is None else (wait.seconds, wait.kind)) == expected


def test_rate_headers_ignore_junk() -> None:
    assert rate_headers({"X-RateLimit-Remaining": "-1", "X-RateLimit-Reset": "nan"}) == (
        RateHeaders(None, None, None)
    )
    assert rate_headers({"X-RATELIMIT-REMAINING": "12", "Retry-After": " 4 "}) == RateHeaders(
        12, None, 4.0
    )


def test_pace() -> None:
    low = RateHeaders(remaining=3, reset=NOW + 40)
    assert pace_s(low, NOW, below=20) == 10.0  # 40 s over the 3 left + the one being sent
    assert pace_s(low, NOW, below=3) == 0.0  # not below the threshold
    assert pace_s(low, NOW, below=0) == 0.0  # pacing off
    assert pace_s(RateHeaders(remaining=0, reset=NOW - 1), NOW, below=5) == 0.0
    assert pace_s(RateHeaders(), NOW, below=20) == 0.0  # no headers (Enterprise without limits)


def test_read_tree_keeps_blobs_only() -> None:
    payload = {
        "tree": [
            {"path": "a.txt", "type": "blob", "mode": "100644", "sha": "1"},
            {"path": "link", "type": "blob", "mode": "120000", "sha": "2"},
            {"path": "vendor", "type": "commit", "mode": "160000", "sha": "3"},
            {"path": "docs", "type": "tree", "mode": "040000", "sha": "4"},
            {"type": "blob"},
        ],
        "truncated": True,
    }
    page = read_tree(payload, "x/")
    assert page.files == ["x/a.txt"]
    assert page.subtrees == [("x/docs", "4")]
    assert page.truncated
    with pytest.raises(ConfigError):
        read_tree({"message": "Not Found"})


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("https://raw.example/o/r/main/a.txt", True),
        ("https://RAW.example:443/o/r/main/a.txt", True),
        ("http://raw.example/o/r/main/a.txt", False),  # another scheme: in clear text
        ("https://raw.example:8443/o/r/main/a.txt", False),  # another port: another server
        ("https://raw.example.evil/o/r/main/a.txt", False),
        ("https://evil.example/raw.example/o/r", False),
    ],
)
def test_raw_auth_only_for_the_raw_host(url: str, sent: bool) -> None:
    headers = raw_auth_headers(url, "https://raw.example", TOKEN)
    assert headers == ({"Authorization": f"token {TOKEN}"} if sent else {})
    assert raw_auth_headers(url, "https://raw.example", "") == {}


def test_raw_auth_respects_the_base_path() -> None:
    base = "https://ghe.example/raw"
    assert raw_auth_headers("https://ghe.example/raw/o/r/main/a", base, TOKEN)
    assert not raw_auth_headers("https://ghe.example/api/v3/x", base, TOKEN)
    assert not raw_auth_headers("https://ghe.example/rawx/o/r", base, TOKEN)


# --- the client against the fake ----------------------------------------------------------


def repo_files() -> dict[str, bytes]:
    """~30 files in nested directories, text and not."""
    files: dict[str, bytes] = {"README.md": b"# Read me\n", "setup.py": b"print()\n"}
    for i in range(8):
        files[f"docs/topic{i}.txt"] = f"Topic {i}: the widget number {i} turns.\n".encode()
    for i in range(6):
        files[f"docs/guide/part{i}/page.txt"] = f"Guide part {i} explains gear {i}.\n".encode()
    for i in range(5):
        files[f"docs/ref/api{i}.rst"] = f"API {i}\n=====\n".encode()
    for i in range(5):
        files[f"src/mod{i}/notes.txt"] = f"Module {i} notes.\n".encode()
    files["docs/img/logo.png"] = b"\x89PNG\r\n"
    return files


GLOB = "docs/**/*.txt"


def matching(files: dict[str, bytes]) -> list[str]:
    return sorted(p for p in files if p.startswith("docs/") and p.endswith(".txt"))


def gh_settings(settings: Settings, fake: FakeGitHub, **kw: object) -> Settings:
    values = {
        "github_api": fake.api,
        "github_raw_base": fake.raw,
        "github_backoff_s": 0.2,
        "github_max_wait_s": 60.0,
        "github_pace_below": 0,
        **kw,
    }
    return settings.model_copy(update=values)


def test_listing_under_every_limit_loses_nothing(unit_settings: Settings) -> None:
    """Primary limit (4 per 2 s window), secondary (every 5th: 429 + Retry-After) and a
    truncated recursive tree at once: every matching file is listed, no request is sent
    while the fake says the limit is spent, and the waits are reported."""
    files = repo_files()
    messages: list[str] = []
    fake = FakeGitHub(files, limit=6, window_s=1.0, secondary_every=5, truncate_above=10)
    with fake:
        s = gh_settings(unit_settings, fake)
        listing = asyncio.run(list_repo(s, "owner/repo", None, [GLOB], say=messages.append))
    assert listing.files == matching(files)
    assert listing.ref == "main" and listing.commit == COMMIT
    assert listing.blobs == len(files)
    assert fake.stats["truncated"] >= 2 and fake.stats["primary"] >= 1
    assert fake.stats["secondary"] >= 1
    assert fake.stats["early"] == 0, fake.stats  # never sent into a closed window
    assert listing.waited_s > 0 and listing.requests == fake.stats["api"]
    text = "\n".join(messages)
    assert "GitHub primary rate limit: waiting" in text and ", until " in text
    assert "GitHub secondary rate limit: waiting 1s" in text
    assert "truncated the tree" in text


def test_a_truncated_tree_is_walked_by_directory(unit_settings: Settings) -> None:
    """The recursive answer the fake gives lists half the entries: taken as it is, files
    would be lost (the first assertion shows how many)."""
    files = repo_files()
    with FakeGitHub(files, truncate_above=10) as fake:
        s = gh_settings(unit_settings, fake)
        resp = httpx.get(f"{fake.api}/repos/owner/repo/git/trees/{fake.root}?recursive=1")
        naive = [p for p in read_tree(resp.json()).files if p in matching(files)]
        assert len(naive) < len(matching(files))
        listing = asyncio.run(list_repo(s, "owner/repo", "v1", [GLOB]))
    assert listing.files == matching(files) and listing.ref == "v1"
    # only the directories GitHub cut are read one level at a time: src/ (10 entries, whole
    # in one recursive answer) costs one request, not one per directory
    directories = {p.rsplit("/", 1)[0] for p in files if "/" in p}
    directories |= {d.rsplit("/", i)[0] for d in directories for i in range(1, d.count("/") + 1)}
    assert fake.stats["trees"] - 1 < 1 + len(directories), (fake.stats, directories)


def test_without_waiting_the_listing_fails(
    unit_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same fake without the waiting rule: the first refusal ends the command (a
    lister that skipped what was refused would lose files instead)."""
    monkeypatch.setattr(ops.github, "rate_limit_wait", lambda *a, **k: None)
    with FakeGitHub(repo_files(), limit=2, window_s=2.0) as fake:
        s = gh_settings(unit_settings, fake)
        with pytest.raises(ConfigError, match="403 .API rate limit exceeded"):
            asyncio.run(list_repo(s, "owner/repo", None, [GLOB]))


def test_the_wait_is_bounded(unit_settings: Settings) -> None:
    with FakeGitHub(repo_files(), limit=2, window_s=30.0) as fake:
        s = gh_settings(unit_settings, fake, github_max_wait_s=5.0)
        with pytest.raises(Unavailable, match="RAGSTREAM_GITHUB_MAX_WAIT_S .5s") as info:
            asyncio.run(list_repo(s, "owner/repo", None, [GLOB]))
    assert "nothing was published" in str(info.value)
    assert fake.stats["api"] == 3  # two answered, one refused, then no more


def test_secondary_limit_without_headers_backs_off_doubling(unit_settings: Settings) -> None:
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    with FakeGitHub(
        repo_files(), secondary_every=2, secondary_headers=False, secondary_times=3
    ) as fake:
        s = gh_settings(unit_settings, fake, github_backoff_s=0.5)
        listing = asyncio.run(list_repo(s, "owner/repo", None, [GLOB], sleep=sleep))
    assert listing.files == matching(repo_files())
    assert sleeps[:3] == [0.5, 1.0, 2.0]  # one request refused after another: doubling


def test_pacing_spreads_the_last_requests(unit_settings: Settings) -> None:
    """With few requests left, the client spaces them out to the reset and never meets the
    limit; the same listing unpaced runs into it (and waits it out)."""
    refused = {}
    for below in (0, 10):
        with FakeGitHub(repo_files(), limit=2, window_s=1.0) as fake:
            s = gh_settings(unit_settings, fake, github_pace_below=below)
            listing = asyncio.run(list_repo(s, "owner/repo", None, [GLOB]))
        assert listing.files == matching(repo_files())
        assert fake.stats["early"] == 0
        refused[below] = fake.stats["primary"]
    assert refused[0] >= 1 and refused[10] == 0, refused


def test_server_errors_are_retried_then_unavailable(unit_settings: Settings) -> None:
    answers: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        status = 502 if len(answers) < 2 or "nope" in request.url.path else 200
        answers.append(status)
        if request.url.path.endswith("/commits/main"):
            return httpx.Response(status, json={"sha": COMMIT, "commit": {"tree": {"sha": "t"}}})
        return httpx.Response(status, json={"tree": [{"path": "docs/a.txt", "type": "blob"}]})

    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    s = unit_settings.model_copy(update={"github_api": "https://api.example"})
    transport = httpx.MockTransport(handler)
    listing = asyncio.run(list_repo(s, "o/r", "main", ["**/*"], transport=transport, sleep=sleep))
    assert listing.files == ["docs/a.txt"] and answers == [502, 502, 200, 200]
    assert sleeps == [1.0, 2.0] and listing.waited_s == 0  # not rate limits
    answers.clear()
    with pytest.raises(Unavailable, match="HTTP 502 for /repos/o/r/commits/nope, 5 times"):
        asyncio.run(list_repo(s, "o/r", "nope", ["**/*"], transport=transport, sleep=sleep))
    assert len(answers) == 5


def test_token_goes_to_the_api_and_never_into_messages(
    unit_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    messages: list[str] = []
    caplog.set_level(logging.DEBUG)
    with FakeGitHub(repo_files(), token=TOKEN, limit=3, window_s=1.0) as fake:
        s = gh_settings(unit_settings, fake)
        with pytest.raises(ConfigError, match="401 .Bad credentials.*GITHUB_TOKEN"):
            asyncio.run(list_repo(s, "owner/repo", None, [GLOB]))
        s = gh_settings(unit_settings, fake, github_token=TOKEN)
        listing = asyncio.run(list_repo(s, "owner/repo", None, [GLOB], say=messages.append))
    assert listing.files == matching(repo_files())
    assert fake.api_auth[-1] == f"Bearer {TOKEN}"
    assert TOKEN not in "\n".join(messages) + caplog.text


def test_unknown_ref_and_repo_are_errors(unit_settings: Settings) -> None:
    with FakeGitHub(repo_files()) as fake:
        s = gh_settings(unit_settings, fake)
        with pytest.raises(ConfigError, match="422"):
            asyncio.run(list_repo(s, "owner/repo", "nope", [GLOB]))
        with pytest.raises(ConfigError, match="404.*GITHUB_TOKEN"):
            asyncio.run(list_repo(s, "owner/other", None, [GLOB]))


def test_listing_requests_name_the_ref_and_record_the_commit(unit_settings: Settings) -> None:
    with FakeGitHub(repo_files()) as fake:
        s = gh_settings(unit_settings, fake)
        listing = asyncio.run(list_repo(s, "owner/repo", None, ["docs/*.txt"]))
    reqs = listing_requests(s, listing)
    assert [r.url for r in reqs] == [f"{fake.raw}/owner/repo/main/{p}" for p in listing.files]
    assert len(reqs) == 8 and not any(r.delete or r.force for r in reqs)
    assert all(r.delete for r in listing_requests(s, listing, delete=True))
    assert reqs[0].metadata == {
        "repository": "owner/repo", "ref": "main", "commit": COMMIT, "path": "docs/topic0.txt"
    }  # fmt: skip


# --- the fetch stage and private raw files ------------------------------------------------


def test_fetcher_sends_the_token_to_the_raw_host_only(unit_settings: Settings) -> None:
    """A private repository's raw files need the token; a redirect elsewhere must not get
    it (each hop is asked separately)."""
    seen: dict[str, str | None] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[str(request.url)] = request.headers.get("authorization")
        if request.url.path.endswith("robots.txt"):
            return httpx.Response(404)
        if request.url.host == "raw.example" and request.url.path.endswith("moved.txt"):
            return httpx.Response(302, headers={"Location": "https://other.example/x.txt"})
        return httpx.Response(200, text="hello", headers={"Content-Type": "text/plain"})

    s = unit_settings.model_copy(
        update={"github_raw_base": "https://raw.example", "github_token": TOKEN}
    )

    async def go() -> None:
        fetcher = Fetcher(s, transport=httpx.MockTransport(handler))
        try:
            await fetcher.fetch("https://raw.example/o/r/main/a.txt")
            await fetcher.fetch("https://raw.example/o/r/main/moved.txt")
            await fetcher.fetch("https://elsewhere.example/b.txt")
        finally:
            await fetcher.aclose()

    asyncio.run(go())
    assert seen["https://raw.example/o/r/main/a.txt"] == f"token {TOKEN}"
    assert seen["https://raw.example/o/r/main/moved.txt"] == f"token {TOKEN}"
    assert seen["https://other.example/x.txt"] is None
    assert seen["https://elsewhere.example/b.txt"] is None


# --- the whole way ------------------------------------------------------------------------


@pytest.mark.kafka
def test_publish_github_indexes_every_matching_file(
    settings: Settings,
    cli_environ: Callable[[Settings], None],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """``ragstream publish --github owner/repo --glob ... --wait`` against the fake under
    its primary and secondary limits, with a truncated tree and a private repository: every
    matching file's chunks are in Milvus, no other file's."""
    from ragstream.cli import main
    from tests.helpers import Worker, milvus_rows

    files = repo_files()
    fake = FakeGitHub(
        files, limit=3, window_s=2.0, secondary_every=4, truncate_above=10, token=TOKEN
    )
    with fake:
        s = gh_settings(settings, fake, github_token=TOKEN)
        cli_environ(s)
        worker = Worker(s)
        try:
            status = main(
                ["publish", "--github", "owner/repo", "--glob", GLOB, "--wait", "--timeout", "300"]
            )
            assert worker.alive(), worker.tail()
        finally:
            worker.stop()
    out, err = capsys.readouterr()
    expected = matching(files)
    assert status == 0, (out, err, worker.tail())
    assert f"{len(expected)} of {len(files)} files match" in err
    assert "rate limit: waiting" in err
    assert fake.stats["primary"] >= 1 and fake.stats["secondary"] >= 1
    assert fake.stats["early"] == 0
    assert f"published {len(expected)} URLs" in out
    rows = milvus_rows(s, ("id", "text", "url"))
    urls = {r["url"] for r in rows}
    assert urls == {f"{fake.raw}/owner/repo/main/{p}" for p in expected}
    texts = "\n".join(r["text"] for r in rows)
    for path in expected:
        assert files[path].decode().strip() in texts, path
    assert "Module 0 notes" not in texts and "API 0" not in texts


def test_cli_refusals(
    unit_settings: Settings,
    cli_environ: Callable[[Settings], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What the command refuses, as one line and exit status 2, before anything is sent
    to Kafka (``unit_settings`` point at no broker)."""
    from ragstream.cli import main

    with FakeGitHub(repo_files()) as fake:
        cli_environ(gh_settings(unit_settings, fake))
        cases = [
            (["--github", "owner/repo", "https://example.org/"], "a repository alone"),
            (["--github", "https://github.com/owner/repo"], "OWNER/REPO"),
            (["--github", "owner/missing"], "404"),
            (["--github", "owner/repo", "--glob", "*.none"], "no file of owner/repo@main"),
        ]
        for argv, message in cases:
            assert main(["publish", *argv]) == 2, argv
            assert message in capsys.readouterr().err, argv
