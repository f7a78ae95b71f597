"""The recurrent baseline: torch's LSTM or GRU in place of the attention blocks, with the Transformer's embedding,
final LayerNorm and heads, sized to the Transformer's parameter count (``ablate.core.sizes.rnn_hidden_size``).

Built through ``ablate.model.transformer.build_model`` (``model.kind: lstm`` or ``gru``). Imports torch only.
Shapes: B batch, T length, C embed_dim, N hidden size of the recurrent layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ablate.core import sizes
from ablate.core.config import ModelConfig


class RecurrentNet(nn.Module):
    """Token embeddings, ``num_layers`` of ``nn.LSTM`` or ``nn.GRU`` (hidden size N; ``resid_dropout`` on the
    embeddings and between layers), a projection N -> C when N != C, final LayerNorm, then a head.

    ``num_classes=None``: language model, logits (B, T, vocab), the head tied to the token embedding as in the
    Transformer. ``num_classes=k``: the state at each sequence's last real token (the last True of ``pad_mask``), a
    linear head: logits (B, k). A left-to-right RNN has read the whole sequence only there; a mean over its states
    (the Transformer's pooling, right for a bidirectional encoder) would weigh states that saw a prefix. The
    recurrence is causal, so the states up to that token do not depend on the padding after it.

    No positions: order comes from the recurrence, so any input length runs (``extrapolates``). The attention fields
    of the config (num_heads, head_dim, mlp_ratio, scaling, backend, position, attn_dropout) play no part here beyond
    setting the matched hidden size when ``rnn_hidden`` is None.
    """

    extrapolates = True

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_len: int, num_classes: int | None = None):
        super().__init__()
        if cfg.kind not in sizes.GATES:
            raise ValueError(f"RecurrentNet builds an lstm or gru, got kind {cfg.kind!r}")
        if vocab_size < 1 or max_len < 1:
            raise ValueError(f"vocab_size and max_len must be >= 1, got vocab_size={vocab_size}, max_len={max_len}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (or None for a language model), got {num_classes}")
        self.cfg, self.vocab_size, self.max_len, self.num_classes = cfg, vocab_size, max_len, num_classes
        C, N = cfg.embed_dim, sizes.rnn_hidden_size(cfg, max_len)
        self.hidden_size = N
        self.tok_emb = nn.Embedding(vocab_size, C)
        self.emb_dropout = nn.Dropout(cfg.resid_dropout)
        rnn = nn.LSTM if cfg.kind == "lstm" else nn.GRU
        dropout = cfg.resid_dropout if cfg.num_layers > 1 else 0.0  # torch warns when there is no layer between
        self.rnn = rnn(C, N, num_layers=cfg.num_layers, bias=cfg.bias, batch_first=True, dropout=dropout)
        self.out_proj = nn.Linear(N, C, bias=cfg.bias) if N != C else nn.Identity()
        self.ln_f = nn.LayerNorm(C, bias=cfg.bias)
        if num_classes is None:
            self.head = nn.Linear(C, vocab_size, bias=False)
            if cfg.tie_head:
                self.head.weight = self.tok_emb.weight  # tied, as in the Transformer
        else:
            self.head = nn.Linear(C, num_classes)
        # torch's own init for the recurrent weights (uniform +-1/sqrt(N)); the Transformer's for the rest
        for module in (self.tok_emb, self.out_proj, self.head) if cfg.init == "gpt2" else ():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) long; pad_mask (B, T) bool, True at real tokens (None: all real)."""
        x = self.emb_dropout(self.tok_emb(tokens))  # (B, T, C)
        states, _ = self.rnn(x)  # (B, T, N): the last layer's state at every step
        x = self.ln_f(self.out_proj(states))  # (B, T, C)
        if self.num_classes is None:
            return self.head(x)  # (B, T, vocab)
        if pad_mask is None:
            return self.head(x[:, -1])  # (B, k)
        T = tokens.size(1)
        last = (pad_mask * torch.arange(1, T + 1, device=tokens.device)).argmax(1)  # (B,) index of the last True
        return self.head(x[torch.arange(x.size(0), device=x.device), last])  # (B, C) -> (B, k)
