"""``ragstream webhooks``: the HTTP server that turns signed webhooks into ``urls`` messages,
and answers searches (``GET /v1/search``).

A process of its own rather than routes on a stage's web server: it scales and restarts
independently of the stages and starts without a model, which the first search loads
(docs/webhooks.md, docs/http-api.md).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from aiohttp import web

from ops.webhooks import create_app
from streams.errors import RagstreamError
from streams.settings import Settings

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "webhooks",
        help="serve POST /v1/urls and /v1/github (signed webhooks onto the urls topic) and "
        "GET /v1/search",
        description="Serve the webhook routes (POST /v1/urls, POST /v1/github, GET /healthz, "
        "GET /readyz) and the search route (GET /v1/search?q=...&k=5&mode=hybrid, unsigned: "
        "read-only; --no-search leaves it out); a webhook is answered 202 once Kafka "
        "acknowledged its messages, a "
        "repeated delivery 200 {duplicate: true}. /v1/urls signs '<timestamp>.<body>' "
        "(X-Ragstream-Timestamp). Secrets: RAGSTREAM_WEBHOOK_SECRET, RAGSTREAM_GITHUB_SECRET.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8088, help="port to listen on (default %(default)s)")
    p.add_argument(
        "--insecure-no-signature",
        action="store_true",
        help="accept unsigned requests on routes whose secret is empty (local testing only)",
    )
    p.add_argument(
        "--no-search",
        action="store_true",
        help="leave out GET /v1/search (it answers anyone who can reach the port)",
    )
    p.set_defaults(func=cmd_webhooks)


def cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    app = create_app(
        settings,
        insecure_no_signature=args.insecure_no_signature,
        search=not args.no_search,
        advertise=(args.host, args.port),
    )
    if args.insecure_no_signature and not settings.webhook_secret:
        log.warning("accepting UNSIGNED requests on /v1/urls (--insecure-no-signature)")
    try:
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            # Let requests in flight get their acks before the producer stops.
            shutdown_timeout=settings.webhook_timeout_s + 2,
            print=lambda msg: log.info(
                "%s (Kafka %s)", msg.splitlines()[0].strip("= "), settings.broker
            ),
        )
    except OSError as exc:
        raise RagstreamError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return 0
