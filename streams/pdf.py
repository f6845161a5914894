"""PDF text, page by page, through pypdf: bounded, because a PDF is untrusted input too.

Why pypdf: pure Python (no C parser to crash the extraction child), BSD-licensed, actively
maintained, and it carries its own resource limits (``pypdf.Configuration``) for the classic
PDF attacks: page-tree cycles and depth, decompression bombs, huge arrays and dictionaries.
Those limits are tightened here to what one page of the index may cost; what they do not
cover (a slow but legal file) is bounded by the deadline of the extraction child that runs
this (``agents/extractor.py``), which is killed past ``extract_deadline_s``.

Pages stay structure: each page is one section (``Page N``), so a chunk says where in the
document its text sits (``Title › Page 3``) and search hits can be opened at that page.

Refusals are ``PageRefused`` errors, dead letters with a class: an encrypted PDF (one that
the empty password does not open) and a file pypdf cannot read are ``unsupported_content``
(the message says which), more than ``MAX_PDF_PAGES`` pages or more text than the page limit
is ``too_large``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from streams.errors import PageTooLarge, UnsupportedContent

if TYPE_CHECKING:
    from pypdf import Configuration

#: Most pages of one PDF: a book of 10,000 pages is a corpus, not a page; the cap also keeps
#: a page tree of millions of empty pages (a few bytes each) from costing the deadline.
MAX_PDF_PAGES = 10_000
#: Most bytes one stream of the file may inflate to (pypdf's default is 75 MB): no page of
#: text needs more, and a compression bomb stops here instead of in the child's memory.
MAX_STREAM_BYTES = 16 * 1024 * 1024
#: The start of every PDF file (after at most some junk: readers look in the first 1 KB).
MAGIC = b"%PDF-"


def looks_like_pdf(body: bytes) -> bool:
    """Whether ``body`` is a PDF by its magic number (servers often say octet-stream)."""
    return MAGIC in body[:1024]


def _limits() -> Configuration:
    """pypdf's configuration with the limits above (its other limits as they are)."""
    from pypdf import get_configuration

    return get_configuration().with_overwrites(
        **{
            "page_tree_maximum_page_entries": MAX_PDF_PAGES + 1,
            "zlib_maximum_output_length": MAX_STREAM_BYTES,
            "lzw_maximum_output_length": MAX_STREAM_BYTES,
            "run_length_maximum_output_length": MAX_STREAM_BYTES,
            "array_based_stream_maximum_output_length": MAX_STREAM_BYTES,
            "brotli_maximum_output_length": MAX_STREAM_BYTES,
            "jbig2_maximum_output_length": MAX_STREAM_BYTES,
            "image_maximum_buffer_size": MAX_STREAM_BYTES,
        }
    )


def pdf_pages(
    body: bytes,
    url: str,
    max_chars: int,
    clean: Callable[[str], str],
) -> tuple[str | None, list[str]]:
    """The document's ``/Title`` (``None`` if it names none) and the text of each page,
    each passed through ``clean`` (the caller's normalisation), pages without text kept as
    ``""`` so that page numbers stay true.

    Raises ``UnsupportedContent`` for an encrypted or unreadable file and ``PageTooLarge``
    past ``MAX_PDF_PAGES`` pages or ``max_chars`` characters of text in all (checked page by
    page, so a hostile file stops early).
    """
    import pypdf  # here, not at the top: only PDF pages pay for the import (70 ms)
    from pypdf.errors import FileNotDecryptedError, LimitReachedError, PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # a warning per broken object
    with pypdf.apply_configuration(_limits()):
        try:
            reader = pypdf.PdfReader(io.BytesIO(body), strict=False)
            if reader.is_encrypted and not reader.decrypt(""):
                raise UnsupportedContent(f"encrypted PDF (a password is needed): {url}")
            count = len(reader.pages)
            if count > MAX_PDF_PAGES:
                raise PageTooLarge(f"PDF has more than {MAX_PDF_PAGES} pages (the limit): {url}")
            pages: list[str] = []
            total = 0
            for page in reader.pages:
                text = clean(page.extract_text() or "")
                total += len(text)
                if total > max_chars:
                    raise PageTooLarge(
                        f"PDF text passes {max_chars} characters (the limit) by page "
                        f"{len(pages) + 1}"
                    )
                pages.append(text)
            title = _title(reader)
        except (FileNotDecryptedError, NotImplementedError) as exc:
            # NotImplementedError: an encryption scheme pypdf cannot open (needs a library)
            raise UnsupportedContent(f"encrypted PDF ({exc}): {url}") from None
        except LimitReachedError as exc:
            if "page entry" in str(exc):  # pypdf stopped counting pages at the cap
                raise PageTooLarge(
                    f"PDF has more than {MAX_PDF_PAGES} pages (the limit): {url}"
                ) from None
            raise PageTooLarge(f"PDF over a structural limit ({exc}): {url}") from None
        except (PageTooLarge, UnsupportedContent):
            raise
        except (
            PyPdfError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            IndexError,
            RecursionError,
        ) as exc:  # what pypdf raises on a broken file: the page's failure, named
            raise UnsupportedContent(
                f"unreadable PDF ({type(exc).__name__}: {str(exc)[:200]}): {url}"
            ) from None
    return title, pages


def _title(reader: object) -> str | None:
    """``/Title`` from the document information, or None (a broken one is no title)."""
    try:
        meta = getattr(reader, "metadata", None)
        title = meta.title if meta is not None else None
    except Exception:  # metadata is optional: a broken dictionary must not lose the text
        return None
    return str(title) if title else None
