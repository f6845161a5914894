"""The benchmark: its arithmetic, its bookkeeping, and one small run end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from bench.latency import SearchableTracker
from bench.report import (
    BenchResult,
    busy_fraction,
    device_from_log,
    efficiency,
    percentile,
    speedup,
    speedup_bound,
    stage_of,
)
from bench.runs import batchings, fixed_batches
from streams.settings import MINILM, Settings

ROOT = Path(__file__).resolve().parent.parent


# --- ratios ---------------------------------------------------------------------------------


def test_ratios() -> None:
    assert efficiency(30.0, 40.0) == pytest.approx(0.75)
    assert speedup(120.0, 40.0) == pytest.approx(3.0)
    # 40 pages at 100 ms on top of 20 s of encoding: a perfect pipeline saves the 4 s.
    assert speedup_bound(20.0, 40, 0.1) == pytest.approx(1.2)
    for missing in (efficiency(None, 40.0), speedup(120.0, None), speedup(1.0, 0.0)):
        assert missing is None
    assert speedup_bound(None, 40, 0.1) is None


def test_percentile_matches_numpy() -> None:
    rng = random.Random(7)
    for n in (1, 2, 5, 101):
        values = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_result_json_has_nulls_for_what_was_not_measured() -> None:
    r = BenchResult(docs=3, chunks=30, tokens=6000, latency_ms=100, model=MINILM, device="cpu")
    r.bare_s, r.pipeline_s = 2.0, 4.0
    r.milvus_rows = r.expected_rows = 31
    out = r.to_json()
    for key in ("bare_s", "naive_s", "pipeline_s", "efficiency", "speedup", "chunks_per_s"):
        assert key in out
    for key in ("p50_s", "p99_s", "docs", "chunks", "tokens", "latency_ms", "model", "device"):
        assert key in out
    assert out["naive_s"] is None and out["speedup"] is None and out["p50_s"] is None
    assert out["efficiency"] == pytest.approx(0.5)
    assert out["chunks_per_s"] == pytest.approx(7.5)
    assert out["tokens_per_s"] == pytest.approx(1500)
    assert out["speedup_bound"] == pytest.approx((2.0 + 3 * 0.1) / 2.0)
    assert out["ok"] is True
    json.dumps(out)  # serialisable as is

    r.milvus_rows = 30
    assert r.to_json()["ok"] is False
    r.milvus_rows = 31
    r.dead_letters = {"t.urls.dlq": 1}
    assert r.ok is False


def test_result_json_carries_the_backend_against_torch() -> None:
    r = BenchResult(docs=3, chunks=30, tokens=6000, latency_ms=100, model=MINILM, device="cpu")
    r.backend, r.bare_s = "onnx-int8", 2.0
    out = r.to_json()
    for key in ("bare_torch_tokens_per_s", "agreement_mean_cos", "agreement_min_cos"):
        assert out[key] is None  # not measured: null, never a guess
    assert out["backend"] == "onnx-int8" and out["bare_tokens_per_s"] == pytest.approx(3000)
    r.compare_backend_s, r.bare_torch_s = 2.5, 7.5
    r.agreement_mean_cos, r.agreement_min_cos = 0.995, 0.98
    out = r.to_json()
    assert out["bare_torch_tokens_per_s"] == pytest.approx(800)
    assert out["compare_tokens_per_s"] == pytest.approx(2400)
    assert out["backend_speedup"] == pytest.approx(3.0)
    assert (out["agreement_mean_cos"], out["agreement_min_cos"]) == (0.995, 0.98)


def test_result_json_carries_the_flop_share_beside_tokens_per_s() -> None:
    from bench.report import flops_lines

    r = BenchResult(docs=3, chunks=30, tokens=6000, latency_ms=100, model=MINILM, device="cpu")
    r.bare_s, r.pipeline_s, r.flops = 2.0, 4.0, 1.2e12
    out = r.to_json()
    assert out["flops_per_token"] == 2e8  # a CPU: FLOPs counted, no peak, no share
    assert out["gpu_peak_flops"] is None
    assert out["bare_flops_share"] is None and out["pipeline_flops_share"] is None
    assert "no bf16 peak known for cpu" in flops_lines(r)[0]
    r.device, r.gpu, r.gpu_peak_flops, r.precision = "cuda:0", "NVIDIA H100 PCIe", 1e12, "bf16"
    out = r.to_json()
    assert out["gpu_peak_flops"] == 1e12 and (out["gpu"], out["precision"]) == (r.gpu, "bf16")
    # 1.2e12 FLOPs in 2 s against 1e12 FLOP/s: 60%; in 4 s: 30%
    assert out["bare_flops_share"] == pytest.approx(0.6)
    assert out["pipeline_flops_share"] == pytest.approx(0.3)
    assert out["tokens_per_s"] == pytest.approx(1500) and out["efficiency"] == 0.5  # as before
    text = "\n".join(flops_lines(r))
    assert "0.200 GFLOP" in text and "1 TFLOP/s" in text
    assert "3,000 tokens/s = 60.0% of peak" in text and "1,500 tokens/s = 30.0% of peak" in text
    json.dumps(out)


def test_model_flops_from_the_model_config() -> None:
    from bench.__main__ import model_flops

    # MiniLM (6 x 384, FFN 1536), texts of 2 and 3 tokens: tests/test_flops.py's numbers
    assert model_flops(MINILM, [2, 3]) == 42_504_192 + 63_783_936


def test_random_m3_is_full_size_under_the_models_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import devtools.random_m3
    from bench.__main__ import RANDOM_M3, build_parser, random_m3_model

    made: list[tuple[Path, dict]] = []

    def fake(dest: Path, **kwargs: int) -> Path:
        made.append((dest, kwargs))
        return dest

    monkeypatch.setattr(devtools.random_m3, "make_random_m3", fake)
    console = Console(quiet=True)
    got = random_m3_model(Settings(models_dir=tmp_path / "shared"), tmp_path / "b", console)
    assert got == tmp_path / "shared" / RANDOM_M3
    assert made[0][1] == {"layers": 24, "intermediate": 4096}  # XLM-RoBERTa-large
    assert (
        random_m3_model(Settings(models_dir=None), tmp_path / "b", console)
        == tmp_path / "b" / "models" / RANDOM_M3
    )
    assert build_parser().parse_args(["--random-m3"]).random_m3


class _FakeGpuEmbedder:
    """Prepares and encodes batch numbers; encoding batch k waits (bounded) until batch k+1
    has been prepared, which only a caller that prepares ahead satisfies."""

    device = "cuda:0"

    def __init__(self, batches: int) -> None:
        import threading

        self.prepared = [threading.Event() for _ in range(batches)]
        self.encoded: list[int] = []
        self.overlapped: list[bool] = []

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[int(t)] for t in texts]

    def prepare(self, ids: list[list[int]]) -> int:
        self.prepared[ids[0][0]].set()
        return ids[0][0]

    def encode_prepared(self, k: int) -> None:
        if k + 1 < len(self.prepared):
            self.overlapped.append(self.prepared[k + 1].wait(timeout=5.0))
        self.encoded.append(k)


def test_on_a_gpu_the_next_batch_is_prepared_while_one_runs() -> None:
    from bench.runs import encode_all

    fake = _FakeGpuEmbedder(4)
    encode_all(fake, [[str(k)] for k in range(4)])  # type: ignore[arg-type]
    assert fake.encoded == [0, 1, 2, 3]
    assert fake.overlapped == [True, True, True]


class _FakeModel:
    """Vectors from each text's number (one-hot), optionally turned for one text; it
    records which model encoded when."""

    dim = 4

    def __init__(self, backend: str, calls: list[str], turned: str = "") -> None:
        self.backend, self._calls, self._turned = backend, calls, turned

    def encode(self, texts: list[str]):
        from streams.embedder import Encoded

        self._calls.append(self.backend)
        dense = np.zeros((len(texts), 4), dtype=np.float32)
        for row, text in enumerate(texts):
            dense[row, int(text[-1]) % 4] = 1.0
            if text == self._turned:
                dense[row] = [1.0, 1.0, 1.0, 1.0]
        return Encoded(dense=dense, sparse=None)


def test_compare_takes_turns_and_compares_every_chunk() -> None:
    from bench.runs import Workload, run_compare

    texts = [f"text {i}" for i in range(8)]
    work = Workload(pages=[], texts=texts, lengths=[100 + i for i in range(8)])
    settings = Settings(embed_batch_tokens=256, embed_max_batch=32)  # two texts a batch
    calls: list[str] = []
    ours = _FakeModel("onnx-int8", calls, turned="text 5")
    cmp = run_compare(ours, _FakeModel("torch", calls), work, settings)  # type: ignore[arg-type]
    assert calls[:2] == ["onnx-int8", "torch"]  # the warm-up, untimed
    timed = calls[2:]
    assert len(timed) == 8 and timed[:4] == ["onnx-int8", "torch", "torch", "onnx-int8"]
    assert cmp.backend == "onnx-int8" and cmp.backend_s > 0 and cmp.torch_s > 0
    assert cmp.min_cos == pytest.approx(0.5)  # text 5: (1,1,1,1) against a one-hot
    assert cmp.mean_cos == pytest.approx((7 + 0.5) / 8)


# --- log and process parsing ----------------------------------------------------------------


def test_stage_of_command_lines() -> None:
    py = "/venv/bin/python"
    assert stage_of([py, "-m", "agents.supervisor", "--stage", "embed"]) == "embed"
    assert stage_of([py, "-m", "ragstream.cli", "worker", "--stages", "write"]) == "write"
    assert stage_of([py, "-m", "ragstream.cli", "worker", "--stages=fetch"]) == "fetch"
    assert (
        stage_of([py, "-m", "ragstream.cli", "worker", "--stages", "fetch,embed,write"])
        == "supervisor"
    )
    assert stage_of(["/venv/bin/ragstream", "worker"]) == "supervisor"
    assert stage_of(["java", "-cp", "libs/*", "kafka.Kafka"]) is None
    lite = ["/venv/bin/milvus-lite", "server", "--data-dir", "/h/milvus.db"]
    assert stage_of(lite) == stage_of(["/venv/bin/python3.11", *lite]) == "milvus"


def test_busy_fraction_and_device() -> None:
    before = {101: 1.5, 102: 0.0}
    after = {101: 9.5, 102: 6.0, 103: 4.0}  # 103 started during the run: no baseline
    assert busy_fraction(before, after, wall_s=10.0) == pytest.approx((0.8 + 0.6) / 2)
    assert busy_fraction({}, after, wall_s=10.0) is None
    assert busy_fraction(before, after, wall_s=0.0) is None
    log = "[INFO] model all-MiniLM-L6-v2 loaded on cpu in 7.1s (dim 384)\n"
    assert device_from_log(log) == "cpu"
    assert device_from_log("nothing") is None


def test_bare_batchings_cover_every_text_once() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(5, 258) for _ in range(333)]
    settings = Settings(embed_batch_tokens=4096, embed_max_batch=32)
    plans = batchings(lengths, settings)
    assert len(plans) == 2
    for batches in plans.values():
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    budget = next(b for name, b in plans.items() if name.startswith("token budget"))
    assert all(len(b) * max(lengths[i] for i in b) <= 4096 for b in budget)
    fixed = fixed_batches(lengths, 32)
    assert all(len(b) == 32 for b in fixed[:-1])
    firsts = [lengths[b[0]] for b in fixed]
    assert firsts == sorted(firsts, reverse=True)  # longest first, so padding is small


# --- publish-to-searchable bookkeeping ------------------------------------------------------


def test_searchable_only_when_every_vector_is_committed() -> None:
    t = SearchableTracker({"d1": "http://x/1", "d2": "http://x/2", "d3": "http://x/3"})
    for url in ("http://x/1", "http://x/2", "http://x/3"):
        t.published(url, 10.0)
    t.vector("d1", "upsert", 0, 3, partition=0, offset=100)
    t.vector("d1", "upsert", 1, 3, partition=0, offset=101)
    t.vector("other", "upsert", 0, 1, partition=0, offset=102)  # not followed: ignored
    assert t.committed({0: 500}, 11.0) == 0  # d1's third vector has not been seen yet
    t.vector("d1", "upsert", 2, 3, partition=0, offset=105)
    assert t.committed({0: 105}, 12.0) == 0  # committed offset 105 = 105 not processed yet
    assert t.committed({0: 106}, 13.0) == 1
    t.vector("d2", "delete", None, 0, partition=1, offset=7)  # a page without text
    assert t.committed({0: 106}, 14.0) == 0  # other partition
    assert t.committed({0: 106, 1: 8}, 15.0) == 1
    assert not t.done
    assert t.latencies() == {"http://x/1": pytest.approx(3.0), "http://x/2": pytest.approx(5.0)}
    # per chunk: d1's first two were searchable at 11 (offsets 100, 101 < 500), before the
    # page (13); its third at 13; a delete has no chunk
    assert sorted(t.chunk_latencies()) == [
        pytest.approx(1.0),
        pytest.approx(1.0),
        pytest.approx(3.0),
    ]


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_bench_runs_end_to_end(broker: str, tmp_path: Path, django_docs: Path, chunker) -> None:
    """``python -m bench --docs 3 --skip-naive``: the bare run and the pipeline on a real
    broker; the JSON line agrees with the chunker, and Milvus was verified."""
    from devtools.corpus import corpus_files, subset
    from streams.documents import page_chunks

    env = {k: v for k, v in os.environ.items() if k not in ("MILVUS_URI", "RAGSTREAM_MILVUS_URI")}
    env |= {
        "RAGSTREAM_BROKER": broker,
        "RAGSTREAM_HOME": str(tmp_path / "home"),
        "RAGSTREAM_MODEL": MINILM,
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--docs", "3", "--skip-naive", "--latency-ms", "20"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    files = subset(corpus_files(django_docs), 3)
    expected = sum(
        len(page_chunks(f"http://h/{p.name}", p.read_bytes(), "text/plain", chunker)) for p in files
    )
    assert out["docs"] == 3 and out["chunks"] == expected
    assert out["milvus_rows"] == out["expected_rows"] == expected + 1  # + the warm-up page
    assert out["ok"] is True and out["dead_letters"] == {}
    assert out["naive_s"] is None and out["speedup"] is None and out["p50_s"] is None
    assert out["bare_s"] > 0 and out["pipeline_s"] > 0
    assert out["efficiency"] == pytest.approx(out["bare_s"] / out["pipeline_s"], rel=1e-3)
    assert out["chunks_per_s"] == pytest.approx(expected / out["pipeline_s"], rel=1e-3)
    assert out["model"] == MINILM and out["device"]
    if out["backend"] == "torch":  # torch fp32 is the backend in use: the same figure
        assert out["bare_torch_tokens_per_s"] == out["bare_tokens_per_s"] > 0
    else:  # timed against torch fp32 in the same run, vectors compared
        assert out["bare_torch_tokens_per_s"] > 0 and out["agreement_mean_cos"] >= 0.99
    assert out["busy_source"] == "metric" and 0 < out["busy_fraction"] <= 1  # from /metrics
    assert {"fetch", "embed", "write"} <= set(out["peak_rss_mb"])
    assert all(v > 20 for v in out["peak_rss_mb"].values())
    assert "efficiency" in proc.stdout  # the human table came before the JSON line


def test_repeats_report_the_median_round_and_the_spread() -> None:
    from bench.__main__ import Round, median_round

    def r(bare: float | None, pipe: float) -> Round:
        return Round(bare, pipe, None)  # type: ignore[arg-type]

    rounds = [r(9.0, 10.0), r(6.0, 10.0), r(8.0, 10.0)]  # 0.9, 0.6, 0.8
    assert median_round(rounds) is rounds[2]
    assert median_round(rounds[:2]) is rounds[1]  # even: the lower middle
    assert median_round([r(None, 10.0), r(None, 12.0)]).pipeline_s == 10.0  # not measured
    result = BenchResult(docs=1, chunks=1, tokens=1, latency_ms=100.0, model="m")
    result.efficiency_runs = [0.9, 0.6, 0.8]
    assert result.efficiency_spread == pytest.approx(0.3)
    assert result.to_json()["efficiency_runs"] == [0.9, 0.6, 0.8]
