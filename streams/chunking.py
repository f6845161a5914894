"""Token-bounded chunks cut with the embedding model's own tokenizer.

Why tokens and not characters: the encoder silently truncates its input at its maximum
sequence length, so a chunk longer than that is embedded without its tail, and that text can
never be found. Counting with the model's own tokenizer is the only exact measure. For
all-MiniLM-L6-v2 that is 256 positions (``sentence_bert_config.json``), minus ``[CLS]`` and
``[SEP]``: 254 content tokens.

How: the whole document is tokenized once (a fast, Rust tokenizer with character offsets),
windows of ``max_tokens`` tokens are laid over the token sequence, and each window ends at the
best break in its last quarter: a blank line, else a sentence end, else a line end, else any
whitespace. Chunks are slices of the original text, so they are exact substrings of it
(``text[start:end]``), and consecutive chunks share ``overlap`` tokens of context. A slice can
re-tokenize differently from the same tokens inside the whole text (a word cut in the middle
starts a fresh word), so every chunk is re-counted and, if over budget, shortened.

Tokens are not the only bound: one token can hide megabytes (WordPiece maps any word over 100
characters to one ``[UNK]``; a whitespace run between two tokens belongs to no token), and a
chunk becomes a Kafka message and a Milvus VARCHAR. So every chunk is also at most
``max_chars`` characters and ``max_bytes`` UTF-8 bytes, by construction: a span over either
cap is cut again (at a blank line, line end or space in its second half, else after
punctuation, else anywhere), and each piece is still an exact substring of the text.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from streams.model import load_fast_tokenizer, model_input_limit, resolve_model_path

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["CHUNK_MAX_BYTES", "CHUNK_MAX_CHARS", "Chunker"]

#: Defaults of ``Settings.chunk_max_chars`` / ``chunk_max_bytes`` (a test keeps them equal).
#: 8192 BGE-M3 tokens of English are about 35,000 characters, of CJK about 37,000 bytes; 60,000
#: bytes stay under Milvus' 65,535-byte VARCHAR and, even if every byte were JSON-escaped to
#: two, a ``chunks`` or ``vectors`` message stays far below Kafka's 1 MB default.
CHUNK_MAX_CHARS = 48_000
CHUNK_MAX_BYTES = 60_000

log = logging.getLogger(__name__)

# Scores of a break before a token: higher is a better place to end a chunk.
_NONE = 0  # inside a word
_PUNCT = 1  # between tokens with no whitespace, at punctuation (``foo.bar``)
_SPACE = 2  # at whitespace
_LINE = 3  # at a line end
_SENTENCE = 4  # after ``.``, ``!``, ``?`` (and a closing quote or bracket) and whitespace
_PARAGRAPH = 5  # at a blank line

_WHITESPACE = np.array(
    sorted({ord(c) for c in map(chr, range(0x3000 + 1)) if c.isspace()}), dtype=np.uint32
)
_SENTENCE_ENDS = np.array([ord(c) for c in ".!?\u2026\u3002\uff01\uff1f"], dtype=np.uint32)
_CLOSERS = np.array([ord(c) for c in ")]}\"'\u201d\u2019\u00bb\u300d"], dtype=np.uint32)
_NEWLINE = ord("\n")

#: Chunks re-counted per tokenizer call.
_RECOUNT_BATCH = 256


def _is_word_char(codes: np.ndarray) -> np.ndarray:
    """ASCII letters and digits, and everything non-ASCII (letters of other scripts)."""
    return (
        ((codes >= 48) & (codes <= 57))
        | ((codes >= 65) & (codes <= 90))
        | ((codes >= 97) & (codes <= 122))
        | (codes == 95)
        | (codes >= 128)
    )


def _break_scores(text: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``scores[k]``: how good a chunk end just before token ``k`` is (``0 < k < n``).

    Vectorised over the whole document (prefix sums over the characters), so choosing a
    break is a slice lookup per chunk, not a Python scan over tokens.
    """
    n = len(starts)
    scores = np.full(n + 1, _PARAGRAPH, dtype=np.int8)  # the text's own ends are the best
    if n < 2:
        return scores
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
    zero = np.zeros(1, dtype=np.int32)
    ws_cum = np.concatenate([zero, np.cumsum(np.isin(codes, _WHITESPACE), dtype=np.int32)])
    nl_cum = np.concatenate([zero, np.cumsum(codes == _NEWLINE, dtype=np.int32)])

    prev_end = ends[:-1]
    next_start = starts[1:]
    gap_lo = np.minimum(prev_end, next_start)
    spaces = ws_cum[next_start] - ws_cum[gap_lo]
    newlines = nl_cum[next_start] - nl_cum[gap_lo]

    last = codes[np.clip(prev_end - 1, 0, len(codes) - 1)]
    before_last = codes[np.clip(prev_end - 2, 0, len(codes) - 1)]
    first_next = codes[np.clip(next_start, 0, len(codes) - 1)]
    sentence = np.isin(last, _SENTENCE_ENDS) | (
        np.isin(last, _CLOSERS) & np.isin(before_last, _SENTENCE_ENDS)
    )
    punct = ~_is_word_char(last) | ~_is_word_char(first_next) | (next_start > prev_end)

    inner = np.full(n - 1, _NONE, dtype=np.int8)
    inner[punct] = _PUNCT
    ws = spaces > 0
    inner[ws] = _SPACE
    inner[ws & (newlines == 1)] = _LINE
    inner[ws & sentence] = _SENTENCE
    inner[newlines >= 2] = _PARAGRAPH
    scores[1:n] = inner
    return scores


def _latest(scores: np.ndarray, lo: int, hi: int, at_least: int) -> int | None:
    """The last ``k`` in ``[lo, hi]`` with ``scores[k] >= at_least``, if any."""
    if lo > hi:
        return None
    hits = np.flatnonzero(scores[lo : hi + 1] >= at_least)
    return lo + int(hits[-1]) if hits.size else None


def _best(scores: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """``(k, score)``: the best-scored ``k`` in ``[lo, hi]``, the latest among equals."""
    seg = scores[lo : hi + 1]
    top = int(seg.max())
    return lo + int(np.flatnonzero(seg == top)[-1]), top


def _segments(text: str, size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` pieces of at most ~``size`` characters, cut at the best whitespace.

    A cut lands in the second half of the piece: at a blank line if there is one, else a
    line end, else a space, else after punctuation, else (half a piece of one word) anywhere.
    """
    out: list[tuple[int, int]] = []
    pos, n = 0, len(text)
    while n - pos > size:
        lo, hi = pos + size // 2, pos + size
        cut = -1
        for sep in ("\n\n", "\n", " "):
            cut = text.rfind(sep, lo, hi)
            if cut >= 0:
                break
        if cut < 0:  # no whitespace: after the last punctuation, else anywhere
            cut = next((c + 1 for c in range(hi - 1, lo - 1, -1) if not text[c].isalnum()), hi)
        out.append((pos, cut))
        pos = cut
    out.append((pos, n))
    return out


def _cut(text: str, s: int, e: int, max_chars: int, max_bytes: int) -> list[tuple[int, int]]:
    """``[s, e)`` as pieces of at most ``max_chars`` characters and ``max_bytes`` UTF-8 bytes,
    without leading or trailing whitespace, in order; linear in ``e - s``.

    Each cut lands in the second half of the room a piece has: at a blank line if there is
    one, else a line end, else a space or tab, else after punctuation, else anywhere.
    """
    out: list[tuple[int, int]] = []
    pos = s
    while pos < e:
        while pos < e and text[pos].isspace():
            pos += 1
        if pos >= e:
            break
        hi = min(e, pos + max_chars)
        raw = text[pos:hi].encode("utf-8", "surrogatepass")
        if len(raw) > max_bytes:  # the characters whose bytes fit (a cut character is dropped)
            hi = pos + max(1, len(raw[:max_bytes].decode("utf-8", "ignore")))
        cut = e
        if hi < e:
            lo = pos + (hi - pos) // 2
            cut = -1
            for sep in ("\n\n", "\n", " ", "\t"):
                cut = text.rfind(sep, lo, hi)
                if cut > pos:
                    break
            if cut <= pos:
                cut = next((c + 1 for c in range(hi - 1, lo - 1, -1) if not text[c].isalnum()), hi)
            if cut <= pos:
                cut = hi
        end = cut
        while end > pos and text[end - 1].isspace():
            end -= 1
        if end > pos:
            out.append((pos, end))
        pos = cut
    return out


def _backend(tokenizer: Any) -> Tokenizer:
    """A private copy of the Rust tokenizer behind ``tokenizer``, without truncation/padding.

    Private because the transformers wrapper reconfigures its backend on every call (not
    safe across threads), and because truncation would silently cut the whole document.
    """
    from tokenizers import Tokenizer

    backend: Tokenizer | None
    if isinstance(tokenizer, Tokenizer):
        backend = tokenizer
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(
                f"{type(tokenizer).__name__} is not a fast tokenizer: chunking needs character "
                "offsets (load it with AutoTokenizer.from_pretrained(path), use_fast=True)"
            )
    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    return own


class Chunker:
    """Splits text into overlapping chunks of at most ``max_tokens`` tokens of one tokenizer.

    Deterministic (same text, same chunks: chunk ids are derived from the chunk order) and
    stateless after construction, so one instance serves every page and thread.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_tokens: int,
        overlap: int,
        *,
        segment_chars: int = 1 << 18,
        max_chars: int = CHUNK_MAX_CHARS,
        max_bytes: int = CHUNK_MAX_BYTES,
    ) -> None:
        if max_chars < 16 or max_bytes < 64:
            raise ValueError(
                f"max_chars must be at least 16 and max_bytes at least 64, got {max_chars} "
                f"and {max_bytes}"
            )
        if segment_chars < 1024:
            raise ValueError(f"segment_chars must be at least 1024, got {segment_chars}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if not 0 <= overlap <= max_tokens // 2:
            raise ValueError(
                f"overlap must be between 0 and max_tokens/2 ({max_tokens // 2}), got {overlap}"
            )
        self._tokenizer = tokenizer
        self._tok = _backend(tokenizer)
        self._max = max_tokens
        self._overlap = overlap
        self._segment_chars = segment_chars
        self._max_chars = max_chars
        self._max_bytes = max_bytes

    @classmethod
    def from_model(
        cls,
        model_path: str,
        chunk_tokens: int = 0,
        overlap: int = 32,
        *,
        max_chars: int = CHUNK_MAX_CHARS,
        max_bytes: int = CHUNK_MAX_BYTES,
    ) -> Chunker:
        """A chunker for the model at ``model_path`` (a folder, a hub id, or the MiniLM alias).

        ``chunk_tokens=0`` fills what the model reads: its input limit minus the special
        tokens the encoder adds (``[CLS]``/``[SEP]``, ``<s>``/``</s>``), so a chunk plus its
        specials is never truncated. A larger explicit value is refused rather than
        truncated silently at embedding time.

        The tokenizer comes from the model's ``tokenizer.json`` through the ``tokenizers``
        library alone: the fetch stage then never imports ``transformers`` (about 850 MB
        resident for a process that only cuts text); the same Rust tokenizer gives the same
        tokens (``tests/test_chunking.py`` compares both loads).
        """
        path = resolve_model_path(model_path)
        tokenizer: Any = load_fast_tokenizer(path)
        if tokenizer is not None:
            specials = tokenizer.num_special_tokens_to_add(False)
        else:  # no tokenizer.json: transformers converts the model's own (slow) files
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
            specials = tokenizer.num_special_tokens_to_add(pair=False)
        capacity = model_input_limit(path, tokenizer) - specials
        if chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
        if chunk_tokens > capacity:
            raise ValueError(
                f"chunk_tokens={chunk_tokens} exceeds what {model_path!r} reads: at most "
                f"{capacity} tokens plus {specials} special tokens; the rest would be truncated"
            )
        return cls(
            tokenizer, chunk_tokens or capacity, overlap, max_chars=max_chars, max_bytes=max_bytes
        )

    @property
    def max_tokens(self) -> int:
        """Most tokens per chunk, special tokens not included."""
        return self._max

    def tokenizer_json(self) -> str:
        """The tokenizer as JSON: enough to rebuild this chunker elsewhere (a child process)
        with :meth:`from_tokenizer_json`, without loading ``transformers``."""
        return self._tok.to_str()

    @classmethod
    def from_tokenizer_json(
        cls,
        tokenizer_json: str,
        max_tokens: int,
        overlap: int,
        *,
        max_chars: int = CHUNK_MAX_CHARS,
        max_bytes: int = CHUNK_MAX_BYTES,
    ) -> Chunker:
        """The chunker :meth:`tokenizer_json` came from (same tokens, same chunks)."""
        from tokenizers import Tokenizer

        return cls(
            Tokenizer.from_str(tokenizer_json),
            max_tokens,
            overlap,
            max_chars=max_chars,
            max_bytes=max_bytes,
        )

    @property
    def max_chars(self) -> int:
        """Most characters per chunk."""
        return self._max_chars

    @property
    def max_bytes(self) -> int:
        """Most UTF-8 bytes per chunk."""
        return self._max_bytes

    @property
    def overlap(self) -> int:
        """Tokens shared by consecutive chunks (at least this many, unless a chunk is short)."""
        return self._overlap

    @property
    def tokenizer(self) -> Any:
        """The tokenizer this chunker was built with (the embedder can reuse it)."""
        return self._tokenizer

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts without special tokens, for token-budget batching."""
        if not texts:
            return []
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def derive(self, *, max_tokens: int, max_chars: int, max_bytes: int) -> Chunker:
        """This chunker with smaller limits, sharing its tokenizer (no copy: the Rust
        tokenizer is read-only here). For a chunk body that shares its budget with a
        heading line; the overlap shrinks with the budget if it must."""
        if max_tokens > self._max or max_chars > self._max_chars or max_bytes > self._max_bytes:
            raise ValueError("a derived chunker's limits must be within its parent's")
        if max_tokens < 1 or max_chars < 16 or max_bytes < 64:
            raise ValueError(
                f"max_tokens must be at least 1, max_chars 16 and max_bytes 64, got "
                f"{max_tokens}, {max_chars} and {max_bytes}"
            )
        other = copy.copy(self)
        other._max = max_tokens
        other._overlap = min(self._overlap, max_tokens // 2)
        other._max_chars = max_chars
        other._max_bytes = max_bytes
        return other

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` that ends at a token end and holds at most
        ``max_tokens`` tokens (``text`` itself when it fits)."""
        if not text:
            return text
        offsets = self._tok.encode(text, add_special_tokens=False).offsets
        if len(offsets) <= max_tokens:
            return text
        if max_tokens <= 0:
            return ""
        return text[: offsets[max_tokens - 1][1]]

    def chunk(self, text: str) -> list[str]:
        """The chunk texts of ``text``: exact substrings, in order; ``[]`` for blank text."""
        return [text[s:e] for s, e in self.chunk_spans(text)]

    def chunk_spans(self, text: str) -> list[tuple[int, int]]:
        """``(start, end)`` character offsets of the chunks (``text[start:end]``), in order.

        Every non-whitespace character of ``text`` lies in at least one span; spans have no
        leading or trailing whitespace; each is within ``max_tokens``, ``max_chars`` and
        ``max_bytes``.
        """
        if not text or text.isspace():
            return []
        doc = self._tokenize(text)
        if doc is None:
            return []

        spans: list[tuple[int, int]] = []
        plan = self._plan(doc, 0, 0)
        pos = 0
        while pos < len(plan):
            # Re-count in batches: a tokenizer Encoding costs ~100 bytes per token, too
            # much to hold for every chunk of a large page at once.
            batch = plan[pos : pos + _RECOUNT_BATCH]
            pieces = [doc.span(i, k) for i, k in batch]
            counts = self.count_tokens([text[s:e] for s, e in pieces])
            bad = next((x for x, c in enumerate(counts) if c > self._max), None)
            if bad is None:
                spans.extend(pieces)
                pos += len(batch)
                continue
            # Rare: the slice re-tokenizes longer than its tokens did in context. Keep what
            # fits, shorten the offender, and lay out the rest again from its new end.
            spans.extend(pieces[:bad])
            i, k = batch[bad]
            k = self._shrink(doc, i, k)
            spans.append(doc.span(i, k))
            plan, pos = self._plan(doc, self._next_start(doc, i, k), k), 0
        return self._capped(text, [(s, e) for s, e in spans if s < e])

    def _fits(self, text: str, s: int, e: int) -> bool:
        n = e - s
        if n > self._max_chars:
            return False
        return n * 4 <= self._max_bytes or len(text[s:e].encode("utf-8", "surrogatepass")) <= (
            self._max_bytes
        )

    def _capped(self, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """``spans`` with every span over the character or byte cap cut into pieces within
        both, each piece re-counted (a piece of a word can tokenize longer than in context)."""
        if all(self._fits(text, s, e) for s, e in spans):
            return spans
        out: list[tuple[int, int]] = []
        for s, e in spans:
            if self._fits(text, s, e):
                out.append((s, e))
            else:
                out.extend(self._pieces(text, s, e, self._max_chars))
        return out

    def _pieces(self, text: str, s: int, e: int, max_chars: int) -> list[tuple[int, int]]:
        """``[s, e)`` cut within the caps; a piece over the token budget is cut again in
        halves. The span came from one token window, so its pieces hold about ``max_tokens``
        tokens in all: counting them at once is cheap."""
        pieces = _cut(text, s, e, max_chars, self._max_bytes)
        counts = self.count_tokens([text[a:b] for a, b in pieces])
        out: list[tuple[int, int]] = []
        for (a, b), count in zip(pieces, counts, strict=True):
            if count <= self._max:
                out.append((a, b))
            elif b - a <= 1:
                raise ValueError(
                    f"the character at offset {a} tokenizes to {count} tokens, more than "
                    f"max_tokens={self._max}"
                )
            else:
                out.extend(self._pieces(text, a, b, max(1, (b - a) // 2)))
        return out

    # --- layout -----------------------------------------------------------------------

    def _tokenize(self, text: str) -> _Document | None:
        """Token offsets and break scores of ``text``, or None if it has no tokens.

        Texts longer than ``segment_chars`` are tokenized in pieces cut at blank lines (else
        line ends, else spaces), so memory follows the piece, not the page: encoding needs
        a few hundred bytes per character (measured on an 18 MB page: +1.4 GB peak in 4 MB
        pieces, +120 MB in 256 K pieces). At whitespace the pieces tokenize as the whole
        would; where they might not, the re-count of every chunk still holds the budget.
        """
        starts_parts: list[np.ndarray] = []
        ends_parts: list[np.ndarray] = []
        score_parts: list[np.ndarray] = []
        for lo, hi in _segments(text, self._segment_chars):
            piece = text[lo:hi]
            offsets = self._tok.encode(piece, add_special_tokens=False).offsets
            if not offsets:
                continue
            arr = np.asarray(offsets, dtype=np.int32).reshape(-1, 2)
            starts = np.ascontiguousarray(arr[:, 0])
            ends = np.ascontiguousarray(arr[:, 1])
            scores = _break_scores(piece, starts, ends)
            starts_parts.append(starts + lo)
            ends_parts.append(ends + lo)
            score_parts.append(scores[:-1])  # scores[m] is the piece's end, not a break
        if not starts_parts:
            return None
        starts = np.concatenate(starts_parts)
        ends = np.concatenate(ends_parts)
        scores = np.concatenate([*score_parts, np.array([_PARAGRAPH], dtype=np.int8)])
        k = 0
        for part in starts_parts[:-1]:  # the joins between pieces: score them in context
            k += len(part)
            a = max(0, int(starts[k - 1]) - 2)
            b = int(ends[k])
            local = _break_scores(
                text[a:b],
                np.array([starts[k - 1] - a, starts[k] - a], dtype=np.int64),
                np.array([ends[k - 1] - a, ends[k] - a], dtype=np.int64),
            )
            scores[k] = local[1]
        return _Document(text, starts, ends, scores)

    def _plan(self, doc: _Document, i: int, prev_end: int) -> list[tuple[int, int]]:
        """Token windows ``[i, k)`` from token ``i`` to the end of the document."""
        n = doc.n
        out: list[tuple[int, int]] = []
        while True:
            j = min(i + self._max, n)
            if j == n:
                out.append((i, n))
                return out
            k = self._pick_end(doc.scores, i, j, prev_end)
            out.append((i, k))
            i, prev_end = self._next_start(doc, i, k), k

    def _pick_end(self, scores: np.ndarray, i: int, j: int, prev_end: int) -> int:
        """Where a window ``[i, j)`` ends: the best break in its last quarter.

        Paragraph beats sentence beats line beats whitespace, the later the better among
        equals. With no whitespace there, the last whitespace anywhere in the window (a
        shorter chunk rather than a cut word); with none at all (a URL, base64, CJK text), a
        punctuation boundary near the end, else the hard limit.
        """
        floor = min(max(i + 1, prev_end + 1), j)  # every chunk adds at least one new token
        lo = max(i + self._max - self._max // 4, floor)
        if lo <= j:
            k, score = _best(scores, lo, j)
            if score >= _SPACE:
                return k
        k_ws = _latest(scores, floor, j, _SPACE)
        if k_ws is not None:
            return k_ws
        if lo <= j:
            k, score = _best(scores, lo, j)
            if score >= _PUNCT:
                return k
        return j

    def _next_start(self, doc: _Document, i: int, k: int) -> int:
        """First token of the chunk after ``[i, k)``: ``overlap`` tokens back, at a word start.

        Snaps backwards (more overlap, never less) by up to half the overlap so the next
        chunk does not begin mid-word. A chunk shorter than the overlap is not repeated.
        """
        if self._overlap == 0:
            return k
        ni = k - self._overlap
        if ni <= i:
            return k
        lo = max(i + 1, ni - max(self._overlap // 2, 4))
        for at_least in (_SPACE, _PUNCT):
            hit = _latest(doc.scores, lo, ni, at_least)
            if hit is not None:
                return hit
        return ni

    def _shrink(self, doc: _Document, i: int, k: int) -> int:
        """Move the end of ``[i, k)`` back until its text re-tokenizes within budget."""
        while True:
            s, e = doc.span(i, k)
            (count,) = self.count_tokens([doc.text[s:e]])
            if count <= self._max:
                return k
            if k <= i + 1:
                raise ValueError(
                    f"one token at offset {s} re-tokenizes to {count} tokens, more than "
                    f"max_tokens={self._max}"
                )
            hi = max(i + 1, k - (count - self._max))
            if hi == k:
                hi = k - 1
            lo = max(i + 1, hi - self._max // 4)
            k = _latest(doc.scores, lo, hi, _SPACE) or hi


class _Document:
    """One tokenized text: token offsets, break scores, and token-window-to-slice mapping."""

    __slots__ = ("ends", "n", "scores", "starts", "text")

    def __init__(self, text: str, starts: np.ndarray, ends: np.ndarray, scores: np.ndarray):
        self.text = text
        self.starts = starts
        self.ends = ends
        self.scores = scores
        self.n = len(starts)

    def span(self, i: int, k: int) -> tuple[int, int]:
        """Characters of tokens ``[i, k)``, stretched over the gaps and stripped of whitespace.

        Stretching to the next token (or the text's ends) keeps characters the tokenizer
        drops (control characters) inside some chunk; stripping keeps chunks clean.
        """
        text = self.text
        s = 0 if i == 0 else int(self.starts[i])
        e = len(text) if k >= self.n else max(int(self.ends[k - 1]), int(self.starts[k]))
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        return s, e
