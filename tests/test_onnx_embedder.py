"""The ONNX backends behind the embed stage's interface: exported from the local weights
into a fresh home, cached, and agreeing with torch's vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streams.embedder import Embedder
from streams.onnx_backend import agreement, graph_folder
from streams.settings import MINILM, Settings

#: Exports and loads models (seconds each): the full suite only.
pytestmark = pytest.mark.slow

TEXTS = [
    "hello world",
    "x",
    "QuerySet.select_related() follows foreign keys in the same query.",
    "Template filters transform the value of a variable; tags control the logic.",
    "CSRF_COOKIE_SECURE = True sends the CSRF cookie over HTTPS only.",
    "Django's ORM maps models to tables. " * 30,
    "The migrations framework records every change to your models in files.",
    "Signals let decoupled applications get notified when actions occur elsewhere.",
    "Use get_object_or_404() to raise Http404 when an object does not exist.",
    "The cache framework offers per-site, per-view and low-level caching.",
    "Form.is_valid() runs validation and fills cleaned_data.",
    "Middleware is a framework of hooks into Django's request/response processing.",
    "class Meta: ordering = ['-pub_date']",
    "ManyToManyField(through='Membership') adds fields on the relationship.",
    "The admin site reads your models' metadata to provide a management interface.",
    "STATIC_ROOT is where collectstatic gathers static files for deployment.",
    "Paginator splits a list of objects across pages.",
    "Custom user models should subclass AbstractUser or AbstractBaseUser.",
    "The test client simulates a user interacting with views.",
    "Translations are marked with gettext() and gettext_lazy().",
    "F() expressions refer to a field's value in the database.",
    "Q objects combine lookups with | and &.",
    "Aggregation: annotate(Count('entry')) counts related entries per row.",
    "Class-based views: ListView and DetailView display objects.",
    "DATABASES['default']['CONN_MAX_AGE'] keeps connections open.",
    "Sessions are stored in the database by default.",
    "The URL dispatcher maps path() patterns to views.",
    "Security: clickjacking protection with X-Frame-Options.",
    "Logging is configured with the LOGGING setting, a dictConfig.",
    "Async views run in an ASGI server without a thread per request.",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-home")


@pytest.fixture(scope="module")
def torch_minilm() -> Embedder:
    return Embedder(Settings(model=MINILM, device="cpu", backend="torch"))


@pytest.fixture(scope="module")
def int8_minilm(home: Path) -> Embedder:
    return Embedder(Settings(model=MINILM, device="cpu", backend="onnx-int8", home=home))


def test_int8_minilm_agrees_with_torch(torch_minilm: Embedder, int8_minilm: Embedder) -> None:
    ours, ref = int8_minilm.encode(TEXTS), torch_minilm.encode(TEXTS)
    mean, low = agreement(ours.dense, ref.dense)
    assert mean >= 0.99, (mean, low)
    assert low >= 0.95, (mean, low)
    assert int8_minilm.backend == "onnx-int8" and int8_minilm.dim == 384
    assert ours.dense.shape == (len(TEXTS), 384) and ours.dense.dtype == np.float32
    assert np.allclose(np.linalg.norm(ours.dense, axis=1), 1.0, atol=1e-5)
    assert ours.sparse is None


def test_the_stage_interface_is_the_same(torch_minilm: Embedder, int8_minilm: Embedder) -> None:
    assert int8_minilm.tokenize(TEXTS) == torch_minilm.tokenize(TEXTS)
    assert int8_minilm.n_special == torch_minilm.n_special
    assert int8_minilm.max_length == torch_minilm.max_length
    # a text's vector does not depend on its batch mates (int8 activations are scaled per
    # run: in a shared run it moved with them, down to cosine 0.97 here)
    ids = int8_minilm.tokenize(TEXTS)
    alone = np.stack([int8_minilm.encode_ids([x]).dense[0] for x in ids])
    assert agreement(alone, int8_minilm.encode_ids(ids).dense)[1] > 0.99999
    assert int8_minilm.encode_ids([]).dense.shape[0] == 0


def test_texts_encoded_side_by_side_come_back_in_order(int8_minilm: Embedder, home: Path) -> None:
    """Four runs at a time (one thread each) give each text the vector it gets alone, in
    the order given, whatever thread ran it; M3's sparse weights too (test below)."""
    wide = Embedder(
        Settings(model=MINILM, device="cpu", backend="onnx-int8", home=home, torch_threads=4)
    )
    assert wide._runners._max_workers == 4
    ids = int8_minilm.tokenize(TEXTS)[::-1]
    alone = np.stack([int8_minilm.encode_ids([x]).dense[0] for x in ids])
    together = wide.encode_ids(ids).dense
    assert together.shape == alone.shape
    assert np.allclose(together, alone, atol=1e-6)


def test_fp32_onnx_is_torch(torch_minilm: Embedder, home: Path) -> None:
    fp32 = Embedder(Settings(model=MINILM, device="cpu", backend="onnx", home=home))
    assert agreement(fp32.encode(TEXTS).dense, torch_minilm.encode(TEXTS).dense)[1] > 0.99999
    ids = fp32.tokenize(TEXTS[:3])
    alone = np.stack([fp32.encode_ids([x]).dense[0] for x in ids])
    assert agreement(alone, fp32.encode_ids(ids).dense)[1] > 0.99999  # padding is masked


def test_the_graph_is_cached_and_a_corrupt_one_rebuilt(int8_minilm: Embedder, home: Path) -> None:
    folder = graph_folder(Path(int8_minilm.path), home / "models", MINILM)
    graph = folder / "model.int8.onnx"
    assert folder.parent == home / "models" and graph.exists()
    before = graph.stat().st_mtime_ns
    again = Embedder(Settings(model=MINILM, device="cpu", backend="onnx-int8", home=home))
    assert graph.stat().st_mtime_ns == before, "a second load exported again"
    graph.write_bytes(graph.read_bytes()[:1000])  # a partial file
    rebuilt = Embedder(Settings(model=MINILM, device="cpu", backend="onnx-int8", home=home))
    assert graph.stat().st_size > 1000
    assert np.allclose(rebuilt.encode(TEXTS).dense, again.encode(TEXTS).dense, atol=1e-6)


def test_m3_dense_and_sparse_agree_with_torch(random_m3: Path, tmp_path: Path) -> None:
    ref = Embedder(Settings(model=str(random_m3), device="cpu", backend="torch"))
    ours = Embedder(
        Settings(model=str(random_m3), device="cpu", backend="onnx-int8", home=tmp_path)
    )
    texts = TEXTS[:8]
    a, b = ours.encode(texts), ref.encode(texts)
    assert ours.dim == 1024 and a.dense.shape == (8, 1024)
    assert agreement(a.dense, b.dense)[0] >= 0.99
    assert a.sparse is not None and b.sparse is not None
    specials = set(ours.tokenizer.all_special_ids)
    for mine, theirs in zip(a.sparse, b.sparse, strict=True):
        assert set(mine) == set(theirs) and not specials & set(mine)
        top = sorted(theirs, key=theirs.__getitem__, reverse=True)[:3]
        assert all(abs(mine[t] - theirs[t]) < 0.05 * theirs[t] for t in top)
