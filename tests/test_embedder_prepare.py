"""The torch embedder's two halves (``prepare``, ``encode_prepared``) and its precision rule.

The split exists for the GPU (pad and copy the next batch while this one runs); on a CPU it
must change nothing: the vectors are compared bit for bit with the single call the embedder
made before the split. The GPU branch itself needs a GPU (``python -m bench`` there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streams.embedder import Embedder, torch_precision
from streams.errors import ConfigError
from streams.settings import MINILM, Settings

TEXTS = [
    "hello world",
    "x",
    "QuerySet.select_related() follows foreign keys in the same query.",
    "Django's ORM maps models to tables. " * 30,
]


@pytest.mark.parametrize(
    ("setting", "device", "bf16_native", "expected"),
    [
        ("auto", "cpu", True, "fp32"),  # a CPU is fp32 whatever is asked
        ("bf16", "cpu", False, "fp32"),
        ("fp16", "cpu", False, "fp32"),
        ("auto", "cuda:0", True, "bf16"),
        ("auto", "cuda", False, "fp16"),  # e.g. a T4 or V100
        ("fp16", "cuda:0", True, "fp16"),
        ("fp32", "cuda:0", True, "fp32"),
        ("bf16", "cuda:1", True, "bf16"),
    ],
)
def test_precision_rule(setting: str, device: str, bf16_native: bool, expected: str) -> None:
    assert torch_precision(setting, device, bf16_native) == expected


def test_bf16_on_a_gpu_without_it_is_refused() -> None:
    with pytest.raises(ConfigError, match="no native bf16"):
        torch_precision("bf16", "cuda:0", False)
    with pytest.raises(ConfigError, match="expected auto"):
        torch_precision("int4", "cuda:0", True)


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return Embedder(Settings(model=MINILM, device="cpu", backend="torch"))


@pytest.mark.slow
def test_prepared_batches_give_the_vectors_of_one_call_on_a_cpu(minilm: Embedder) -> None:
    import torch

    ids = minilm.tokenize(TEXTS)
    prepared = minilm.prepare(ids)
    assert prepared.ready is None and prepared.inputs is not None  # nothing to wait for
    assert prepared.inputs["input_ids"].device.type == "cpu"
    assert minilm.precision == "fp32"
    ours = minilm.encode_prepared(prepared).dense
    assert np.array_equal(ours, minilm.encode_ids(ids).dense)
    # what encode_ids computed before prepare() existed, written out
    inputs = minilm.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = minilm._flag.model(**inputs, return_dict=True).last_hidden_state
        pooled = minilm._flag.pooling(hidden, inputs["attention_mask"])
        before = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
    assert np.array_equal(ours, before)


@pytest.mark.slow
def test_prepared_m3_batches_keep_dense_and_sparse(random_m3: Path) -> None:
    embedder = Embedder(Settings(model=str(random_m3), device="cpu", backend="torch"))
    ids = embedder.tokenize(TEXTS)
    one = embedder.encode_ids(ids)
    two = embedder.encode_prepared(embedder.prepare(ids))
    assert np.array_equal(one.dense, two.dense) and one.sparse == two.sparse
    assert two.sparse is not None and all(two.sparse)
