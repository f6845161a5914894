"""``ragstream publish ./docs``: files on disk as ``file://`` URLs, for a checkout without a
web server.

The CLI turns each path argument that exists into the URLs of its files (a directory:
recursively, the suffixes the extractor knows, hidden files and directories such as
``.git`` skipped; a file named on its own: always). Nothing is read here: the fetch stage
reads each file (``agents/filereader.py``), where the fetch policy is enforced. The policy
is checked here as well, on this machine's settings, so that a folder the workers would
refuse fails at once, naming the setting to change, instead of as one dead letter per file.

Files removed from disk are not noticed by publishing the folder again (only what exists
is listed); ``ragstream publish --delete file:///...`` removes one, and a file URL published
again after its file is gone is dropped from the index (the fetch stage reads a 404).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from streams.errors import ConfigError
from streams.extract import FILE_TYPES
from streams.netpolicy import AddressPolicy, is_under

#: What a directory contributes: the files the extractor reads by their suffix.
SUFFIXES = frozenset(FILE_TYPES)


def is_local_path(arg: str) -> bool:
    """Whether a ``publish`` argument names a file or directory on disk (not a URL)."""
    return arg != "-" and "://" not in arg and os.path.exists(arg)


def file_url(path: str) -> str:
    """The ``file://`` URL of an absolute path (percent-encoded as URLs need)."""
    return Path(path).as_uri()


@dataclasses.dataclass(frozen=True, slots=True)
class LocalFiles:
    """The URLs of the files found, and what was passed over (hidden, other suffixes,
    symlinks leading out of the directory) as a count."""

    urls: list[str]
    skipped: int


def _walk(root: str) -> tuple[list[str], int]:
    """The files to publish under ``root`` (sorted, symlinked directories not followed)."""
    real_root = os.path.realpath(root)
    found: list[str] = []
    skipped = 0
    for here, dirs, files in os.walk(root, followlinks=False):
        hidden = [d for d in dirs if d.startswith(".")]
        skipped += len(hidden)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(here, name)
            if (
                name.startswith(".")
                or os.path.splitext(name)[1].lower() not in SUFFIXES
                or not os.path.isfile(path)
                or not is_under(os.path.realpath(path), (real_root,))
            ):
                skipped += 1
                continue
            found.append(path)
    return found, skipped


def expand(paths: list[str], policy: AddressPolicy) -> LocalFiles:
    """The ``file://`` URLs of ``paths`` (files and directories), in order, each once.

    Raises ``ConfigError`` when the fetch policy would refuse them, naming the
    ``RAGSTREAM_FETCH_ALLOW`` entry that would allow them.
    """
    urls: dict[str, None] = {}
    skipped = 0
    for arg in paths:
        top = os.path.abspath(arg)
        if os.path.isdir(top):
            files, passed = _walk(top)
            skipped += passed
        else:
            files = [top]
        for path in files:
            url = file_url(path)
            refusal = policy.file_refusal(url)
            if refusal is not None:
                folder = top if os.path.isdir(top) else os.path.dirname(top)
                raise ConfigError(
                    f"{arg}: the fetch policy refuses its files ({refusal}); to index it, "
                    f"add file://{folder} to RAGSTREAM_FETCH_ALLOW (comma-separated), for "
                    "this command and for the workers that fetch"
                )
            urls[url] = None
    return LocalFiles(list(urls), skipped)
