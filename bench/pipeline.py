"""The pipeline run: ``ragstream worker`` processes on a real broker, timed from the outside.

The bench takes a fresh namespace (topics, consumer groups, Milvus Lite file) on the broker
in ``RAGSTREAM_BROKER``, or on a private one it starts and stops. It starts the workers,
waits until they are warm (a warm-up page went through every stage and every embed process
logged its model as loaded), so that process start and model load are not counted, then
publishes every page and times until the writer has committed every vector. Afterwards it
stops the workers and counts the rows in Milvus.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console

from bench.latency import SearchableTracker
from bench.report import MODEL_LOADED, busy_fraction, device_from_log, stage_of
from bench.runs import Workload
from devtools import kafka_local
from devtools.corpus import CorpusHandler, CorpusServer
from ops.progress import Snapshot, snapshot_raw, wait_indexed
from ops.publisher import publish
from ops.stack import broker_answers
from ops.status import read_process
from streams import kafka, runfiles
from streams.chunking import Chunker
from streams.documents import page_chunks
from streams.ids import doc_id, normalize_url
from streams.messages import UrlRequest, decode_vector, encode_url
from streams.settings import Settings
from streams.store import MilvusStore
from streams.topics import URLS, VECTORS, ensure_topics

WARMUP_PATH = "/__bench_warmup__.txt"
WARMUP_BODY = (
    b"Warm-up page of the ragstream benchmark.\n\n"
    b"It goes through every stage before the measurement starts, so that process start, "
    b"consumer-group joins, the model load and the first Milvus write are not timed.\n"
)


def warmup_hook(handler: CorpusHandler) -> bool:
    """``CorpusServer`` hook: serves the warm-up page, a URL outside the corpus, so the
    warm-up never touches a measured page (even with ``--full``)."""
    if urlsplit(handler.path).path != WARMUP_PATH:
        return False
    handler.reply(200, WARMUP_BODY, "text/plain; charset=utf-8")
    return True


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    fetchers: int = 1
    chunk_partitions: int = 1
    embed_workers: int = 1
    steady: bool = False
    rate: float | None = None  # steady pages/s; None: half the measured throughput
    timeout_s: float = 3600.0
    startup_timeout_s: float = 600.0
    keep: bool = False


@dataclasses.dataclass
class PipelineResult:
    seconds: float
    snapshot: Snapshot
    milvus_rows: int | None
    expected_rows: int
    peak_rss_mb: dict[str, float]
    cpu_s: dict[str, float]  # CPU seconds per stage (and the broker) in the timed part
    device: str | None
    busy_fraction: float | None  # from the embedders' /metrics; None when not served
    latencies: dict[str, float] = dataclasses.field(default_factory=dict)
    chunk_latencies: list[float] = dataclasses.field(default_factory=list)
    steady_rate: float | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    namespace: str = ""
    run_dir: str = ""


# --- the broker -----------------------------------------------------------------------------


@contextlib.contextmanager
def broker(settings: Settings, bench_home: Path, console: Console) -> Iterator[str]:
    """The bootstrap address to use: ``RAGSTREAM_BROKER`` if it answers, else a private
    broker under ``bench_home`` on a free port, stopped on exit."""
    if broker_answers(settings.broker):
        yield settings.broker
        return
    own = settings.model_copy(update={"home": bench_home})
    running = kafka_local.status(own)
    console.print(
        f"no broker at {settings.broker}: starting a private one under {bench_home / 'kafka'}"
    )
    info = kafka_local.up(own) if running else kafka_local.up(own, port=kafka_local.free_port())
    try:
        yield info.bootstrap
    finally:
        kafka_local.down(own)


def pipeline_settings(
    settings: Settings, bootstrap: str, bench_home: Path, opts: PipelineOptions
) -> tuple[Settings, Path]:
    """A fresh namespace: its own topics, consumer groups, Faust data and Milvus target."""
    ns = f"bench{time.strftime('%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
    run_dir = (bench_home / "runs" / ns).resolve()
    update: dict[str, object] = {
        "home": run_dir,
        "broker": bootstrap,
        "app_id": ns,
        "topic_prefix": f"{ns}.",
        "chunk_partitions": opts.chunk_partitions,
        # The corpus server is on loopback, which the SSRF guard refuses unless allowed (as
        # an intranet user would); it is the bench's own server, so no per-host rate limit.
        "fetch_allow": ",".join(a for a in (settings.fetch_allow, "127.0.0.1/32") if a),
    }
    for name in ("fetch_host_rate", "fetch_host_rate_max"):
        if name not in settings.model_fields_set:
            update[name] = 10_000.0
    if settings.milvus_is_lite:
        # Empty URI = <home>/milvus.db. Not an explicit path: it would reach the workers as
        # MILVUS_URI, and pymilvus rejects a non-http MILVUS_URI at import time.
        update |= {"milvus_uri": "", "collection": "bench"}
    else:
        update["collection"] = f"bench_{ns}"
    return settings.model_copy(update=update), run_dir


# --- worker processes -----------------------------------------------------------------------


class Workers:
    """``ragstream worker`` processes: one supervisor running every stage, or (with several
    embed workers) fetch, each embed and write started separately."""

    def __init__(self, settings: Settings, run_dir: Path, opts: PipelineOptions) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **settings.to_env(),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        base = [sys.executable, "-m", "ragstream.cli", "worker"]
        fetchers = ["--fetchers", str(opts.fetchers)]
        if opts.embed_workers <= 1:
            plan = [("all", [*base, "--stages", "fetch,embed,write", *fetchers])]
        else:
            plan = [("fetch", [*base, "--stages", "fetch", *fetchers])]
            plan += [(f"embed{i}", [*base, "--stages", "embed"]) for i in range(opts.embed_workers)]
            plan.append(("write", [*base, "--stages", "write"]))
        self.embed_workers = max(opts.embed_workers, 1)
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        for name, cmd in plan:
            log = run_dir / f"worker-{name}.log"
            with open(log, "ab") as fh:
                proc = subprocess.Popen(
                    cmd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.procs.append((name, proc, log))

    @property
    def pids(self) -> list[int]:
        return [p.pid for _, p, _ in self.procs]

    @property
    def embed_logs(self) -> list[Path]:
        return [log for name, _, log in self.procs if name == "all" or name.startswith("embed")]

    def check(self) -> None:
        """Raise if a worker process exited (with the end of its log)."""
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"worker {name} exited with {proc.returncode}; end of {log}:\n{tail(log)}"
                )

    def models_loaded(self) -> int:
        return sum(len(MODEL_LOADED.findall(read(log))) for log in self.embed_logs)

    def stop(self) -> None:
        """SIGTERM (the supervisor stops its stages), then SIGKILL whatever is left."""
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 60
        for _, proc, _ in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of its session, if any


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def read(path: Path) -> str:
    return read_bytes(path).decode("utf-8", "replace")


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(read(path).splitlines()[-lines:])


class RssSampler(threading.Thread):
    """Samples the workers' process trees (and the broker's JVM) every ``interval_s``; keeps
    the peak RSS per stage (the largest single process of that stage, identified by
    ``--stage X`` in argv) and, between :meth:`mark` and :meth:`stop`, the CPU seconds each
    stage spent: on two cores what the other stages and the broker burn is what the model
    cannot have, so these figures say where the pipeline's time goes."""

    def __init__(self, roots: list[int], interval_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.roots = roots
        self.interval_s = interval_s
        self.peak_mb: dict[str, float] = {}
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (label, last CPU seconds seen)
        self._cpu_mark: dict[int, float] = {}
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def _procs(self) -> Iterator[tuple[str, object]]:
        import psutil

        for root in self.roots:
            try:
                top = psutil.Process(root)
                procs = [top, *top.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    yield stage_of(proc.cmdline()) or "other", proc
                except psutil.Error:
                    continue
        for proc in psutil.process_iter(["cmdline"]):
            if "kafka.Kafka" in (proc.info.get("cmdline") or []):
                yield "broker", proc

    def sample(self) -> None:
        import psutil

        with self._lock:
            for label, proc in self._procs():
                assert isinstance(proc, psutil.Process)
                try:
                    mb = proc.memory_info().rss / 2**20
                    cpu = proc.cpu_times()
                except psutil.Error:
                    continue
                if label != "broker":
                    self.peak_mb[label] = max(self.peak_mb.get(label, 0.0), mb)
                self._cpu[proc.pid] = (label, cpu.user + cpu.system)

    def mark(self) -> None:
        """Start counting CPU seconds from now (the timed part of the run)."""
        self.sample()
        with self._lock:
            self._cpu_mark = {pid: s for pid, (_, s) in self._cpu.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds per stage since :meth:`mark` (a process that exited keeps its last
        sample); empty without a mark."""
        self.sample()
        out: dict[str, float] = {}
        with self._lock:
            if not self._cpu_mark:
                return out
            for pid, (label, s) in self._cpu.items():
                out[label] = out.get(label, 0.0) + s - self._cpu_mark.get(pid, 0.0)
        return out

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval_s)

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join(timeout=5)
        return dict(self.peak_mb)


# --- the run --------------------------------------------------------------------------------


def run_pipeline(
    base: Settings,
    bench_home: Path,
    server: CorpusServer,
    chunker: Chunker,
    work: Workload,
    opts: PipelineOptions,
    console: Console,
) -> PipelineResult:
    """Warm the workers, publish every page, time until all is written; verify Milvus."""
    with broker(base, bench_home, console) as bootstrap:
        settings, run_dir = pipeline_settings(base, bootstrap, bench_home, opts)
        try:
            return _run(settings, run_dir, server, chunker, work, opts, console)
        finally:
            _cleanup(settings, run_dir, opts.keep)


def _run(
    settings: Settings,
    run_dir: Path,
    server: CorpusServer,
    chunker: Chunker,
    work: Workload,
    opts: PipelineOptions,
    console: Console,
) -> PipelineResult:
    warnings: list[str] = []
    asyncio.run(ensure_topics(settings))
    warm_url = normalize_url(server.base_url.rstrip("/") + WARMUP_PATH)
    warm_rows = len(page_chunks(warm_url, WARMUP_BODY, "text/plain; charset=utf-8", chunker))
    base0 = asyncio.run(snapshot_raw(settings))

    console.print(f"pipeline: namespace {settings.app_id}, logs in {run_dir}")
    t_start = time.perf_counter()
    workers = Workers(settings, run_dir, opts)
    sampler = RssSampler(workers.pids)
    sampler.start()
    try:
        asyncio.run(publish(settings, [UrlRequest(url=warm_url, source="bench-warmup")]))
        _wait(settings, base0, 1, workers, opts.startup_timeout_s, None)
        deadline = time.monotonic() + opts.startup_timeout_s
        while workers.models_loaded() < workers.embed_workers:
            workers.check()
            if time.monotonic() > deadline:
                raise TimeoutError("the embed workers did not load their models in time")
            time.sleep(0.2)
        console.print(f"pipeline: workers warm after {time.perf_counter() - t_start:.1f}s")

        base = asyncio.run(snapshot_raw(settings))
        busy_before = busy_seconds(settings)
        n = len(work.pages)
        reqs = [UrlRequest(url=p.url, source="bench") for p in work.pages]
        sampler.mark()
        t0 = time.perf_counter()
        asyncio.run(publish(settings, reqs))
        snap = _wait(settings, base, n, workers, opts.timeout_s, console)
        seconds = time.perf_counter() - t0
        cpu_s = sampler.cpu_seconds()
        busy = busy_fraction(busy_before, busy_seconds(settings), seconds)
        console.print(f"pipeline: {n} pages indexed in {seconds:.2f}s")

        if snap.chunks != work.messages or snap.vectors != work.messages:
            warnings.append(
                f"the pipeline produced {snap.chunks} chunk and {snap.vectors} vector messages; "
                f"the chunker gives {work.messages} for these pages"
            )
        if snap.dead:
            warnings.append(f"dead letters: {snap.dead}")

        latencies: dict[str, float] = {}
        chunk_latencies: list[float] = []
        rate = None
        if opts.steady:
            rate = opts.rate or (max(n / seconds / 2, 0.05) if seconds > 0 else 1.0)
            console.print(f"steady: republishing {n} pages at {rate:.2f} pages/s (force)")
            latencies, chunk_latencies = asyncio.run(
                steady(settings, [p.url for p in work.pages], rate, workers, opts.timeout_s)
            )
            if len(latencies) < n:
                warnings.append(f"steady: only {len(latencies)} of {n} pages became searchable")
    finally:
        try:
            peak = sampler.stop()
            device = device_from_log("".join(read(log) for log in workers.embed_logs))
        finally:
            workers.stop()

    expected_rows = work.chunks + warm_rows
    rows = _milvus_rows(settings, warnings)
    if rows is not None and rows != expected_rows:
        warnings.append(f"Milvus holds {rows} rows; expected exactly {expected_rows}")
    return PipelineResult(
        seconds=seconds,
        snapshot=snap,
        milvus_rows=rows,
        expected_rows=expected_rows,
        peak_rss_mb=peak,
        cpu_s=cpu_s,
        device=device,
        busy_fraction=busy,
        latencies=latencies,
        chunk_latencies=chunk_latencies,
        steady_rate=rate,
        warnings=warnings,
        namespace=settings.app_id,
        run_dir=str(run_dir),
    )


def _wait(
    settings: Settings,
    base: dict[str, int],
    n: int,
    workers: Workers,
    timeout_s: float,
    console: Console | None,
) -> Snapshot:
    last = [0.0]

    def update(snap: Snapshot) -> None:
        workers.check()
        now = time.monotonic()
        if console is not None and now - last[0] >= 5:
            last[0] = now
            console.print(
                f"  fetched {snap.fetched}/{snap.urls}, embedded {snap.embedded}/{snap.chunks}, "
                f"written {snap.written}/{snap.vectors}"
            )

    return asyncio.run(wait_indexed(settings, base, n, update, timeout_s=timeout_s, poll_s=0.2))


def busy_seconds(settings: Settings) -> dict[int, float]:
    """Each running embed process's ``ragstream_embed_busy_seconds_total``, by pid."""
    out: dict[int, float] = {}
    for rec in runfiles.read(settings, "embed"):
        reading = read_process(rec)
        if reading is not None:
            out[rec.pid] = reading.total("ragstream_embed_busy_seconds_total")
    return out


def _milvus_rows(settings: Settings, warnings: list[str]) -> int | None:
    """Rows in the pipeline's collection, counted one by one (distinct ids)."""
    try:
        store = MilvusStore(settings)
    except Exception as exc:  # reported, not fatal to the report
        warnings.append(f"cannot open Milvus to verify: {exc}")
        return None
    try:
        ids = [r["id"] for r in store.rows(("id",))]
    finally:
        store.close()
    if len(ids) != len(set(ids)):
        warnings.append(f"Milvus returned {len(ids) - len(set(ids))} duplicate ids")
    return len(set(ids))


async def steady(
    settings: Settings,
    urls: list[str],
    rate: float,
    workers: Workers,
    timeout_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, float], list[float]]:
    """Publish ``urls`` (force: re-embed although unchanged) at ``rate`` pages/s and return
    each one's publish-ack-to-searchable seconds, and each chunk's."""
    tracker = SearchableTracker({doc_id(u): u for u in urls})
    vtopic = settings.topic(VECTORS)
    consumer = kafka.consumer(settings)
    producer = kafka.producer(settings, linger_ms=0)
    client = kafka.admin(settings)
    await consumer.start()
    await producer.start()
    await client.start()
    stop = asyncio.Event()
    try:
        tps = await kafka.partitions(client, [vtopic])
        consumer.assign(tps)
        for tp, end in (await consumer.end_offsets(tps)).items():
            consumer.seek(tp, end)

        async def read_vectors() -> None:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=100)
                for tp, records in batches.items():
                    for rec in records:
                        c = decode_vector(rec.value).chunk
                        tracker.vector(
                            c.doc_id, c.op, c.chunk_index, c.chunk_count, tp.partition, rec.offset
                        )

        async def follow_commits() -> None:
            group = settings.group("write")
            while not stop.is_set():
                offsets = await client.list_consumer_group_offsets(group)
                now = clock()
                tracker.committed(
                    {tp.partition: m.offset for tp, m in offsets.items() if tp.topic == vtopic},
                    now,
                )
                if tracker.done:
                    stop.set()
                await asyncio.sleep(0.1)

        async def publish_at_rate() -> None:
            topic = settings.topic(URLS)
            t0 = clock()
            pending = []
            for i, url in enumerate(urls):
                await asyncio.sleep(max(t0 + i / rate - clock(), 0))
                req = UrlRequest(url=url, source="bench-steady", force=True)
                fut = await producer.send(topic, encode_url(req), key=req.key())
                fut.add_done_callback(lambda _f, u=url: tracker.published(u, clock()))
                pending.append(fut)
            await asyncio.gather(*pending)

        tasks = [asyncio.create_task(read_vectors()), asyncio.create_task(follow_commits())]
        await publish_at_rate()
        deadline = time.monotonic() + timeout_s
        while not stop.is_set():
            workers.check()
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
        return tracker.latencies(), tracker.chunk_latencies()
    finally:
        stop.set()
        await consumer.stop()
        await producer.stop()
        await client.close()


def _cleanup(settings: Settings, run_dir: Path, keep: bool) -> None:
    """Delete the run's topics from the broker and its Milvus and Faust data from disk
    (the worker logs stay); ``--keep`` keeps everything."""
    if keep:
        return

    async def drop_topics() -> None:
        client = kafka.admin(settings)
        await client.start()
        try:
            mine = [
                t
                for t in await client.list_topics()
                if t.startswith((settings.topic_prefix, settings.app_id + "-"))
            ]
            if mine:
                await client.delete_topics(mine)
        finally:
            await client.close()

    with contextlib.suppress(Exception):
        asyncio.run(drop_topics())
    for sub in ("milvus.db", "faust"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
