"""Values as a person says them: "8 heads", "head size = width / heads (16)", "1/sqrt(d_k)", "no residual dropout".
The config key and value (``model.head_dim=null``) stay in the tables and on hover; the answers and headlines use
these."""

from __future__ import annotations

from typing import Any

from ablate.core.config import fmt

SCALINGS = {"sqrt": "1/sqrt(d_k)", "inverse": "1/d_k", "none": "no scaling", "learned": "a learned temperature",
            "qknorm": "QK-norm", "logn": "log-n scaling"}  # fmt: skip
POSITIONS = {"learned": "learned positions", "rope": "RoPE", "none": "no positions"}
KINDS = {"transformer": "Transformer", "lstm": "LSTM", "gru": "GRU"}
COUNTS = {"model.num_heads": "head", "model.num_layers": "layer"}
NAMED = {"model.embed_dim": "width", "model.mlp_ratio": "MLP ratio", "train.batch_size": "batch size",
         "task.seq_len": "sequence length", "train.weight_decay": "weight decay"}  # fmt: skip


def value_label(key: str, value: Any, model: dict[str, Any]) -> str:
    """``key`` set to ``value`` in plain words; ``model`` is the arm's model section (for a derived head size)."""
    if key == "model.head_dim":
        if value is None:
            width, heads = model.get("embed_dim"), model.get("num_heads")
            derived = f" ({width // heads})" if isinstance(width, int) and isinstance(heads, int) and heads else ""
            return f"head size = width / heads{derived}"
        return f"head size {fmt(value)}"
    if key in ("model.attn_dropout", "model.resid_dropout"):
        what = "attention" if key == "model.attn_dropout" else "residual"
        return f"no {what} dropout" if not value else f"{what} dropout {fmt(value)}"
    if key == "model.scaling":
        return SCALINGS.get(value, str(value))
    if key == "model.position":
        return POSITIONS.get(value, str(value))
    if key == "model.kind":
        return KINDS.get(value, str(value))
    if key == "model.bias":
        return "with biases" if value else "no biases"
    if key in COUNTS:
        return f"{fmt(value)} {COUNTS[key]}{'' if value == 1 else 's'}"
    name = NAMED.get(key, key.rsplit(".", 1)[-1].replace("_", " "))
    return f"{name} {fmt(value)}"
