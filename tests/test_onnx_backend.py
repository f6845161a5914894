"""The ONNX backend's pure rules: agreement, backend choice, the cache key, pooling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streams.errors import ConfigError
from streams.onnx_backend import (
    agreement,
    cache_dir,
    graph_name,
    model_fingerprint,
    pool,
    resolve_backend,
    sparse_weights,
)
from streams.settings import Settings

VERSIONS = {"torch": "2.15.0", "onnx": "1.23.2"}


def test_agreement_is_mean_and_min_cosine_of_rows() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    b = np.array([[1.0, 1.0], [0.0, 5.0], [-3.0, -4.0]], dtype=np.float32)
    mean, low = agreement(a, b)
    assert low == pytest.approx(-1.0)
    assert mean == pytest.approx((2**-0.5 + 1.0 - 1.0) / 3)
    assert agreement(a, a * 7) == pytest.approx((1.0, 1.0))  # scale does not matter


def test_agreement_refuses_what_cannot_be_compared() -> None:
    with pytest.raises(ValueError):
        agreement(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError):
        agreement(np.zeros((0, 3)), np.zeros((0, 3)))


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cpu", "onnx-int8"),
        ("auto", "cuda:0", "torch"),
        ("torch", "cpu", "torch"),
        ("torch", "cuda", "torch"),
        ("onnx", "cpu", "onnx"),
        ("onnx-int8", "cpu", "onnx-int8"),
    ],
)
def test_backend_by_setting_and_device(setting: str, device: str, expected: str) -> None:
    assert resolve_backend(setting, device) == expected


@pytest.mark.parametrize(("setting", "device"), [("onnx", "cuda:0"), ("tensorrt", "cpu")])
def test_a_backend_that_cannot_run_is_refused(setting: str, device: str) -> None:
    with pytest.raises(ConfigError):
        resolve_backend(setting, device)


def _model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(b"\1" * (3 << 20))  # 3 MB: sampled
    return folder


def test_the_fingerprint_follows_weights_config_and_versions(tmp_path: Path) -> None:
    model = _model(tmp_path / "m")
    first = model_fingerprint(model, VERSIONS)
    assert model_fingerprint(model, dict(VERSIONS)) == first  # stable
    assert model_fingerprint(model, {**VERSIONS, "torch": "2.16.0"}) != first
    (model / "config.json").write_text('{"hidden_size": 9}')
    second = model_fingerprint(model, VERSIONS)
    assert second != first
    with (model / "model.safetensors").open("r+b") as fh:  # the last byte of the weights
        fh.seek((3 << 20) - 1)
        fh.write(b"\2")
    assert model_fingerprint(model, VERSIONS) != second


def test_the_cache_folder_is_per_model_under_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cache = Settings(home=home).model_cache
    assert cache == home / "models"
    assert Settings(home=home, models_dir=tmp_path / "shared").model_cache == tmp_path / "shared"
    folder = cache_dir(cache, "/tmp/pytest-7/models0/BAAI bge-m3/", "abc123")
    assert folder == home / "models" / "BAAI-bge-m3-abc123"
    assert cache_dir(cache, "BAAI/bge-m3", "f").name == "bge-m3-f"
    assert cache_dir(cache, "all-MiniLM-L6-v2", "f").name == "all-MiniLM-L6-v2-f"
    assert (graph_name(False), graph_name(True)) == ("model.onnx", "model.int8.onnx")


def test_mean_pooling_ignores_padding_and_cls_takes_the_first_token() -> None:
    hidden = np.array([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])
    assert np.allclose(pool(hidden, mask, "mean"), [[2**-0.5, 2**-0.5]])
    assert np.allclose(pool(hidden, mask, "cls"), [[1.0, 0.0]])


def test_sparse_weights_are_a_relu_of_the_head() -> None:
    hidden = np.array([[[1.0, 2.0], [-1.0, -2.0]]], dtype=np.float32)
    head = (np.array([1.0, 1.0], dtype=np.float32), 0.5)
    assert np.allclose(sparse_weights(hidden, head), [[3.5, 0.0]])
