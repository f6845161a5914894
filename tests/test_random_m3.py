"""The BGE-M3-shaped random model: what ragstream sees of it is what it would see of BGE-M3."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.random_m3 import make_random_m3
from streams.chunking import Chunker
from streams.embedder import Embedder, is_m3
from streams.settings import Settings

pytestmark = pytest.mark.slow


def test_embeds_dense_1024_and_sparse_without_special_tokens(random_m3: Path) -> None:
    assert is_m3(str(random_m3))
    embedder = Embedder(Settings(model=str(random_m3)))
    out = embedder.encode(["CSRF_COOKIE_SECURE makes the cookie secure", "select_related"])
    assert embedder.dim == 1024 and out.dense.shape == (2, 1024)
    assert out.sparse is not None and all(out.sparse)
    specials = set(embedder.tokenizer.all_special_ids)
    for weights in out.sparse:
        assert all(isinstance(t, int) and w > 0 for t, w in weights.items())
        assert not specials & set(weights), "special tokens carry no lexical meaning"
    # the token of "select" (via its word pieces) weighs in the second text
    ids = set(embedder.tokenizer("select_related", add_special_tokens=False)["input_ids"])
    assert ids & set(out.sparse[1])


def test_chunker_reads_its_input_limit(random_m3: Path) -> None:
    chunker = Chunker.from_model(str(random_m3))
    assert chunker.max_tokens == 510  # 512 positions read, minus [CLS] and [SEP]


def test_same_arguments_same_model(random_m3: Path, tmp_path: Path) -> None:
    again = make_random_m3(tmp_path / "again")
    a = (random_m3 / "sparse_linear.pt").read_bytes()
    assert a == (again / "sparse_linear.pt").read_bytes()
