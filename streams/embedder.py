"""The embedding model: loaded once per process, called in batches, on one of two backends.

``torch`` (the default on a GPU) runs FlagEmbedding's model; ``onnx`` / ``onnx-int8``
(``auto`` on a CPU) run the same weights exported to ONNX Runtime (streams/onnx_backend.py),
behind the same interface: tokenize, encode_ids, dense (+ sparse for BGE-M3).

FlagEmbedding loads the weights, tokenizer and (for BGE-M3) the sparse head, but its
``encode()`` probes the first batch twice and silently shrinks batches on any
RuntimeError; we run the forward pass ourselves on its model, tokenizer and pooling, one
batch per call, under ``torch.inference_mode``. torch and FlagEmbedding are imported
here only, lazily: the import costs seconds and ~500 MB, and only the embed stage pays it.
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
            self.backend,
        )

    def _load_torch(self) -> Any:
        """FlagEmbedding's model on the device (fp16 on a GPU); returns its tokenizer."""
        from FlagEmbedding import BGEM3FlagModel, FlagModel

        on_gpu = self.device.startswith("cuda")
        if self.sparse:
            self._flag = BGEM3FlagModel(self.path, use_fp16=on_gpu, devices=[self.device])
        else:
            self._flag = FlagModel(
                self.path,
                pooling_method=pooling_of(self.path),
                use_fp16=on_gpu,
                devices=[self.device],
                normalize_embeddings=True,
            )
        model = self._flag.model
        if not on_gpu:
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
        if self.backend != "torch":
            return self._encode_onnx(ids)
        torch = self._torch
        inputs = self.tokenizer.pad({"input_ids": list(ids)}, padding=True, return_tensors="pt").to(
            self.device
        )
        with self._lock, torch.inference_mode():
            if self.sparse:
                out = self._flag.model(
                    inputs, return_dense=True, return_sparse=True, return_colbert_vecs=False
                )
                dense = out["dense_vecs"].float().cpu().numpy()
                weights = out["sparse_vecs"].squeeze(-1).float().cpu().numpy()
                rows = inputs["input_ids"].cpu().numpy()
                sparse = [self._lexical(w, i) for w, i in zip(weights, rows, strict=True)]
            else:
                hidden = self._flag.model(**inputs, return_dict=True).last_hidden_state
                pooled = self._flag.pooling(hidden, inputs["attention_mask"])
                dense = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
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
