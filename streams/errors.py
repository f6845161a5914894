"""Every exception ragstream raises on purpose, in one tree.

Why one tree: a caller decides what to do with a failure by its branch, not by its name.
A stage dead-letters an :class:`InputError` and goes on; it waits out an
:class:`Unavailable` (or exits so that the consumer group redelivers); a
:class:`ConfigError` needs a person. The CLI turns the tree into one line and an exit status
in one place (``ragstream/cli/__init__.py``).

    RagstreamError                  anything below; the CLI prints its message as one line
    ├── ConfigError                 a setting, argument or environment that cannot work
    │   ├── InvalidTime             a time that is neither ISO 8601 nor a duration (2h)
    │   └── KafkaRefused            the broker refused our credentials or TLS handshake
    ├── Unavailable                 a service is not there now; retrying may heal it
    │   ├── KafkaUnavailable        the broker cannot be reached or did not acknowledge
    │   ├── StoreUnavailable        Milvus cannot be opened or written now
    │   └── ExtractUnavailable      no extraction child process can start
    ├── InputError                  one input (message, page, request) that will not be
    │   │                           processed as it is; ``error_class`` names its dead letter
    │   ├── DecodeError             a message that is not JSON or not its schema
    │   ├── PageRefused             a page that will not be indexed
    │   │   ├── UnsupportedContent  not text we can index
    │   │   ├── PageTooLarge        more text than RAGSTREAM_EXTRACT_MAX_CHARS
    │   │   ├── PageTooDeep         HTML nested deeper than RAGSTREAM_EXTRACT_MAX_DEPTH
    │   │   ├── TooManyChunks       more chunks than RAGSTREAM_CHUNK_MAX_PER_PAGE
    │   │   └── ExtractTimeout      extraction ran past RAGSTREAM_EXTRACT_DEADLINE_S
    │   ├── FetchFailed             the page could not be had (``transient``: try later)
    │   ├── ForbiddenAddress        the host resolves to an address the policy refuses
    │   ├── TooLarge                a message over its topic's size limit
    │   ├── SchemaMismatch          a vector that does not fit the collection
    │   ├── SitemapError            a sitemap that cannot be read
    │   └── BadRequest              a webhook request whose content is wrong (HTTP 400)
    └── Rejected                    a webhook request refused with an HTTP status

Errors of other libraries (aiokafka, pymilvus, httpx) are translated at the one boundary
that talks to them (``streams/kafka.py``, ``streams/store.py``, ``agents/fetcher.py``) and
nowhere else.
"""

from __future__ import annotations


class RagstreamError(Exception):
    """Printed by the CLI as one line (``ragstream: error: ...``)."""


# --- needs a person -------------------------------------------------------------------------


class ConfigError(RagstreamError):
    """A setting, argument or environment that cannot work: fix it and run again."""


class InvalidTime(ConfigError, ValueError):
    """A time argument (``--since``, ``--to-datetime``) in neither accepted form (see
    ``streams/timeparse.py``). A ``ValueError`` too, so argparse converters pass it on."""


class KafkaRefused(ConfigError):
    """The broker answered but refused the connection: wrong credentials, a SASL mechanism
    it does not offer, or a TLS certificate that does not verify. Waiting will not heal it
    (a stage must not retry it forever as if the broker were away): a setting is wrong."""


# --- a service is away ----------------------------------------------------------------------


class Unavailable(RagstreamError):
    """A service ragstream depends on is not there now. Waiting may heal it, so a stage
    retries (or exits and lets the group redeliver); nothing is dead-lettered for it."""

    retriable = True


class KafkaUnavailable(Unavailable):
    """The broker cannot be reached, or did not acknowledge in time."""


class StoreUnavailable(Unavailable):
    """Milvus cannot be opened or written now; the caller retries (it is not the data)."""


class ExtractUnavailable(Unavailable):
    """No extraction child process could be started: the stage is broken, not the page."""


# --- one input ------------------------------------------------------------------------------


class InputError(RagstreamError):
    """One input that will not be processed as it is. Its ``error_class`` is the class of
    its dead letter (docs/dead-letters.md lists them); the stage sends it there and goes on.
    """

    error_class = "input"


class DecodeError(InputError, ValueError):
    """A message that cannot be used: ``error_class`` is ``decode`` (not JSON) or ``schema``."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class PageRefused(InputError, ValueError):
    """A page that will not be indexed, and why: ``error_class`` is its dead-letter class.

    A ``ValueError`` so a caller that dead-letters bad input catches it with the rest; the
    subclasses are the documented ways a page is refused (the fuzz test allows no other).
    """

    error_class = "extract"


class UnsupportedContent(PageRefused):
    """The body is not text we can index (an image, a PDF, an opaque binary...)."""

    error_class = "unsupported_content"


class PageTooLarge(PageRefused):
    """The extracted text is longer than the limit (``RAGSTREAM_EXTRACT_MAX_CHARS``)."""

    error_class = "too_large"


class PageTooDeep(PageRefused):
    """The HTML nests elements deeper than the limit (``RAGSTREAM_EXTRACT_MAX_DEPTH``)."""

    error_class = "too_deep"


class TooManyChunks(PageRefused):
    """The page would make more chunks than the limit (``RAGSTREAM_CHUNK_MAX_PER_PAGE``)."""

    error_class = "too_many_chunks"


class ExtractTimeout(PageRefused):
    """Extracting and chunking the page took longer than ``RAGSTREAM_EXTRACT_DEADLINE_S``."""

    error_class = "extract_timeout"


class FetchFailed(InputError):
    """The page could not be had after ``attempts`` tries; ``error_class`` says why.

    ``transient`` failures may heal by themselves (retry later); the others will not.
    ``status`` is the HTTP status of the last answer, when there was one.
    """

    def __init__(
        self,
        error_class: str,
        message: str,
        attempts: int = 1,
        *,
        transient: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.attempts = attempts
        self.transient = transient
        self.status = status


class ForbiddenAddress(InputError):
    """The host resolved to an address the policy refuses; nothing was sent to it."""

    error_class = "forbidden_address"


class TooLarge(InputError):
    """A message over its topic's limit: it can never be produced."""

    error_class = "too_large"

    def __init__(self, topic: str, size: int, limit: int, what: str = "message") -> None:
        super().__init__(
            f"{what} of {size} bytes for {topic} is over the topic's limit of {limit} bytes"
        )
        self.topic, self.size, self.limit = topic, size, limit


class SchemaMismatch(InputError, ValueError):
    """A vector that does not fit the collection (another model or dimension)."""

    error_class = "schema_mismatch"


class SitemapError(InputError):
    """A sitemap that cannot be read or is not a sitemap; the message names it and why."""

    error_class = "sitemap"


class BadRequest(InputError, ValueError):
    """A webhook request whose content is wrong; the message goes back to the caller (400)."""

    error_class = "bad_request"


class Rejected(RagstreamError):
    """A webhook request refused before anything was published; answered with ``status``
    and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
