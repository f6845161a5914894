"""The benchmark's arithmetic and its report: pure functions, tested without Kafka or a model.

Everything a reader compares is derived here from measured seconds and counts, so the
table and the JSON line can never disagree.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

#: The embedder's own log line once its weights are in memory (streams/embedder.py).
MODEL_LOADED = re.compile(r"model (?P<model>\S+) loaded on (?P<device>\S+) in")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either was not measured (or is zero)."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def efficiency(bare_s: float | None, pipeline_s: float | None) -> float | None:
    """Bare-model time / pipeline time: 1.0 means Kafka, HTTP and Milvus cost nothing."""
    return ratio(bare_s, pipeline_s)


def speedup(naive_s: float | None, pipeline_s: float | None) -> float | None:
    """Naive time / pipeline time: how much faster than fetch-chunk-embed-insert in a loop."""
    return ratio(naive_s, pipeline_s)


def speedup_bound(bare_s: float | None, pages: int, latency_s: float) -> float | None:
    """The most a pipeline can gain over the naive loop on a machine where the model is the
    bottleneck (a CPU): the naive loop pays encoding plus every page's latency in sequence,
    a perfect pipeline pays only the encoding. ``(bare + pages * latency) / bare``."""
    if bare_s is None or bare_s <= 0:
        return None
    return (bare_s + pages * latency_s) / bare_s


def per_second(count: int | None, seconds: float | None) -> float | None:
    return ratio(float(count) if count is not None else None, seconds)


def flops_share(flops: float | None, seconds: float | None, peak: float | None) -> float | None:
    """The share of the GPU's bf16 peak that the model's own FLOPs reached in ``seconds``
    (model FLOPs utilisation): tokens/s made comparable across models and cards. None on a
    CPU or an unlisted GPU (no peak), or when not measured."""
    return ratio(ratio(flops, seconds), peak)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks (as
    numpy's default); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def stage_of(cmdline: Sequence[str]) -> str | None:
    """Which stage a worker process runs, from its command line.

    ``python -m agents.supervisor --stage embed`` (a supervisor's child) and ``ragstream
    worker --stages embed`` (a single stage run in place) are that stage; ``--stages`` with
    several stages is the supervisor; the ``milvus-lite server`` a worker runs for the write
    stage (``streams/milvus_lite.py``) is ``milvus``, the store's own memory beside the
    stages'; anything else (None) is not ours to label.
    """
    args = list(cmdline)
    pairs = zip(args, args[1:], strict=False)
    if any(a.endswith("milvus-lite") and b == "server" for a, b in pairs):
        return "milvus"  # the console script, run by its interpreter (python .../milvus-lite)
    for flag in ("--stage", "--stages"):
        value = None
        for i, arg in enumerate(args):
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
        if value is not None:
            stages = [s for s in value.split(",") if s]
            return stages[0] if len(stages) == 1 else "supervisor"
    if "worker" in args and any(a.endswith(("ragstream.cli", "ragstream")) for a in args):
        return "supervisor"  # `ragstream worker` with the default stages
    return None


def busy_fraction(before: dict[int, float], after: dict[int, float], wall_s: float) -> float | None:
    """The embedders' mean busy fraction over a measurement, from each embed process's
    ``ragstream_embed_busy_seconds_total`` (by pid) read before and after it. None when no
    process was read both times (the metrics endpoint is off)."""
    both = [pid for pid in after if pid in before]
    if not both or wall_s <= 0:
        return None
    return sum(max(after[p] - before[p], 0.0) / wall_s for p in both) / len(both)


def device_from_log(text: str) -> str | None:
    """The device the embed stage loaded its model on (its "model ... loaded on X" line)."""
    found = MODEL_LOADED.findall(text)
    return found[-1][1] if found else None


@dataclasses.dataclass
class BenchResult:
    """Everything one ``python -m bench`` run measured (None: not measured in this run)."""

    docs: int
    chunks: int
    tokens: int
    latency_ms: float
    model: str
    device: str | None = None
    backend: str | None = None  # the embedder's backend (torch, onnx, onnx-int8)
    precision: str | None = None  # the torch model's dtype (bf16, fp16, fp32)
    gpu: str | None = None  # the GPU's name, as torch reports it
    flops: float | None = None  # the model's forward FLOPs over the workload (streams.flops)
    gpu_peak_flops: float | None = None  # the GPU's dense bf16 peak FLOP/s
    bare_s: float | None = None
    # the backend in use against torch fp32, same batches timed in turns (bench.runs)
    compare_backend_s: float | None = None
    bare_torch_s: float | None = None
    agreement_mean_cos: float | None = None
    agreement_min_cos: float | None = None
    bare_batching: dict[str, float] = dataclasses.field(default_factory=dict)
    naive_s: float | None = None
    pipeline_s: float | None = None
    p50_s: float | None = None
    p99_s: float | None = None
    efficiency_runs: list[float | None] = dataclasses.field(default_factory=list)  # --repeats
    fresh_chunk_p50_s: float | None = None  # per chunk (p50_s, p99_s: per page)
    fresh_chunk_p99_s: float | None = None
    steady_rate: float | None = None
    steady_docs: int | None = None
    peak_rss_mb: dict[str, float] = dataclasses.field(default_factory=dict)
    cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)  # per stage, timed part
    busy_fraction: float | None = None
    busy_source: str | None = None
    milvus_rows: int | None = None
    expected_rows: int | None = None
    dead_letters: dict[str, int] = dataclasses.field(default_factory=dict)
    fetchers: int = 1
    chunk_partitions: int = 1
    embed_workers: int = 1
    namespace: str | None = None  # the pipeline run's app_id / topic prefix
    run_dir: str | None = None  # where its worker logs are
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def efficiency(self) -> float | None:
        return efficiency(self.bare_s, self.pipeline_s)

    @property
    def efficiency_spread(self) -> float | None:
        """Largest minus smallest efficiency over the rounds of ``--repeats``."""
        runs = [e for e in self.efficiency_runs if e is not None]
        return max(runs) - min(runs) if len(runs) > 1 else None

    @property
    def speedup(self) -> float | None:
        return speedup(self.naive_s, self.pipeline_s)

    @property
    def speedup_bound(self) -> float | None:
        return speedup_bound(self.bare_s, self.docs, self.latency_ms / 1000)

    @property
    def flops_per_token(self) -> float | None:
        """Mean forward FLOPs per token over the workload (attention at each text's length)."""
        return ratio(self.flops, float(self.tokens))

    @property
    def bare_flops_share(self) -> float | None:
        return flops_share(self.flops, self.bare_s, self.gpu_peak_flops)

    @property
    def pipeline_flops_share(self) -> float | None:
        return flops_share(self.flops, self.pipeline_s, self.gpu_peak_flops)

    @property
    def ok(self) -> bool:
        """Every check held: Milvus holds exactly the expected rows (when it could be
        counted), no dead letters, and no warning (a count that disagreed, a page that never
        became searchable)."""
        rows_ok = self.milvus_rows is None or self.milvus_rows == self.expected_rows
        return rows_ok and not self.dead_letters and not self.warnings

    def rates(self, seconds: float | None) -> dict[str, float | None]:
        return {
            "docs_per_s": per_second(self.docs, seconds),
            "chunks_per_s": per_second(self.chunks, seconds),
            "tokens_per_s": per_second(self.tokens, seconds),
        }

    def to_json(self) -> dict[str, Any]:
        """The machine-readable summary: the last line ``python -m bench`` prints."""
        pipe = self.rates(self.pipeline_s)
        return {
            "bare_s": _r(self.bare_s),
            "naive_s": _r(self.naive_s),
            "pipeline_s": _r(self.pipeline_s),
            "efficiency": _r(self.efficiency),
            "speedup": _r(self.speedup),
            "speedup_bound": _r(self.speedup_bound),
            "chunks_per_s": _r(pipe["chunks_per_s"]),
            "docs_per_s": _r(pipe["docs_per_s"]),
            "tokens_per_s": _r(pipe["tokens_per_s"]),
            "bare_tokens_per_s": _r(per_second(self.tokens, self.bare_s)),
            "backend": self.backend,
            "bare_torch_tokens_per_s": _r(per_second(self.tokens, self.bare_torch_s)),
            "compare_tokens_per_s": _r(per_second(self.tokens, self.compare_backend_s)),
            "backend_speedup": _r(ratio(self.bare_torch_s, self.compare_backend_s)),
            "agreement_mean_cos": _r(self.agreement_mean_cos, 6),
            "agreement_min_cos": _r(self.agreement_min_cos, 6),
            "p50_s": _r(self.p50_s),
            "p99_s": _r(self.p99_s),
            "efficiency_runs": [_r(e) for e in self.efficiency_runs],
            "efficiency_spread": _r(self.efficiency_spread),
            "fresh_chunk_p50_s": _r(self.fresh_chunk_p50_s),
            "fresh_chunk_p99_s": _r(self.fresh_chunk_p99_s),
            "steady_rate": _r(self.steady_rate),
            "steady_docs": self.steady_docs,
            "busy_fraction": _r(self.busy_fraction),
            "busy_source": self.busy_source,
            "docs": self.docs,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "latency_ms": self.latency_ms,
            "model": self.model,
            "device": self.device,
            "gpu": self.gpu,
            "precision": self.precision,
            "flops_per_token": _r(self.flops_per_token, 0),
            "gpu_peak_flops": self.gpu_peak_flops,
            "bare_flops_share": _r(self.bare_flops_share),
            "pipeline_flops_share": _r(self.pipeline_flops_share),
            "peak_rss_mb": {k: round(v, 1) for k, v in sorted(self.peak_rss_mb.items())},
            "cpu_s": {k: round(v, 2) for k, v in sorted(self.cpu_s.items())},
            "bare_batching_s": {k: _r(v) for k, v in self.bare_batching.items()},
            "milvus_rows": self.milvus_rows,
            "expected_rows": self.expected_rows,
            "dead_letters": self.dead_letters,
            "fetchers": self.fetchers,
            "chunk_partitions": self.chunk_partitions,
            "embed_workers": self.embed_workers,
            "namespace": self.namespace,
            "run_dir": self.run_dir,
            "warnings": self.warnings,
            "ok": self.ok,
        }


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def flops_lines(result: BenchResult) -> list[str]:
    """Tokens/s of the bare model and the pipeline beside the share of the GPU's peak."""
    peak = result.gpu_peak_flops
    head = f"model FLOPs per token:            {(result.flops_per_token or 0) / 1e9:.3f} GFLOP"
    if peak is None:
        where = result.gpu or result.device or "?"
        return [head + f"  (no bf16 peak known for {where}: no share)"]
    lines = [head + f"; bf16 peak of {result.gpu}: {peak / 1e12:,.0f} TFLOP/s"]
    for name, seconds, share in (
        ("bare", result.bare_s, result.bare_flops_share),
        ("pipeline", result.pipeline_s, result.pipeline_flops_share),
    ):
        tokens = _fmt(per_second(result.tokens, seconds), ",.0f")
        lines.append(f"  {name + ':':<31} {tokens} tokens/s = {_fmt(share, '.1%')} of peak")
    return lines


def render(result: BenchResult, console: Console) -> None:
    """The human report: one row per run, then the ratios, latency and memory."""
    table = Table(
        title=(
            f"{result.docs} pages, {result.chunks} chunks, {result.tokens:,} tokens; "
            f"{result.latency_ms:g} ms per request; {result.model} on {result.device or '?'}"
            f" ({' '.join(x for x in (result.backend or '?', result.precision) if x)})"
        )
    )
    for col in ("run", "wall s", "docs/s", "chunks/s", "tokens/s"):
        table.add_column(col, justify="left" if col == "run" else "right")

    def row(name: str, seconds: float | None) -> None:
        r = result.rates(seconds)
        table.add_row(
            name,
            _fmt(seconds),
            _fmt(r["docs_per_s"]),
            _fmt(r["chunks_per_s"], ".1f"),
            _fmt(r["tokens_per_s"], ",.0f"),
        )

    if result.bare_s is not None:
        for name, seconds in result.bare_batching.items():
            best = " (best)" if seconds == result.bare_s else ""
            row(f"bare, {name}{best}", seconds)
    if result.bare_torch_s is not None and result.compare_backend_s is not None:
        row("bare, torch fp32 (in turns)", result.bare_torch_s)
        row(f"bare, {result.backend} (in turns)", result.compare_backend_s)
    row("naive", result.naive_s)
    shape = (
        f" ({result.fetchers} fetch, {result.embed_workers} embed, "
        f"{result.chunk_partitions} chunks part.)"
        if (result.fetchers, result.embed_workers, result.chunk_partitions) != (1, 1, 1)
        else ""
    )
    row(f"pipeline{shape}", result.pipeline_s)
    console.print(table)

    busy_label = {
        "metric": "from ragstream_embed_busy_seconds_total",
        "approx": "approx.: bare_s / pipeline_s",
    }.get(result.busy_source or "", "")
    lines = [
        f"efficiency (bare / pipeline):     {_fmt(result.efficiency, '.1%')}",
        *(
            [
                "  over the rounds:                "
                + ", ".join(_fmt(e, ".1%") for e in result.efficiency_runs)
                + f"  (median shown; spread {_fmt(result.efficiency_spread, '.1%')})"
            ]
            if result.efficiency_runs
            else []
        ),
        f"speed-up (naive / pipeline):      {_fmt(result.speedup, '.2f', 'x')}",
        f"speed-up bound on a CPU:          {_fmt(result.speedup_bound, '.2f', 'x')}"
        "  ((bare + pages x latency) / bare)",
        f"embedder busy fraction:           {_fmt(result.busy_fraction, '.1%')}  {busy_label}",
    ]
    if result.agreement_mean_cos is not None:
        lines.append(
            f"{result.backend} vs torch fp32:     "
            f"{_fmt(ratio(result.bare_torch_s, result.compare_backend_s), '.2f', 'x')} tokens/s"
            f", cosine mean {result.agreement_mean_cos:.4f}, min "
            f"{_fmt(result.agreement_min_cos, '.4f')} over {result.chunks} chunks"
        )
    if result.flops_per_token is not None:
        lines += flops_lines(result)
    if result.p50_s is not None:
        lines.append(
            f"publish-to-searchable latency:    p50 {result.p50_s:.2f} s, p99 "
            f"{_fmt(result.p99_s)} s  ({result.steady_docs} pages at "
            f"{_fmt(result.steady_rate)} pages/s)"
        )
    if result.fresh_chunk_p50_s is not None:
        lines.append(
            f"  per chunk:                      p50 {result.fresh_chunk_p50_s:.2f} s, p99 "
            f"{_fmt(result.fresh_chunk_p99_s)} s"
        )
    if result.cpu_s:
        cpu = ", ".join(f"{k} {v:,.1f}" for k, v in sorted(result.cpu_s.items()))
        lines.append(f"CPU seconds per stage (pipeline): {cpu}")
    if result.peak_rss_mb:
        rss = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(result.peak_rss_mb.items()))
        lines.append(f"peak RSS per process (MB):        {rss}")
    if result.milvus_rows is not None:
        mark = "ok" if result.milvus_rows == result.expected_rows else "MISMATCH"
        lines.append(
            f"Milvus rows after the pipeline:   {result.milvus_rows} "
            f"(expected {result.expected_rows}: {mark})"
        )
    for line in lines:
        console.print(line)
    for warning in result.warnings:
        console.print(f"[bold red]WARNING:[/] {warning}")
