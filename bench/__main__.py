"""``python -m bench``: bare model, naive loop and pipeline on the same pages, one run.

``python -m bench quality ...`` measures retrieval quality instead (``bench.quality``).

Order: the bare model first (it loads the model once), the naive loop (reusing it), then
the pipeline in its own processes, after the bench's model is freed. The last line printed
is one JSON object with every figure (null where not measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from rich.console import Console

from bench.pipeline import PipelineOptions, PipelineResult, run_pipeline, warmup_hook
from bench.report import BenchResult, efficiency, percentile, render
from bench.runs import (
    Workload,
    build_workload,
    naive_settings,
    run_bare,
    run_compare,
    run_naive,
)
from devtools.corpus import CorpusServer, corpus_files, ensure_django_docs, subset
from streams.chunking import Chunker
from streams.errors import RagstreamError
from streams.flops import encoder_shape, gpu_peak_flops, workload_flops
from streams.model import model_config, resolve_model_path
from streams.settings import MINILM, Settings

#: Pages by default: about 200k tokens, a few minutes for all three runs on two CPU cores.
DEFAULT_DOCS = 40
#: Where --random-m3 keeps its model, under the models folder: BGE-M3's full compute.
RANDOM_M3 = "random-bge-m3-24x1024"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure the pipeline against the bare model (efficiency) and the naive "
        "fetch-chunk-embed-insert loop (speed-up) on the Django docs. "
        "`python -m bench quality --help`: retrieval quality instead.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--docs",
        type=int,
        default=DEFAULT_DOCS,
        help=f"pages, a fixed spread-out subset ({DEFAULT_DOCS})",
    )
    size.add_argument("--full", action="store_true", help="all 656 pages")
    p.add_argument("--latency-ms", type=float, default=100.0, help="latency per HTTP request (100)")
    p.add_argument("--skip-bare", action="store_true", help="do not time the bare model")
    p.add_argument("--skip-naive", action="store_true", help="do not time the naive loop")
    p.add_argument(
        "--skip-torch",
        action="store_true",
        help="do not time torch fp32 against the backend in use (nor compare their vectors)",
    )
    p.add_argument(
        "--steady",
        action="store_true",
        help="then republish the pages at --rate and measure publish-to-searchable latency",
    )
    p.add_argument(
        "--rate", type=float, default=None, help="steady pages/s (half the measured throughput)"
    )
    p.add_argument("--fetchers", type=int, default=1, help="fetch processes (1)")
    p.add_argument("--chunk-partitions", type=int, default=1, help="partitions of chunks (1)")
    p.add_argument(
        "--embed-workers",
        type=int,
        default=1,
        help="embed processes (1); more than 1 runs fetch, each embed and write separately",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="N rounds of bare then pipeline, interleaved; the figures are those of the round "
        "with the median efficiency, all rounds' efficiencies beside them (1)",
    )
    p.add_argument(
        "--random-m3",
        action="store_true",
        help="benchmark a model of BGE-M3's shape and compute (XLM-RoBERTa-large, random "
        "weights; built once under RAGSTREAM_MODELS_DIR, else --home's models/): for a GPU without "
        "the real weights",
    )
    p.add_argument("--json-only", action="store_true", help="print only the JSON line")
    p.add_argument(
        "--home", type=Path, default=None, help="bench state (default: $RAGSTREAM_HOME/bench)"
    )
    p.add_argument("--keep", action="store_true", help="keep the run's topics and Milvus files")
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="longest wait for the pipeline (s)"
    )
    return p


def bench_settings() -> Settings:
    """The environment's settings, with MiniLM unless ``RAGSTREAM_MODEL`` names a model."""
    settings = Settings()
    if "model" not in settings.model_fields_set:
        settings = settings.model_copy(update={"model": MINILM})
    return settings


def random_m3_model(settings: Settings, bench_home: Path, console: Console) -> Path:
    """The full-size random BGE-M3 (24 layers, hidden 1024, FFN 4096), built on first use."""
    from devtools.random_m3 import make_random_m3

    dest = (settings.models_dir or bench_home / "models") / RANDOM_M3
    if not (dest / "config.json").exists():
        console.print(f"building a random model of BGE-M3's shape in {dest} (once)")
    return make_random_m3(dest, layers=24, intermediate=4096)


def gpu_name(device: str | None) -> str | None:
    """The GPU's name as torch reports it (the key of the peak table); None off a GPU."""
    if not device or not device.startswith("cuda"):
        return None
    import torch

    return str(torch.cuda.get_device_name(device))


def model_flops(model: str, lengths: list[int]) -> float | None:
    """The model's forward FLOPs over these texts, from its config; None for a shape
    streams.flops does not know."""
    config = model_config(resolve_model_path(model))
    shape = encoder_shape(config) if config is not None else None
    return float(workload_flops(shape, lengths)) if shape is not None else None


def free_gpu_memory() -> None:
    """Hand the bench's cached GPU memory back before the pipeline's embed process loads
    its own model (a no-op where torch was never imported or there is no GPU)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quality"]:  # a verb of its own: the speed bench's options stay as they were
        from bench import quality

        return quality.main(argv[1:])
    args = build_parser().parse_args(argv)
    for name in ("fetchers", "chunk_partitions", "embed_workers", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    # SIGTERM unwinds like Ctrl-C: the workers and a broker we started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import pymilvus  # noqa: F401 - configures its loggers on import: quiet them after

    for noisy in ("grpc._server", "pymilvus"):  # Milvus Lite's harmless complaints
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    err = Console(stderr=True, quiet=args.json_only, soft_wrap=True)
    out = Console(quiet=args.json_only, width=None if sys.stdout.isatty() else 120)
    try:
        result = run(args, err)
    except RagstreamError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    render(result, out)
    print(json.dumps(result.to_json()), flush=True)
    if not result.ok:
        print("bench: WARNING: " + "; ".join(result.warnings), file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, console: Console) -> BenchResult:
    settings = bench_settings()
    bench_home = (args.home or settings.home / "bench").resolve()
    if args.random_m3:  # for the bare run and, through the environment, the workers
        model = random_m3_model(settings, bench_home, console)
        settings = settings.model_copy(update={"model": str(model)})
    docs_root = ensure_django_docs(settings.cache_dir)
    files = corpus_files(docs_root)
    chosen = files if args.full else subset(files, args.docs)
    chunker = Chunker.from_model(
        resolve_model_path(settings.model), settings.chunk_tokens, settings.chunk_overlap
    )
    latency_s = args.latency_ms / 1000
    with CorpusServer(docs_root, latency_s=latency_s, hook=warmup_hook) as server:
        work = build_workload(chosen, server, chunker)
        result = BenchResult(
            docs=work.docs,
            chunks=work.chunks,
            tokens=work.tokens,
            latency_ms=args.latency_ms,
            model=settings.model,
            fetchers=args.fetchers,
            chunk_partitions=args.chunk_partitions,
            embed_workers=args.embed_workers,
            flops=model_flops(settings.model, work.lengths),
        )
        console.print(
            f"[bold]workload:[/] {work.docs} pages, {work.chunks} chunks, {work.tokens:,} "
            f"tokens; {args.latency_ms:g} ms per request; model {settings.model}"
        )
        if not (args.skip_bare and args.skip_naive):
            in_process(args, settings, bench_home, chunker, work, result, console)
            gc.collect()  # the pipeline's embed process should not compete with our model
            free_gpu_memory()
        opts = PipelineOptions(
            fetchers=args.fetchers,
            chunk_partitions=args.chunk_partitions,
            embed_workers=args.embed_workers,
            steady=args.steady,
            rate=args.rate,
            timeout_s=args.timeout,
            keep=args.keep,
        )
        pipe = run_pipeline(settings, bench_home, server, chunker, work, opts, console)
        rounds = [Round(result.bare_s, pipe.seconds, pipe)]
        for i in range(2, args.repeats + 1):  # bare, pipeline, bare, pipeline...: interleaved
            console.print(f"[bold]round {i} of {args.repeats}[/]")
            bare_s = None if args.skip_bare else bare_again(settings, work, console)
            again = run_pipeline(settings, bench_home, server, chunker, work, opts, console)
            rounds.append(Round(bare_s, again.seconds, again))
    chosen_round = median_round(rounds)
    result.efficiency_runs = [r.efficiency for r in rounds] if len(rounds) > 1 else []
    result.bare_s, pipe = chosen_round.bare_s, chosen_round.pipe
    result.pipeline_s = pipe.seconds
    result.device = result.device or pipe.device
    result.gpu = gpu_name(result.device)
    result.gpu_peak_flops = gpu_peak_flops(result.gpu)
    result.peak_rss_mb = pipe.peak_rss_mb
    result.cpu_s = pipe.cpu_s
    result.milvus_rows = pipe.milvus_rows
    result.expected_rows = pipe.expected_rows
    result.dead_letters = pipe.snapshot.dead
    result.warnings += pipe.warnings
    result.namespace, result.run_dir = pipe.namespace, pipe.run_dir
    if pipe.busy_fraction is not None:
        result.busy_fraction, result.busy_source = pipe.busy_fraction, "metric"
    elif result.efficiency is not None:
        result.busy_fraction, result.busy_source = result.efficiency, "approx"
    if pipe.latencies:
        values = list(pipe.latencies.values())
        result.p50_s = percentile(values, 50)
        result.p99_s = percentile(values, 99)
        result.steady_docs = len(values)
        result.steady_rate = pipe.steady_rate
    if pipe.chunk_latencies:
        result.fresh_chunk_p50_s = percentile(pipe.chunk_latencies, 50)
        result.fresh_chunk_p99_s = percentile(pipe.chunk_latencies, 99)
    return result


@dataclasses.dataclass(frozen=True, slots=True)
class Round:
    """One bare run and the pipeline run after it."""

    bare_s: float | None
    pipeline_s: float
    pipe: PipelineResult

    @property
    def efficiency(self) -> float | None:
        return efficiency(self.bare_s, self.pipeline_s)


def median_round(rounds: list[Round]) -> Round:
    """The round whose efficiency is the median (the lower middle of an even count); the
    first when efficiency was not measured. A whole round, so its figures agree."""
    measured = sorted(
        (r for r in rounds if r.efficiency is not None), key=lambda r: r.efficiency or 0
    )
    if not measured:
        return rounds[0]
    return measured[(len(measured) - 1) // 2]


def bare_again(settings: Settings, work: Workload, console: Console) -> float | None:
    """The bare model once more, for a later round (no naive run, no torch comparison)."""
    from streams.embedder import Embedder

    embedder = Embedder(settings)
    try:
        batching = run_bare(
            embedder, work, settings, on_done=lambda n, s: console.print(f"bare, {n}: {s:.2f}s")
        )
    finally:
        del embedder
        gc.collect()
        free_gpu_memory()
    return min(batching.values(), default=None)


def in_process(
    args: argparse.Namespace,
    settings: Settings,
    bench_home: Path,
    chunker: Chunker,
    work: Workload,
    result: BenchResult,
    console: Console,
) -> None:
    """The bare and naive runs, sharing one model loaded here (and freed on return)."""
    from streams.embedder import Embedder  # torch only when needed

    t0 = time.perf_counter()
    embedder = Embedder(settings)
    result.device, result.backend = embedder.device, embedder.backend
    result.precision = embedder.precision
    console.print(
        f"model {settings.model} loaded on {embedder.device} ({embedder.backend}) in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    if not args.skip_bare:
        result.bare_batching = run_bare(
            embedder,
            work,
            settings,
            on_done=lambda name, s: console.print(f"bare, {name}: {s:.2f}s"),
        )
        result.bare_s = min(result.bare_batching.values(), default=None)
        if embedder.backend == "torch" and embedder.device == "cpu":
            result.bare_torch_s = result.bare_s
        elif embedder.backend != "torch" and not args.skip_torch and work.texts:
            reference = Embedder(settings.model_copy(update={"backend": "torch"}))
            cmp = run_compare(embedder, reference, work, settings)
            del reference
            result.compare_backend_s, result.bare_torch_s = cmp.backend_s, cmp.torch_s
            result.agreement_mean_cos, result.agreement_min_cos = cmp.mean_cos, cmp.min_cos
            console.print(
                f"in turns: {cmp.backend} {cmp.backend_s:.2f}s, torch fp32 {cmp.torch_s:.2f}s; "
                f"cosine mean {cmp.mean_cos:.4f}, min {cmp.min_cos:.4f}"
            )
    if not args.skip_naive:
        run_dir = bench_home / "naive" / time.strftime("%Y%m%d-%H%M%S")
        run_dir.mkdir(parents=True, exist_ok=True)
        naive = naive_settings(settings, run_dir)
        seconds, rows = run_naive(embedder, chunker, work, naive)
        result.naive_s = seconds
        console.print(f"naive: {work.docs} pages, {rows} rows in {seconds:.2f}s")
        if rows != work.chunks:
            result.warnings.append(f"naive wrote {rows} rows, expected {work.chunks}")
        if not args.keep:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
    del embedder


if __name__ == "__main__":
    sys.exit(main())
