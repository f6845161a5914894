"""The fast CPU backend: the same weights through ONNX Runtime, fp32 or int8-quantized.

On two CPU cores the embedder is the pipeline's bottleneck, and torch's fp32 forward pass
leaves most of the CPU's int8 throughput (AVX512-VNNI) unused. The model is exported from
the local weights on first use (no download) and cached under ``<home>/models/``, keyed by
a fingerprint of the weights and of the exporter's versions, so a changed model or a new
torch never serves a stale graph. Only the encoder is exported (its last hidden state);
pooling, normalisation and BGE-M3's sparse head stay in numpy, in fp32, so the int8 error
is confined to the encoder and the sparse head needs no graph of its own.

Which backend runs is a pure rule (:func:`resolve_backend`); torch and the exporter are
imported only when a graph has to be built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from streams.errors import ConfigError

log = logging.getLogger(__name__)

#: What ``RAGSTREAM_BACKEND`` accepts; ``auto`` is decided by :func:`resolve_backend`.
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
#: Bumped when the graph (inputs, outputs, opset, quantization) or the way it is run
#: changes its vectors: cached graphs and a bench's cached vectors are keyed by it.
GRAPH_FORMAT = 2
OPSET = 17
#: Files of a model folder that are hashed whole; larger ones by size and sampled bytes.
_WHOLE_BELOW = 1 << 20
_SAMPLE = 1 << 20


def resolve_backend(setting: str, device: str) -> str:
    """The backend for ``device``: ``auto`` is int8 ONNX on a CPU (measured 3x torch fp32
    with vectors that agree, see docs/decisions.md) and torch on a GPU, where torch fp16 is
    fast and ONNX Runtime's CPU provider would be a step back."""
    if setting not in BACKENDS:
        raise ConfigError(f"unknown backend {setting!r}: choose from {', '.join(BACKENDS)}")
    on_cpu = device == "cpu"
    if setting == "auto":
        return "onnx-int8" if on_cpu else "torch"
    if setting != "torch" and not on_cpu:
        raise ConfigError(f"backend {setting} runs on the CPU only; device is {device}")
    return setting


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean, min) cosine between the rows of two ``(n, dim)`` arrays: how far one backend's
    vectors drift from another's. The rows need not be normalised."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"shapes differ or are not (n, dim): {a.shape} vs {b.shape}")
    if a.shape[0] == 0:
        raise ValueError("no vectors to compare")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    cos = (a64 * b64).sum(axis=1) / np.where(norms > 0, norms, 1.0)
    return float(cos.mean()), float(cos.min())


def model_fingerprint(model_path: Path, versions: dict[str, str]) -> str:
    """A short hash of the model folder and the exporter's versions: what the cached graph
    was built from. Small files (configs, vocabularies) are hashed whole; weights by name,
    size and their first and last megabyte, so a multi-GB model is fingerprinted in
    milliseconds while any re-download or retrained file changes it."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": GRAPH_FORMAT, "opset": OPSET, **versions}).encode())
    for f in sorted(p for p in model_path.rglob("*") if p.is_file()):
        rel = f.relative_to(model_path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        size = f.stat().st_size
        h.update(f"\0{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= _WHOLE_BELOW:
                h.update(fh.read())
            else:
                h.update(fh.read(_SAMPLE))
                fh.seek(size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def cache_dir(models_dir: Path, model_name: str, fingerprint: str) -> Path:
    """``<models_dir>/<model>-<fingerprint>`` (``Settings.model_cache``: ``<home>/models``
    unless set): one folder per model and build inputs,
    named after the model's last path part (a model in a temporary folder still finds its
    graph the next time: the fingerprint, not the path, says it is the same model)."""
    name = Path(model_name.rstrip("/\\")).name or model_name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return models_dir / f"{slug[:60]}-{fingerprint}"


def graph_name(quantized: bool) -> str:
    return "model.int8.onnx" if quantized else "model.onnx"


def exporter_versions() -> dict[str, str]:
    """What the graph depends on besides the weights: the installed versions (read from
    the package metadata, nothing imported)."""
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "onnx", "onnxruntime")}


@dataclasses.dataclass(frozen=True)
class Graph:
    """A built graph on disk, and BGE-M3's sparse head beside it (None for other models)."""

    path: Path
    sparse_head: tuple[np.ndarray, float] | None  # (weight (hidden,), bias)


def graph_folder(model_path: Path, models_dir: Path, model_name: str) -> Path:
    """Where this model's graphs are cached under ``models_dir``."""
    return cache_dir(models_dir, model_name, model_fingerprint(model_path, exporter_versions()))


def ensure_graph(model_path: Path, folder: Path, quantized: bool) -> Graph:
    """The cached graph for this model, exported (and quantized) first if missing.

    Two embed processes starting together must not both write the same files: the build is
    under a file lock, each file written under a temporary name and renamed into place
    (the ``.onnx`` last, so its presence means complete). A file that ONNX Runtime cannot
    load is rebuilt by :func:`load_session`.
    """
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / graph_name(quantized)
    with FileLock(str(folder / ".lock")):
        if not (folder / "model.onnx").exists():
            _export(model_path, folder)
        if quantized and not target.exists():
            _quantize(folder / "model.onnx", target)
    return Graph(target, _read_head(folder))


def discard(folder: Path) -> None:
    """Remove a cache folder's graphs after one failed to load or to quantize (a truncated
    or corrupt file), so the next :func:`ensure_graph` builds them again."""
    from filelock import FileLock

    with FileLock(str(folder / ".lock")):
        for name in (graph_name(False), graph_name(True)):
            for p in (folder / name, folder / (name + ".data")):
                p.unlink(missing_ok=True)


def _read_head(folder: Path) -> tuple[np.ndarray, float] | None:
    head = folder / "sparse_head.npz"
    if not head.exists():
        return None
    with np.load(head) as z:
        return z["weight"].astype(np.float32).reshape(-1), float(z["bias"].reshape(-1)[0])


def _publish(tmp: Path, folder: Path, name: str) -> None:
    """Move ``tmp/name`` (and its external data) into ``folder``: data first, graph last."""
    data = tmp / (name + ".data")
    if data.exists():
        os.replace(data, folder / data.name)
    os.replace(tmp / name, folder / name)


def _export(model_path: Path, folder: Path) -> None:
    """Trace the encoder (input ids and mask -> last hidden state) with the TorchScript
    exporter, which handles BERT and XLM-R with dynamic batch and sequence axes."""
    import onnx
    import torch
    from transformers import AutoModel

    log.info("exporting %s to ONNX in %s (once per model)", model_path, folder)
    model = AutoModel.from_pretrained(str(model_path)).float().eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            return out.last_hidden_state

    tmp = folder / f".build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # a padded second row traces the masking path; the axes stay dynamic
        ids = torch.tensor([[1, 5, 6, 7, 2], [1, 5, 2, 0, 0]], dtype=torch.long)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.long)
        axes = {0: "batch", 1: "sequence"}
        with torch.no_grad():
            torch.onnx.export(
                Encoder(model),
                (ids, mask),
                str(tmp / "raw.onnx"),
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
                opset_version=OPSET,
                dynamo=False,
            )
        # one graph file and one data file, whatever the exporter split off (>2 GB models)
        graph = onnx.load(str(tmp / "raw.onnx"))
        onnx.save_model(
            graph,
            str(tmp / "model.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=1024,
        )
        del graph
        head = model_path / "sparse_linear.pt"
        if head.exists():
            state = torch.load(head, map_location="cpu", weights_only=True)
            np.savez(
                tmp / "sparse_head.npz",
                weight=state["weight"].float().numpy(),
                bias=state["bias"].float().numpy(),
            )
            os.replace(tmp / "sparse_head.npz", folder / "sparse_head.npz")
        _publish(tmp, folder, "model.onnx")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quantize(source: Path, target: Path) -> None:
    """int8 weights of the MatMuls, one scale per output channel, activations quantized
    at run time (no calibration data). Measured on MiniLM over Django chunks: per-tensor
    scales drop the mean cosine to torch's to 0.95, per-channel keeps it at 0.995;
    quantizing the embedding lookups (Gather) too costs agreement and saves no time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("quantizing %s to int8", source)
    tmp = target.parent / f".build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        quantize_dynamic(
            str(source),
            str(tmp / target.name),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            use_external_data_format=True,
        )
        _publish(tmp, target.parent, target.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def session_options(threads: int) -> Any:
    """Sessions for a shared machine: ``threads`` intra-op threads that sleep instead of
    spinning when idle (spinning steals the cores the fetch and write stages need)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # the optimizer's notes on every load are not ours to read
    return so


def load_session(
    model_path: Path, models_dir: Path, model_name: str, quantized: bool, threads: int
) -> tuple[Any, Graph]:
    """An ONNX Runtime session on the cached graph, rebuilt once if the file is corrupt."""
    import onnxruntime as ort

    folder = graph_folder(model_path, models_dir, model_name)
    for attempt in (1, 2):
        try:
            graph = ensure_graph(model_path, folder, quantized)
            sess = ort.InferenceSession(
                str(graph.path), session_options(threads), providers=["CPUExecutionProvider"]
            )
            return sess, graph
        except Exception as exc:  # ORT and onnx raise their own untyped errors for a bad file
            if attempt == 2:
                raise ConfigError(f"cannot build or load the ONNX graph in {folder}") from exc
            log.warning("cached graph in %s does not load (%s): rebuilding it", folder, exc)
            discard(folder)
    raise AssertionError("unreachable")


def pool(hidden: np.ndarray, mask: np.ndarray, method: str) -> np.ndarray:
    """Sentence vectors from token states, L2-normalised: mean over real tokens
    (sentence-transformers) or the first token (BGE), as the torch path pools."""
    if method == "mean":
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    else:
        pooled = hidden[:, 0]
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def sparse_weights(hidden: np.ndarray, head: tuple[np.ndarray, float]) -> np.ndarray:
    """BGE-M3's lexical weight per token: ``relu(hidden @ w + b)``, shape (batch, seq)."""
    weight, bias = head
    return np.maximum(hidden @ weight + bias, 0.0).astype(np.float32)
