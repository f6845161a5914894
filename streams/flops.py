"""How much arithmetic the encoder does, and how much a GPU could do: the bench's FLOP share.

Tokens per second alone cannot say whether a GPU run is good: the same number is excellent
for BGE-M3 on an L4 and poor on an H100. The share of the GPU's dense bf16 peak that the
model's own FLOPs reach (model FLOPs utilisation) can: it compares any model on any card.

The count is the usual one for a transformer's forward pass (Kaplan et al. 2020, bidirectional
attention): 2 FLOPs per weight of the encoder's matrices per token, plus the attention
scores and their weighted sum, ``4 x layers x hidden x sequence length`` per token. Padding
is not counted (it is waste, not work), nor are the embeddings (a lookup), biases, layer
norms, softmax and activations (under 1% at these shapes). Pure: nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["EncoderShape", "encoder_shape", "gpu_peak_flops", "workload_flops"]


@dataclasses.dataclass(frozen=True, slots=True)
class EncoderShape:
    """What the FLOP count needs from a BERT-style config (BERT, RoBERTa, XLM-RoBERTa)."""

    layers: int
    hidden: int
    intermediate: int

    @property
    def matrix_params(self) -> int:
        """Weights of the encoder layers' matrices: Q, K, V and output (4 h^2), and the
        feed-forward's two (2 h i). Embeddings and the unused pooler are not run per token."""
        return self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs of one token in a sequence of ``seq_len`` tokens."""
        return 2 * self.matrix_params + 4 * self.layers * self.hidden * seq_len


def encoder_shape(config: Mapping[str, Any]) -> EncoderShape | None:
    """The shape from a Hugging Face ``config.json``; None when it does not use BERT's names
    (then the bench reports no share rather than a wrong one)."""
    values: list[int] = []
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            return None
        values.append(v)
    return EncoderShape(*values)


def workload_flops(shape: EncoderShape, lengths: Iterable[int]) -> int:
    """Forward FLOPs of encoding texts of these token lengths, each in a sequence of its own
    length (so a batch's padding is not counted): the work any batching must do."""
    return sum(n * shape.flops_per_token(n) for n in lengths)


#: Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched in order on
#: the words of ``torch.cuda.get_device_name()``: the first rule whose words all appear wins,
#: so a board's variant (PCIe, NVL) comes before its family. A card not listed gets None:
#: a share against a guessed peak would mislead.
_PEAKS: tuple[tuple[frozenset[str], float], ...] = (
    (frozenset({"H100", "PCIE"}), 756e12),
    (frozenset({"H100", "NVL"}), 835e12),
    (frozenset({"H100"}), 989e12),  # SXM5: "NVIDIA H100 80GB HBM3"
    (frozenset({"H200", "NVL"}), 835e12),
    (frozenset({"H200"}), 989e12),
    (frozenset({"GH200"}), 989e12),
    (frozenset({"A100"}), 312e12),  # SXM4 and PCIe alike
    (frozenset({"A10"}), 125e12),  # a word of its own: not A100, not A10G
    (frozenset({"L4"}), 121e12),
    (frozenset({"L40S"}), 362e12),
    (frozenset({"L40"}), 181e12),
)


def gpu_peak_flops(device_name: str | None) -> float | None:
    """The GPU's dense bf16 peak FLOP/s by its name; None for a CPU or an unlisted card."""
    if not device_name:
        return None
    words = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    for needed, peak in _PEAKS:
        if needed <= words:
            return peak
    return None
