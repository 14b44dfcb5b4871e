"""The embedded model's text encoder, all-MiniLM-L6-v2 (a 6-layer BERT encoder), in plain PyTorch.

The modules and parameter names are transformers' `BertModel`'s (its safetensors file loads as it is) and so is
the arithmetic, op for op (tests/test_text_encoders.py compares the two bit for bit). Written here because
importing transformers' BERT and its tokenizer costs ~4 s on a 2-core AVX2 CPU: more than the rest of the
README's first command together. The larger text encoders (Qwen3, Mistral) stay transformers' models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT `config.json` this encoder uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int = 0
    _attn_implementation: ClassVar[str] = "sdpa"  # read by work_memory's count (fused attention: no score tensor)

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        other = {k: raw.get(k) for k, v in (("hidden_act", "gelu"), ("position_embedding_type", "absolute"))
                 if raw.get(k, v) != v}  # fmt: skip
        if raw.get("model_type") != "bert" or other:
            raise ValueError(f"{path}: not a BERT encoder this code runs ({raw.get('model_type')!r}, {other})")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(input_ids))  # one segment
        return self.LayerNorm(x + self.position_embeddings(positions))


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(3))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = (f(x).view(*x.shape[:-1], self.heads, self.head_dim).transpose(1, 2)
                   for f in (self.query, self.key, self.value))  # fmt: skip
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return out.transpose(1, 2).reshape(*x.shape[:-1], -1)


class DenseNorm(nn.Module):
    """dense, then LayerNorm of (that + the residual): BERT's `output` after attention and after the MLP."""

    def __init__(self, c: BertConfig, inputs: int) -> None:
        super().__init__()
        self.dense = nn.Linear(inputs, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c, c.hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # BERT's "gelu": the exact (erf) one


class Layer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c, c.intermediate_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class BertEncoder(nn.Module):
    """input ids (B, L) and their attention mask (1 = token, 0 = padding) -> the last layer's states (B, L, H);
    every layer's output can be taken with forward hooks on `encoder.layer[i]` (as TextEncoder does)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    @classmethod
    def from_folder(cls, folder: Path) -> BertEncoder:
        """The encoder of a transformers BERT folder (config.json, model.safetensors; the pooler is not used)."""
        from safetensors.torch import load_file

        # built on the CPU (~0.1 s of random init): under a "meta" device context this PyTorch imports its compiler
        model = cls(BertConfig.from_file(folder / "config.json"))
        unused = ("pooler.", "embeddings.position_ids")  # (older transformers saved its position buffer)
        state = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith(unused)}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # every query row sees the same keys
            keep = attention_mask.bool()[:, None, None, :]
            mask = keep.expand(-1, 1, input_ids.shape[1], -1)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x
