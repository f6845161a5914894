"""The embedding model: loaded once per process, called in batches, on one of two backends.

``torch`` (the default on a GPU) runs FlagEmbedding's model; ``onnx`` / ``onnx-int8``
(``auto`` on a CPU) run the same weights exported to ONNX Runtime (streams/onnx_backend.py),
behind the same interface: tokenize, encode_ids, dense (+ sparse for BGE-M3).

FlagEmbedding loads the weights, tokenizer and (for BGE-M3) the sparse head, but its
``encode()`` probes the first batch twice and silently shrinks batches on any
RuntimeError; we run the forward pass ourselves on its model, tokenizer and pooling, one
batch per call, under ``torch.inference_mode``. torch and FlagEmbedding are imported
here only, lazily: the import costs seconds and ~500 MB, and only the embed stage pays it.

On a GPU the forward pass is short enough that the host's share shows: padding a batch and
copying it over would leave the GPU idle between batches. So a call is split in two:
``prepare`` pads on the host into pinned memory and issues the copy on a side CUDA stream;
``encode_prepared`` waits for that copy on the GPU (not the host) and runs the model. A
caller that prepares batch k+1 while batch k runs keeps the GPU fed; ``encode_ids`` does
both in turn, for callers that need no overlap. On a CPU ``prepare`` only pads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streams.errors import ConfigError
from streams.model import model_input_limit, resolve_model_path
from streams.onnx_backend import resolve_backend
from streams.settings import Settings

log = logging.getLogger(__name__)


def is_m3(model_path: str) -> bool:
    """BGE-M3 (dense + sparse) is recognised by name or by its sparse head on disk."""
    return "bge-m3" in model_path.lower() or (Path(model_path) / "sparse_linear.pt").exists()


def pooling_of(model_path: str) -> str:
    """Mean pooling for sentence-transformers models (MiniLM), CLS for BGE: read from disk.

    FlagEmbedding defaults to CLS, which gives wrong vectors for MiniLM (cosine ~0.3
    against sentence-transformers).
    """
    cfg = Path(model_path) / "1_Pooling" / "config.json"
    if cfg.exists():
        conf = json.loads(cfg.read_text())
        if conf.get("pooling_mode_mean_tokens"):
            return "mean"
        if conf.get("pooling_mode_cls_token"):
            return "cls"
    return "cls"


#: RAGSTREAM_GPU_DTYPE's names as torch's dtype attributes.
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_precision(setting: str, device: str, bf16_native: bool) -> str:
    """The torch model's precision (``bf16``, ``fp16`` or ``fp32``): the one rule.

    A CPU runs fp32 whatever the setting (its half-precision matmuls are slower, and the
    CPU's vectors are the reference the ONNX backends are checked against). On a GPU,
    ``auto`` takes bf16 where the card has it natively (Ampere and later): fp32's range, so
    no overflow in long sums; else fp16. Asking for bf16 on a card without it is refused:
    torch would emulate it, without the tensor cores that make half precision worth having.
    """
    if not device.startswith("cuda"):
        return "fp32"
    if setting == "auto":
        return "bf16" if bf16_native else "fp16"
    if setting == "bf16" and not bf16_native:
        raise ConfigError(f"RAGSTREAM_GPU_DTYPE=bf16: {device} has no native bf16 (use fp16)")
    if setting not in _TORCH_DTYPES:
        raise ConfigError(f"RAGSTREAM_GPU_DTYPE={setting!r}: expected auto, bf16, fp16 or fp32")
    return setting


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    """A batch ready for ``Embedder.encode_prepared``: padded, and on a GPU on its way there.

    ``inputs`` are the model's tensors on its device (None for ONNX, which takes ``ids``
    text by text); ``host`` holds the padded tensors on the host (pinned on a GPU: kept
    alive here until the copy from them is done); ``ready`` is the CUDA event recorded
    after the copy on the side stream, None where there is nothing to wait for.
    """

    ids: list[list[int]]
    inputs: dict[str, Any] | None = None
    host: dict[str, Any] | None = None
    ready: Any = None


@dataclasses.dataclass(frozen=True, slots=True)
class Encoded:
    dense: np.ndarray  # (n, dim) float32, L2-normalised
    sparse: list[dict[int, float]] | None  # BGE-M3 lexical weights, token id -> weight


class Embedder:
    """One model in memory; ``encode`` is thread-safe by a lock (one forward at a time)."""

    def __init__(self, settings: Settings) -> None:
        import torch  # deliberately lazy

        self._torch = torch
        self.name = settings.model
        self.path = resolve_model_path(settings.model)
        self.device = _pick_device(settings.device, torch)
        self.backend = resolve_backend(settings.backend, self.device)
        self.precision: str | None = None  # the torch model's; ONNX's is its graph's
        self._gpu_dtype = settings.gpu_dtype
        self._copy_stream: Any = None  # on a GPU: the side stream prepare() copies on
        threads = settings.torch_threads or os.cpu_count() or 1
        if self.device == "cpu":
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.sparse = is_m3(self.path)
        self._lock = threading.Lock()
        if self.backend == "torch":
            self.tokenizer = self._load_torch()
        else:
            from transformers import AutoTokenizer

            from streams import onnx_backend

            # the tokenizer FlagEmbedding would load; the torch weights only on an export
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self._session, graph = onnx_backend.load_session(
                Path(self.path),
                settings.model_cache,
                settings.model,
                quantized=self.backend == "onnx-int8",
                threads=1,  # one thread per run: texts run side by side (_encode_onnx)
            )
            self._runners = ThreadPoolExecutor(threads, thread_name_prefix="onnx")
            self._head = graph.sparse_head
            if self.sparse and self._head is None:
                raise ConfigError(f"no sparse head was exported beside {graph.path}")
            self._pooling = "cls" if self.sparse else pooling_of(self.path)
        # the chunker cut for this same limit (streams/model.py): nothing is truncated here
        self.max_length = model_input_limit(self.path, self.tokenizer)
        self.n_special = len(self.tokenizer("")["input_ids"])  # tokens every text costs
        self._unused_tokens = {
            self.tokenizer.convert_tokens_to_ids(self.tokenizer.special_tokens_map[t])
            for t in ("cls_token", "sep_token", "eos_token", "pad_token", "unk_token")
            if t in self.tokenizer.special_tokens_map
        }
        self.dim = int(self.encode(["dimension probe"]).dense.shape[1])
        log.info(
            "model %s loaded on %s in %.1fs (dim %d, max %d tokens, sparse=%s, backend %s)",
            self.name,
            self.device,
            time.perf_counter() - t0,
            self.dim,
            self.max_length,
            self.sparse,
            self.backend if self.precision is None else f"{self.backend} {self.precision}",
        )

    def _load_torch(self) -> Any:
        """FlagEmbedding's model on the device, in ``torch_precision``'s dtype; returns its
        tokenizer."""
        from FlagEmbedding import BGEM3FlagModel, FlagModel

        torch = self._torch
        on_gpu = self.device.startswith("cuda")
        # bf16 tensor cores from Ampere (compute capability 8.0) on; asked of this device,
        # not the current one (torch.cuda.is_bf16_supported would also count emulation)
        native = on_gpu and torch.cuda.get_device_capability(self.device) >= (8, 0)
        self.precision = torch_precision(self._gpu_dtype, self.device, native)
        half = {"use_fp16": self.precision == "fp16", "use_bf16": self.precision == "bf16"}
        if self.sparse:
            self._flag = BGEM3FlagModel(self.path, devices=[self.device], **half)
        else:
            self._flag = FlagModel(
                self.path,
                pooling_method=pooling_of(self.path),
                devices=[self.device],
                normalize_embeddings=True,
                **half,
            )
        model = self._flag.model
        if on_gpu:  # the whole module, BGE-M3's sparse and ColBERT heads included
            model.to(device=self.device, dtype=getattr(torch, _TORCH_DTYPES[self.precision]))
            self._copy_stream = torch.cuda.Stream(device=self.device)
        else:
            model.float()
            model.to(self.device)
        model.eval()
        return self._flag.tokenizer

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, cut at what the model reads: done once per text, the
        lengths plan the batches and the ids feed the model."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text costs in a batch (with specials, capped at what the model reads)."""
        return [len(x) for x in self.tokenize(texts)]

    def encode(self, texts: Sequence[str]) -> Encoded:
        """One forward pass over ``texts`` as one batch (the caller plans batches)."""
        return self.encode_ids(self.tokenize(texts))

    def encode_ids(self, ids: Sequence[list[int]]) -> Encoded:
        """One forward pass over already tokenized texts, padded to the longest."""
        return self.encode_prepared(self.prepare(ids))

    def prepare(self, ids: Sequence[list[int]]) -> Prepared:
        """Pad a batch and start its copy to the GPU, without waiting for the model: call it
        for the next batch while ``encode_prepared`` runs this one (thread-safe, lock-free).

        On a GPU the padded tensors are pinned (only page-locked memory copies without a
        staging copy, and asynchronously) and copied on a side stream, so the copy overlaps
        the running forward pass instead of queueing behind it.
        """
        ids = list(ids)
        if self.backend != "torch":
            return Prepared(ids)
        host = dict(self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt"))
        if not self.device.startswith("cuda"):
            return Prepared(ids, inputs=host, host=host)
        torch = self._torch
        pinned = {k: v.pin_memory() for k, v in host.items()}
        with torch.cuda.stream(self._copy_stream):
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in pinned.items()}
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return Prepared(ids, inputs=inputs, host=pinned, ready=ready)

    def encode_prepared(self, batch: Prepared) -> Encoded:
        """One forward pass over a batch from ``prepare``."""
        if self.backend != "torch":
            return self._encode_onnx(batch.ids)
        torch = self._torch
        inputs, host = batch.inputs, batch.host
        assert inputs is not None and host is not None  # prepare() sets both for torch
        with self._lock, torch.inference_mode():
            if batch.ready is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(batch.ready)  # the GPU waits for the copy, not the host
                for tensor in inputs.values():  # made on the side stream, used on this one:
                    tensor.record_stream(compute)  # not reused before this pass is done
            if self.sparse:
                out = self._flag.model(
                    inputs, return_dense=True, return_sparse=True, return_colbert_vecs=False
                )
                dense = out["dense_vecs"].float().cpu().numpy()
                weights = out["sparse_vecs"].squeeze(-1).float().cpu().numpy()
                rows = host["input_ids"].numpy()
                sparse = [self._lexical(w, i) for w, i in zip(weights, rows, strict=True)]
            else:
                hidden = self._flag.model(**inputs, return_dict=True).last_hidden_state
                pooled = self._flag.pooling(hidden, inputs["attention_mask"])
                # normalised in fp32, not in the model's half precision (on a CPU it is fp32
                # already, and .float() returns the same tensor)
                dense = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
                sparse = None
        return Encoded(dense=np.ascontiguousarray(dense, dtype=np.float32), sparse=sparse)

    def _encode_onnx(self, ids: Sequence[list[int]]) -> Encoded:
        """The encoder in ONNX Runtime, one text per run, ``torch_threads`` runs side by
        side (one thread each); pooling and the sparse head in numpy (fp32).

        One text per run, not the padded batch: int8 activations are quantized with one
        scale per run, so in a batch a text's vector moved with its batch mates (cosine
        0.991 to 0.998 between two batchings of the same Django chunks); alone it is the
        same whatever the batching, as torch's is. On a CPU it is also faster (no work on
        padding; measured 1.5x the batched run on Django chunks).

        Side by side, not one run over all threads: a 200-token text is too small a run to
        split well (two intra-op threads gave 1.4x one, 1.85 cores busy for it), and when
        another process takes a core, an intra-op thread stalls its partner at every
        operator while an independent run only slows itself. Measured on 2 cores, 791
        Django chunks: 15,900 tokens/s against 11,300 for one run on two intra-op threads,
        and 13,700 against 10,600 with a competing process on a quarter of a core. The
        texts are handed out one by one, longest first as the batches come, so a thread
        that was preempted takes fewer."""
        from streams import onnx_backend

        session, head, pooling = self._session, self._head, self._pooling

        def run(one: list[int]) -> tuple[np.ndarray, dict[int, float] | None]:
            input_ids = np.asarray([one], dtype=np.int64)
            mask = np.ones_like(input_ids)
            (hidden,) = session.run(None, {"input_ids": input_ids, "attention_mask": mask})
            row = onnx_backend.pool(hidden, mask, pooling)[0]
            if self.sparse and head is not None:
                weights = onnx_backend.sparse_weights(hidden, head)
                return row, self._lexical(weights[0], input_ids[0])
            return row, None

        with self._lock:
            done = list(self._runners.map(run, ids)) if len(ids) > 1 else [run(i) for i in ids]
        if not done:
            dense = np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        else:
            dense = np.stack([row for row, _ in done])
        sparse = [sp or {} for _, sp in done] if self.sparse else None
        return Encoded(dense=np.ascontiguousarray(dense, dtype=np.float32), sparse=sparse)

    def _lexical(self, weights: np.ndarray, input_ids: np.ndarray) -> dict[int, float]:
        """BGE-M3 token weights as ``{token_id: max weight}``: int keys, as Milvus wants."""
        result: dict[int, float] = {}
        for w, tid in zip(weights.tolist(), input_ids.tolist(), strict=True):
            if w > 0 and tid not in self._unused_tokens and w > result.get(tid, 0.0):
                result[tid] = w
        return result


def device_and_backend(settings: Settings) -> tuple[str, str]:
    """The device and backend an ``Embedder`` for ``settings`` will use, without loading
    the model (imports torch to see a GPU): for a bench that labels or caches by backend."""
    import torch

    device = _pick_device(settings.device, torch)
    return device, resolve_backend(settings.backend, device)


def _pick_device(setting: str, torch: Any) -> str:
    if setting != "auto":
        return setting
    return "cuda:0" if torch.cuda.is_available() else "cpu"
