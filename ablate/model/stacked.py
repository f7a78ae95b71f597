"""K Transformers of one architecture as one stacked model: every parameter stacked on a leading member dim K
(``Stack``, each member's parameters views of it) and the forward pass of ``transformer.Transformer`` in training
mode run for every member at once (``StackedForward``): the matmuls batched over K (``baddbmm``), attention with the
members folded into its batch, (K*B, H, T, D), so it stays on the ``scaled_dot_product_attention`` kernel.
``training.together`` trains trials this way; the tests check it against the member models in float64 for every
scaling, position and bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ablate.core.config import ModelConfig
from ablate.model.transformer import Attend, l2_normalize, rotate

CORE_SCALING = {"learned": "none", "qknorm": "none", "logn": "sqrt"}  # the rest of a scaling once its per-member
# factors are folded into q and k here (``StackedForward.fold``): the shared core applies a constant scale only


class Stack:
    """Every parameter of the member models stacked on dim 0, (K, ...); each member's parameters are views of it."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        self.names = [name for name, _ in models[0].named_parameters()]  # a tied weight once (tok_emb.weight)
        self.stack(models)

    def stack(self, models: list[torch.nn.Module]) -> None:
        """Stacks ``models`` (a copy) and makes their parameters views of the stack; the optimizers keep the same
        parameter objects, so their state survives a restack."""
        self.slots = [[dict(m.named_parameters())[name] for name in self.names] for m in models]
        self.params: dict[str, torch.Tensor] = {}
        for j, name in enumerate(self.names):
            stacked = torch.stack([slot[j].detach() for slot in self.slots]).requires_grad_()  # (K, ...)
            for k, slot in enumerate(self.slots):
                slot[j].data = stacked.data[k]
            self.params[name] = stacked

    def hand_out_grads(self) -> None:
        """Gives member k's parameters their slice of the stacked gradient (views: clipping and the optimizer step
        write through), then clears the stack's; a parameter that got no gradient gets none, as in a single run."""
        for j, name in enumerate(self.names):
            grad, self.params[name].grad = self.params[name].grad, None
            for k, slot in enumerate(self.slots):
                slot[j].grad = None if grad is None else grad[k]

    @staticmethod
    def release(model: torch.nn.Module) -> None:
        """Gives a member leaving the stack its own storage (its checkpoint would otherwise save the whole stack)."""
        for p in model.parameters():
            p.data = p.data.clone()


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # x (K, ..., Cin), w (K, Cout, Cin), b (K, Cout) -> (K, ..., Cout): one batched matmul for every member
    flat = x.reshape(x.size(0), -1, x.size(-1))  # (K, N, Cin)
    y = torch.bmm(flat, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), flat, w.transpose(1, 2))
    return y.view(*x.shape[:-1], w.size(1))


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # F.layer_norm's affine takes one (C,) weight: normalise without it, then each member's (K, C) gain and bias
    shape = (x.size(0),) + (1,) * (x.dim() - 2) + (x.size(-1),)  # (K, 1, ..., C)
    y = F.layer_norm(x, x.shape[-1:]) * w.view(shape)
    return y if b is None else y + b.view(shape)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p > 0 else x  # training only: evaluation runs the member models


class StackedForward:
    """The stacked Transformer (``model.Transformer`` in training mode, every member at once) over a ``Stack``."""

    def __init__(self, cfg: ModelConfig, causal: bool, device: torch.device) -> None:
        self.cfg, self.causal = cfg, causal
        self.H, self.D = cfg.num_heads, cfg.resolved_head_dim
        self.core = Attend(self.H, self.D, scaling=CORE_SCALING.get(cfg.scaling, cfg.scaling), dropout=cfg.attn_dropout,
                           causal=causal, backend=cfg.backend).to(device)  # fmt: skip

    def __call__(self, p: dict[str, torch.Tensor], tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """tokens (K, B, T), mask (K, B, T) or None -> logits (K, B, T, V) or (K, B, classes)."""
        K, B, T = tokens.shape
        V = p["tok_emb.weight"].size(1)
        offsets = torch.arange(K, device=tokens.device).view(K, 1, 1) * V  # member k's rows of the flat table
        x = F.embedding(tokens + offsets, p["tok_emb.weight"].flatten(0, 1))  # (K, B, T, C)
        if self.cfg.position == "learned":
            x = x + p["pos_emb.weight"][:, :T].unsqueeze(1)  # (K, 1, T, C)
        x = _dropout(x, self.cfg.resid_dropout)
        flat_mask = None if mask is None else mask.flatten(0, 1)  # (K*B, T)
        for i in range(self.cfg.num_layers):
            x = self.block(p, f"blocks.{i}.", x, flat_mask)
        x = _layer_norm(x, p["ln_f.weight"], p.get("ln_f.bias"))
        if self.causal:
            head = p["tok_emb.weight"] if self.cfg.tie_head else p["head.weight"]  # (K, V, C)
            return torch.bmm(x.flatten(1, 2), head.transpose(1, 2)).view(K, B, T, V)
        if mask is None:
            pooled = x.mean(2)  # (K, B, C)
        else:
            keep = mask.unsqueeze(-1).to(x.dtype)  # (K, B, T, 1)
            pooled = (x * keep).sum(2) / keep.sum(2).clamp(min=1)  # (K, B, C)
        return _linear(pooled, p["head.weight"], p.get("head.bias"))

    def block(self, p: dict[str, torch.Tensor], pre: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = _layer_norm(x, p[pre + "ln_1.weight"], p.get(pre + "ln_1.bias"))
        x = x + _dropout(self.attention(p, pre + "attn.", h, mask), self.cfg.resid_dropout)
        if not self.cfg.mlp_hidden:  # attention-only
            return x
        h = _layer_norm(x, p[pre + "ln_2.weight"], p.get(pre + "ln_2.bias"))
        h = F.gelu(_linear(h, p[pre + "mlp.0.weight"], p.get(pre + "mlp.0.bias")))
        return x + _dropout(_linear(h, p[pre + "mlp.2.weight"], p.get(pre + "mlp.2.bias")), self.cfg.resid_dropout)

    def attention(self, p: dict[str, torch.Tensor], pre: str, x: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        K, B, T, _ = x.shape
        qkv = _linear(x, p[pre + "qkv.weight"], p.get(pre + "qkv.bias")).view(K, B, T, 3, self.H, self.D)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # 3 x (K, B, H, T, D)
        if self.cfg.position == "rope":
            q, k = rotate(q), rotate(k)
        q, k = self.fold(p, pre + "attend.", q, k, mask)
        y, _ = self.core(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask)  # (K*B, H, T, D)
        y = y.unflatten(0, (K, B)).transpose(2, 3).reshape(K, B, T, self.H * self.D)
        return _linear(y, p[pre + "attn_out.weight"], p.get(pre + "attn_out.bias"))

    def fold(self, p: dict[str, torch.Tensor], pre: str, q: torch.Tensor, k: torch.Tensor,
             mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``Attend.fold`` with each member's per-head factors: (K, H) as (K, 1, H, 1, 1) on q (K, B, H, T, D)."""
        K, scaling = q.size(0), self.cfg.scaling

        def per_head(name: str) -> torch.Tensor:
            return p[pre + name].view(K, 1, self.H, 1, 1)

        if scaling == "learned":
            q = q * per_head("temperature").to(q.dtype)
        elif scaling == "qknorm":
            q, k = l2_normalize(q, per_head("qk_gain").to(q.dtype)), l2_normalize(k)
        elif scaling == "logn":
            allowed = self.core.allowed(mask, q.size(-2), q.device)  # as Attend.forward: a row with no key sees all
            allowed = None if allowed is None else allowed | ~allowed.any(-1, keepdim=True)
            n = self.core.attended(allowed, q.size(-2), q.device)  # (K*B|1, 1, T|1, 1)
            n = n.unflatten(0, (K, -1)) if n.size(0) > 1 else n.unsqueeze(0)  # (K|1, B|1, 1, T|1, 1)
            log_n = n.to(torch.promote_types(q.dtype, torch.float32)).log()
            q = q * (per_head("logn_scale") * log_n).to(q.dtype)
        return q, k
