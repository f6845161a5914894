"""Logging set up once for every ragstream process: text for people, JSON for log shippers.

``RAGSTREAM_LOG_FORMAT=json`` writes one JSON object per line (time, level, logger,
message, process, stage, and the traceback as one string), so Loki, Elasticsearch or
CloudWatch index fields instead of parsing prose, and a multi-line traceback stays one
record. The CLI and each stage process call :func:`setup`; nothing else configures the
root logger.
"""

from __future__ import annotations

import logging
import logging.config
import os
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Libraries that narrate their start-up at INFO; quiet unless debugging.
CHATTY = ("faiss", "faiss.loader", "milvus_lite", "httpx")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``stage`` names the pipeline stage of the process."""

    def __init__(self, stage: str | None = None) -> None:
        super().__init__()
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process or os.getpid(),
        }
        if self.stage:
            out["stage"] = self.stage
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when configured:
    a caller that swaps stderr (pytest's capture, a CLI run in-process) and closes its
    stream must not leave the root logger writing to a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def logging_config(
    log_format: str = "text", level: int = logging.INFO, stage: str | None = None
) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of a ragstream process: also handed to Faust's
    worker, which otherwise installs its own coloured text handler over ours."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter, "stage": stage} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    quiet = {name: {"level": "WARNING"} for name in CHATTY} if level > logging.DEBUG else {}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ragstream": formatter},
        "handlers": {"default": {"()": StderrHandler, "formatter": "ragstream"}},
        "loggers": quiet,
        "root": {"level": level, "handlers": ["default"]},
    }


def setup(log_format: str = "text", level: int = logging.INFO, stage: str | None = None) -> None:
    """Configure the root logger (replacing handlers set before, e.g. by a library)."""
    logging.config.dictConfig(logging_config(log_format, level, stage))
