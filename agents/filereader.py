"""Local files for the fetch stage: ``file://`` URLs read from disk, within the fetch policy.

So a team can index a checkout without a web server (``ragstream publish ./docs``). A file
URL is as untrusted as any other (the ``urls`` topic is writable by more than the CLI), so:

- only under a directory the allow list names (``file:///srv/docs`` in
  ``RAGSTREAM_FETCH_ALLOW``; off by default), judged first on the URL as written
  (``AddressPolicy.file_refusal``: no ``..``, no host) and then on where the path really
  leads: its ``realpath`` must still be under the real allowed directory, so a symlink
  cannot lead out; the file is opened without following a last symlink swapped in since,
  and the descriptor's own path (``/proc/self/fd``) is checked again;
- only regular files: a directory, device, FIFO or socket is refused before it is opened
  (opening a FIFO could block, opening a device could act);
- bounded like a download: ``fetch_max_bytes`` at most, read within ``fetch_deadline_s``
  in a thread (a hung network file system holds the thread, not the event loop).

No robots.txt or politeness: there is no server. A file's validator is its modification
time and size, sent as an ETag-like value: the fetch stage hands back the one it kept, and
an unchanged file is ``304`` (not re-read, not re-embedded). A missing file is ``404``:
the page is gone and its chunks are dropped.
"""

from __future__ import annotations

import email.utils
import os
import posixpath
import stat

from agents.fetcher import Page
from streams.errors import FetchFailed
from streams.extract import FILE_TYPES
from streams.netpolicy import AddressPolicy, file_path, is_under

#: Where Linux shows the path an open descriptor really names.
_FD_PATH = "/proc/self/fd/{}"
_READ_BLOCK = 1 << 20


def validator(st: os.stat_result) -> str:
    """The ETag-like validator of a file: changes whenever its content is rewritten."""
    return f'"file-{st.st_mtime_ns:x}-{st.st_size:x}"'


def content_type(path: str) -> str | None:
    """The content type of a file by its suffix (None: the extractor sniffs the bytes)."""
    return FILE_TYPES.get(posixpath.splitext(path)[1].lower())


def _refuse(error_class: str, message: str) -> FetchFailed:
    return FetchFailed(error_class, message)


def read_local(url: str, policy: AddressPolicy, max_bytes: int, etag: str | None = None) -> Page:
    """The file a ``file://`` URL names, as a fetched page (``304`` when ``etag`` still
    matches, ``404`` when it is missing); otherwise ``FetchFailed``: ``forbidden_path``
    (outside the allowed directories), ``not_a_file``, ``too_large``, ``unreadable``.
    Blocking: run it in a thread."""
    refusal = policy.file_refusal(url)
    if refusal is not None:
        raise _refuse("forbidden_path", refusal)
    path = file_path(url)
    real = os.path.realpath(path)
    roots = tuple(os.path.realpath(r) for r in policy.file_roots)
    if not is_under(real, roots):
        raise _refuse("forbidden_path", f"{url}: leads to {real}, outside the allowed directories")
    try:
        before = os.stat(real, follow_symlinks=False)
    except FileNotFoundError:
        return Page(url=url, status=404, body=b"", content_type=None)
    except OSError as exc:
        raise _refuse("unreadable", f"{url}: {exc.strerror}") from None
    if not stat.S_ISREG(before.st_mode):
        raise _refuse("not_a_file", f"{url}: not a regular file (a directory, device or FIFO)")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Page(url=url, status=404, body=b"", content_type=None)
    except OSError as exc:  # ELOOP: a symlink swapped in since realpath; EACCES...
        raise _refuse("unreadable", f"{url}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(st.st_mode):
            raise _refuse("forbidden_path", f"{url}: replaced while being opened")
        with_fd = _FD_PATH.format(fd)
        if os.path.exists(with_fd) and not is_under(os.readlink(with_fd), roots):
            raise _refuse("forbidden_path", f"{url}: opened outside the allowed directories")
        tag = validator(st)
        modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        if etag is not None and etag == tag:
            return Page(url, 304, b"", None, etag=tag, last_modified=modified)
        if st.st_size > max_bytes:
            raise _refuse("too_large", f"{url}: {st.st_size} bytes > {max_bytes}")
        parts: list[bytes] = []
        size = 0
        while block := os.read(fd, min(_READ_BLOCK, max_bytes + 1 - size)):
            parts.append(block)
            size += len(block)
            if size > max_bytes:  # grew since fstat
                raise _refuse("too_large", f"{url}: more than {max_bytes} bytes")
    except OSError as exc:
        raise _refuse("unreadable", f"{url}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return Page(
        url=url,
        status=200,
        body=b"".join(parts),
        content_type=content_type(path),
        etag=tag,
        last_modified=modified,
    )
