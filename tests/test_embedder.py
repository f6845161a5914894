"""The model wrapper: MiniLM through FlagEmbedding gives sentence-transformers' vectors
(the torch backend; the ONNX ones are compared with it in tests/test_onnx_embedder.py)."""

from __future__ import annotations

import numpy as np
import pytest

from streams.embedder import Embedder, is_m3, pooling_of
from streams.model import resolve_model_path
from streams.settings import MINILM, Settings

#: Loads the MiniLM tokenizer or model (seconds of imports and loading): left out of the
#: fast tier (`scripts/test.sh --fast`), run by the full suite.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(Settings(model=MINILM, device="cpu", backend="torch"))


def test_minilm_is_mean_pooled_and_matches_sentence_transformers(embedder: Embedder) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["hello world", "Django's ORM maps models to tables. " * 30, "x"]
    ours = embedder.encode(texts).dense
    st = SentenceTransformer(str(embedder.path), device="cpu")
    ref = st.encode(texts, normalize_embeddings=True)
    assert pooling_of(embedder.path) == "mean"
    assert not is_m3(embedder.path)
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    assert np.allclose((ours * ref).sum(1), 1.0, atol=1e-4)


def test_one_tokenization_feeds_the_model(embedder: Embedder) -> None:
    texts = ["a short one", "a somewhat longer text about template filters"]
    ids = embedder.tokenize(texts)
    assert [len(x) for x in ids] == embedder.token_lengths(texts)
    assert np.allclose(embedder.encode_ids(ids).dense, embedder.encode(texts).dense, atol=1e-6)
    assert max(embedder.token_lengths(["word " * 1000])) == embedder.max_length == 256


def test_a_text_without_readable_tokens_is_detectable(embedder: Embedder) -> None:
    assert embedder.token_lengths(["\u200b\u200b"]) == [embedder.n_special]
    assert embedder.token_lengths(["a"])[0] > embedder.n_special


def test_model_aliases() -> None:
    assert resolve_model_path(MINILM).endswith("all-MiniLM-L6-v2") or "minilm" in (
        resolve_model_path(MINILM).lower()
    )
    assert resolve_model_path("/models/bge-m3") == "/models/bge-m3"
    assert is_m3("BAAI/bge-m3")
