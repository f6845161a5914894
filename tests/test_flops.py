"""The FLOP count and the GPU peaks behind the bench's FLOP share, against hand-computed
numbers (no GPU, no model loaded)."""

from __future__ import annotations

import pytest

from streams.flops import EncoderShape, encoder_shape, gpu_peak_flops, workload_flops
from streams.model import model_config, resolve_model_path
from streams.settings import MINILM

MINILM_SHAPE = EncoderShape(layers=6, hidden=384, intermediate=1536)


def test_matrix_params_of_known_encoders() -> None:
    # per layer 4 h^2 + 2 h i: MiniLM 589,824 + 1,179,648; BERT-base 2,359,296 + 4,718,592;
    # XLM-RoBERTa-large (BGE-M3) 4,194,304 + 8,388,608 (its 568M less 256M of embeddings)
    assert MINILM_SHAPE.matrix_params == 6 * 1_769_472 == 10_616_832
    assert EncoderShape(12, 768, 3072).matrix_params == 12 * 7_077_888 == 84_934_656
    assert EncoderShape(24, 1024, 4096).matrix_params == 24 * 12_582_912 == 301_989_888


def test_flops_per_token_adds_attention_over_the_sequence() -> None:
    # 2 x 10,616,832 + 4 x 6 x 384 x 128 = 21,233,664 + 1,179,648
    assert MINILM_SHAPE.flops_per_token(128) == 22_413_312
    # BGE-M3 at 512 tokens: 2 x 301,989,888 + 4 x 24 x 1024 x 512 = 603,979,776 + 50,331,648
    assert EncoderShape(24, 1024, 4096).flops_per_token(512) == 654_311_424


def test_workload_counts_each_text_at_its_own_length() -> None:
    # 2 tokens: 2 x (21,233,664 + 18,432); 3 tokens: 3 x (21,233,664 + 27,648)
    assert workload_flops(MINILM_SHAPE, [2, 3]) == 42_504_192 + 63_783_936
    assert workload_flops(MINILM_SHAPE, []) == 0


def test_shape_from_a_hugging_face_config() -> None:
    on_disk = model_config(resolve_model_path(MINILM))
    assert on_disk is not None and encoder_shape(on_disk) == MINILM_SHAPE
    assert encoder_shape({"num_hidden_layers": 24, "hidden_size": 1024}) is None
    distilbert = {"n_layers": 6, "dim": 768, "hidden_dim": 3072}
    assert encoder_shape(distilbert) is None
    bad = {"num_hidden_layers": True, "hidden_size": 1024, "intermediate_size": 4096}
    assert encoder_shape(bad) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM5
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10G", None),  # not listed: no guess
        ("Tesla T4", None),  # no bf16 tensor cores
        ("cpu", None),
        ("", None),
        (None, None),
    ],
)
def test_gpu_peak_by_name(name: str | None, peak: float | None) -> None:
    assert gpu_peak_flops(name) == peak
