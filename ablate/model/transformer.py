"""The model the suite studies: multi-head self-attention with six logit scalings, in a small pre-LN transformer.

Read top to bottom: rotary positions, the attention core (scale, mask, dropout, backend; sees only q, k, v), the
projections around it (heads, widths, rotary q and k), the block, the transformer with its two heads,
``build_model`` (the transformer, or the recurrent baseline of ``ablate.model.rnn``), then measurement helpers. Knows
nothing of Optuna or MLflow (the layer contract in ``pyproject.toml`` checks it).
Shapes: B batch, T length, C embed_dim, H num_heads, D head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ablate.core import names
from ablate.core.config import BACKENDS, POSITIONS, SCALINGS, ModelConfig, head_dim_of
from ablate.model.rnn import RecurrentNet

ROPE_BASE = 10000.0


class _L2Normalize(torch.autograd.Function):
    """gain * x / |x| over the last dim, with a hand-written backward: half the passes over x that autograd makes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()  # (..., 1)
        c = r if gain is None else r * gain  # (..., 1)
        ctx.save_for_backward(x, r, c)
        ctx.gain_shape = None if gain is None else gain.shape
        return x * c

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # y = g x r with r = 1/|x|, s = dy . (x r):  dx = g r (dy - x r s),  dg = s summed to g's shape
        x, r, c = ctx.saved_tensors
        s = torch.linalg.vecdot(dy, x, dim=-1).unsqueeze(-1) * r  # (..., 1)
        dx = torch.addcmul(dy, x, s * r, value=-1).mul_(c)
        return dx, None if ctx.gain_shape is None else s.sum_to_size(ctx.gain_shape)


def l2_normalize(x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    """``gain * x / |x|`` over the last dim; ``gain`` broadcasts against ``x``'s shape with the last dim 1."""
    return _L2Normalize.apply(x, gain)


def rotate(x: torch.Tensor, base: float = ROPE_BASE) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, "RoFormer"), half-rotation layout (GPT-NeoX, Llama): dims i and
    i + D/2 of position t turned by the angle t * base^(-2i/D). q_t . k_s then depends on t - s alone, at any length.

    x: (B, H, T, D) with D even. Angles in float32 (positions beyond 2^11 lose digits in bf16); result in x's dtype.
    """
    T, D = x.size(-2), x.size(-1)
    inv_freq = base ** -(torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)  # (D/2,)
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # (T, D)
    xf = x.float()
    half = torch.cat([-xf[..., D // 2 :], xf[..., : D // 2]], dim=-1)  # (B, H, T, D): (x1, x2) -> (-x2, x1)
    return (xf * cos + half * sin).to(x.dtype)


class Attend(nn.Module):
    """softmax(q k^T * scale + mask) v over heads, for every scaling, on sdpa or written out (manual).

    Scalings, each with its source (d_k = head_dim):
      sqrt     scores / sqrt(d_k) (Vaswani et al. 2017).
      inverse  scores / d_k (muP, Yang et al. 2022).
      none     scores unscaled.
      learned  scores * tau_h, a learned per-head temperature initialised at 1/sqrt(d_k).
      qknorm   q and k L2-normalised per head, logits g_h * cos(q, k) with g_h learned per head and initialised
               at sqrt(d_k) (QK-norm: Henry et al. 2020; Dehghani et al. 2023; Wortsman et al. 2023): the logits
               start with the spread of standard attention on unit-variance q, k (a fixed 1/sqrt(d_k) after
               normalising would cap them at +-1/sqrt(d_k): near-uniform attention that barely learns).
      logn     Scalable-Softmax (Nakanishi 2025): the sqrt logits times s_h * log(n), n the number of keys the query
               attends to (its position + 1 when causal; real keys only under padding), s_h learned per head,
               initialised at 1 / log(64) so a query that sees 64 keys starts exactly like sqrt.

    Every learned or per-row factor is folded into q, so sdpa gets a plain float ``scale=`` and stays on its kernel.
    """

    def __init__(self, num_heads: int, head_dim: int, *, scaling: str, dropout: float, causal: bool, backend: str):
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r}; allowed: {', '.join(SCALINGS)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {dropout}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scaling, self.dropout, self.causal, self.backend = scaling, dropout, causal, backend
        fixed = {"sqrt": head_dim**-0.5, "inverse": 1.0 / head_dim, "logn": head_dim**-0.5}
        self.scale = fixed.get(scaling, 1.0)  # none, learned, qknorm: 1 (learned factors are folded into q)
        if scaling == "learned":
            self.temperature = nn.Parameter(torch.full((num_heads,), head_dim**-0.5))  # (H,)
        if scaling == "qknorm":
            self.qk_gain = nn.Parameter(torch.full((num_heads,), head_dim**0.5))  # (H,)
        if scaling == "logn":
            self.logn_scale = nn.Parameter(torch.full((num_heads,), 1.0 / math.log(64)))  # (H,)

    def allowed(self, mask: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
        """The boolean mask broadcastable to (B, H, T, T), True where a query may attend; None: all (or is_causal)."""
        if mask is not None and (mask.dtype != torch.bool or mask.dim() not in (2, 4)):
            raise ValueError(f"mask must be boolean, (B, T) or (B|1, H|1, T, T); got {mask.dtype} {tuple(mask.shape)}")
        if mask is not None and mask.dim() == 2:  # (B, T) key padding, True at real tokens
            mask = mask[:, None, None, :]  # (B, 1, 1, T)
        if self.causal and mask is not None:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (B, 1|H, T, T)
        return mask

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        # q, k, v: (B, H, T, D); mask: None, (B, T) key padding, or boolean broadcastable to (B, H, T, T)
        if need_weights and self.backend != "manual":
            raise ValueError("need_weights=True needs backend='manual': the sdpa kernel does not return weights")
        allowed = self.allowed(mask, q.size(-2), q.device)
        has_key = None
        if allowed is not None:
            # A query with no allowed key (a padded row) would softmax over nothing -> NaN on some kernels.
            # Let it attend everywhere, then zero its output: no NaN forward or backward, on any kernel.
            has_key = allowed.any(-1, keepdim=True)  # (B, 1|H, T|1, 1)
            allowed = allowed | ~has_key
        q, k = self.fold(q, k, allowed)
        p = self.dropout if self.training else 0.0
        is_causal = self.causal and allowed is None
        if self.backend == "sdpa":
            y, w = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, is_causal=is_causal,
                                                  scale=self.scale), None
        else:
            w = self.weights(q, k, allowed)  # (B, H, T, T)
            y = F.dropout(w, p) @ v  # (B, H, T, T) x (B, H, T, D) -> (B, H, T, D)
        if has_key is not None:
            y = y * has_key
            w = None if w is None else w * has_key
        return y, w

    def fold(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k with every non-constant factor of the scaling folded in (sdpa's ``scale`` does the rest).
        Factors are cast to q's dtype: under bf16 a float32 parameter would otherwise promote q alone to float32."""
        if self.scaling == "learned":
            q = q * self.temperature.to(q.dtype).view(-1, 1, 1)  # (B, H, T, D) * (H, 1, 1)
        elif self.scaling == "qknorm":
            q = l2_normalize(q, self.qk_gain.to(q.dtype).view(-1, 1, 1))
            k = l2_normalize(k)
        elif self.scaling == "logn":
            n = self.attended(allowed, q.size(-2), q.device)  # (B|1, H|1, T, 1)
            log_n = n.to(torch.promote_types(q.dtype, torch.float32)).log()  # not in bf16: log(256) would be 5.53
            q = q * (self.logn_scale.view(-1, 1, 1) * log_n).to(q.dtype)
        return q, k

    def attended(self, allowed: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
        """The number of keys each query attends to, (B|1, H|1, T, 1), at least 1."""
        if allowed is None:
            n = torch.arange(1, T + 1, device=device) if self.causal else torch.full((T,), T, device=device)
            return n.view(1, 1, T, 1)
        return allowed.sum(-1, keepdim=True).clamp(min=1)

    def logits(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Scaled logits of folded q, k, -inf where not allowed: (B, H, T, T)."""
        att = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, D) x (B, H, D, T) -> (B, H, T, T)
        if allowed is None and self.causal:
            T = q.size(-2)
            allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return att if allowed is None else att.masked_fill(~allowed, float("-inf"))

    def weights(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        return self.logits(q, k, allowed).softmax(-1)  # (B, H, T, T); every row has an allowed key (see forward)


class MultiHeadAttention(nn.Module):
    """Self-attention: ``qkv`` projects to [q | k | v] (heads contiguous in each, the layout of
    ``nn.MultiheadAttention.in_proj_weight``), ``Attend`` mixes, ``attn_out`` projects back to ``embed_dim``.

    ``dropout`` acts on the attention weights, as in ``nn.MultiheadAttention``. ``head_dim`` set decouples head size
    from width (``num_heads * head_dim`` need not equal ``embed_dim``). ``position="rope"`` rotates q and k by their
    positions (:func:`rotate`) before the core sees them; ``learned`` and ``none`` leave them as projected.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, *, head_dim: int | None = None,
                 scaling: str = "sqrt", causal: bool = False, bias: bool = True, backend: str = "sdpa",
                 position: str = "learned"):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"unknown position {position!r}; allowed: {', '.join(POSITIONS)}")
        head_dim = head_dim_of(embed_dim, num_heads, head_dim, position)
        self.embed_dim, self.num_heads, self.head_dim, self.rope = embed_dim, num_heads, head_dim, position == "rope"
        self.qkv = nn.Linear(embed_dim, 3 * num_heads * head_dim, bias=bias)
        self.attend = Attend(num_heads, head_dim, scaling=scaling, dropout=dropout, causal=causal, backend=backend)
        self.attn_out = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        if self.rope:
            q, k = rotate(q), rotate(k)
        return q, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (y (B, T, C), weights (B, H, T, T) with ``need_weights`` on the manual backend, else None).

        ``mask`` is boolean, True where attention is allowed: (B, T) key padding or broadcastable to (B, H, T, T).
        """
        B, T, _ = x.shape
        q, k, v = self.project(x)
        y, w = self.attend(q, k, v, mask, need_weights)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.attn_out(y), w

    @torch.no_grad()
    def logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled attention logits (B, H, T, T), -inf where not allowed, on either backend (for measurement)."""
        q, k, _ = self.project(x)
        allowed = self.attend.allowed(mask, x.size(1), x.device)
        if allowed is not None:
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        q, k = self.attend.fold(q, k, allowed)
        return self.attend.logits(q, k, allowed)


class Block(nn.Module):
    """Pre-LN: x + drop(attn(ln(x))), then x + drop(mlp(ln(x))). Residual dropout is apart from attention dropout."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.embed_dim, bias=cfg.bias)
        self.attn = MultiHeadAttention(cfg.embed_dim, cfg.num_heads, cfg.attn_dropout, head_dim=cfg.head_dim,
                                       scaling=cfg.scaling, causal=causal, bias=cfg.bias, backend=cfg.backend,
                                       position=cfg.position)
        hidden = cfg.mlp_hidden
        self.mlp = None  # attention-only (mlp_ratio 0)
        if hidden:
            self.ln_2 = nn.LayerNorm(cfg.embed_dim, bias=cfg.bias)
            self.mlp = nn.Sequential(nn.Linear(cfg.embed_dim, hidden, bias=cfg.bias), nn.GELU(),
                                     nn.Linear(hidden, cfg.embed_dim, bias=cfg.bias))
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.ln_1(x), mask)[0])
        return x if self.mlp is None else x + self.resid_dropout(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """Token embeddings (+ learned position embeddings), pre-LN blocks, final LayerNorm, then a head.

    ``num_classes=None``: causal language model, logits (B, T, vocab); the head is tied to the token embedding.
    ``num_classes=k``: bidirectional encoder, mean of the real tokens' states, then a linear head: logits (B, k).
    Positions (``cfg.position``): ``learned`` embeddings stop at ``max_len``; ``rope`` (rotary q, k) and ``none``
    (a causal model's mask alone tells positions apart: NoPE, Kazemnejad et al. 2023) run inputs of any length.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_len: int, num_classes: int | None = None):
        super().__init__()
        if vocab_size < 1 or max_len < 1:
            raise ValueError(f"vocab_size and max_len must be >= 1, got vocab_size={vocab_size}, max_len={max_len}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (or None for a language model), got {num_classes}")
        if cfg.kind != "transformer":
            raise ValueError(f"model.kind {cfg.kind!r} is no transformer: build it with build_model")
        self.cfg, self.vocab_size, self.max_len, self.num_classes = cfg, vocab_size, max_len, num_classes
        causal = num_classes is None
        if cfg.position == "none" and not causal:
            raise ValueError("position='none' needs a causal model: a bidirectional classifier without positions "
                             "sees a bag of tokens; use rope or learned")
        self.tok_emb = nn.Embedding(vocab_size, cfg.embed_dim)
        if cfg.position == "learned":  # created first, as before positions were a choice: the same initial weights
            self.pos_emb = nn.Embedding(max_len, cfg.embed_dim)
        self.emb_dropout = nn.Dropout(cfg.resid_dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.embed_dim, bias=cfg.bias)
        if causal:
            self.head = nn.Linear(cfg.embed_dim, vocab_size, bias=False)
            if cfg.tie_head:
                self.head.weight = self.tok_emb.weight  # tied (Press & Wolf 2017): fewer parameters, same quality
        else:
            self.head = nn.Linear(cfg.embed_dim, num_classes)
        if cfg.init == "gpt2":  # else each layer keeps torch's own default, drawn as it was built
            self.apply(self._init)
            for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
                if name.endswith(("attn_out.weight", "mlp.2.weight")):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def extrapolates(self) -> bool:
        """Whether inputs longer than ``max_len`` (the training length) can run: rope or none, not learned."""
        return self.cfg.position != "learned"

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.size(1)
        if not self.extrapolates and length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the model's max_len {self.max_len} (learned "
                             "positions); model.position rope or none runs longer inputs")
        x = self.tok_emb(tokens)  # (B, T, C)
        if self.extrapolates:
            return self.emb_dropout(x)  # positions enter in attention (rope) or through the causal mask (none)
        return self.emb_dropout(x + self.pos_emb(torch.arange(length, device=tokens.device)))  # (B, T, C)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) long; pad_mask (B, T) bool, True at real tokens (None: all real)."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, pad_mask)
        return self.logits_from(self.ln_f(x), pad_mask)

    def logits_from(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        if self.num_classes is None:
            return self.head(x)  # (B, T, vocab)
        if pad_mask is None:
            return self.head(x.mean(1))  # (B, k)
        keep = pad_mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return self.head((x * keep).sum(1) / keep.sum(1).clamp(min=1))  # (B, k)


def build_model(cfg: ModelConfig, vocab_size: int, max_len: int,
                num_classes: int | None = None) -> Transformer | RecurrentNet:  # fmt: skip
    """The model ``cfg.kind`` names: the Transformer, or the lstm or gru baseline of equal parameter count. Both
    take (tokens, pad_mask) and return the same logits, and say by ``extrapolates`` whether they run longer input."""
    if cfg.kind == "transformer":
        return Transformer(cfg, vocab_size, max_len, num_classes)
    return RecurrentNet(cfg, vocab_size, max_len, num_classes)


# ---------------------------------------------------------------------------------------------------------------
# Measurement


@torch.no_grad()
def attention_stats(model: Transformer, tokens: torch.Tensor,
                    pad_mask: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Per-head mean attention entropy (nats, real queries only) and per-layer largest scaled logit, in eval mode;
    and the attention weights of the first sample, (L, H, T, T), on the CPU."""
    was_training = model.training
    model.eval()
    try:
        stats: dict[str, float] = {}
        maps = []
        real = pad_mask if pad_mask is not None else torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        x = model.embed(tokens)
        for layer, block in enumerate(model.blocks):
            logits = block.attn.logits(block.ln_1(x), pad_mask).float()  # (B, H, T, T)
            w = logits.softmax(-1)
            entropy = -(w * w.clamp(min=1e-30).log()).sum(-1)  # (B, H, T)
            rows = real[:, None, :].expand_as(entropy)
            for head in range(entropy.size(1)):
                stats[names.entropy_metric(layer, head)] = entropy[:, head][rows[:, head]].mean().item()
            finite = logits[rows.unsqueeze(-1).expand_as(logits) & logits.isfinite()]
            stats[names.max_logit_metric(layer)] = finite.max().item()
            maps.append(w[0].cpu())
            x = block(x, pad_mask)
        return stats, torch.stack(maps)
    finally:
        model.train(was_training)


def count_params(model: nn.Module) -> int:
    """Trainable parameters, a tied weight counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. A named device that is not available is a ValueError."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if preference == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if preference not in available:
        raise ValueError(f"unknown device {preference!r}; allowed: auto, {', '.join(available)}")
    if not available[preference]:
        raise ValueError(f"device {preference!r} was asked for but is not available to torch here")
    return torch.device(preference)
