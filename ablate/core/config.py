"""Typed, frozen configuration of one training run, built from YAML and validated before any work starts.

Precedence is one rule: dataclass defaults, then the YAML file, then ``--set key=value`` overrides.
Every problem is a :class:`ConfigError` whose message is one line naming the file, the key and what is allowed
(``ablate.core.inputs`` reads the files and defines the error; it is importable from here too).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ablate.core.inputs import ConfigError, parse_yaml, short

SCALINGS = ("sqrt", "inverse", "none", "learned", "qknorm", "logn")
BACKENDS = ("sdpa", "manual")
POSITIONS = ("learned", "rope", "none")
KINDS = ("transformer", "lstm", "gru")
INITS = ("gpt2", "torch")
TASKS = ("charlm", "recall", "listops", "lm")
TOKENIZERS = ("char", "bpe", "unigram")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
MAX_PATH = 4096  # characters of a path (Linux's PATH_MAX)
MAX_THREADS = 1024
MAX_INT = 2**63 - 1  # what SQLite, Optuna and MLflow store; beyond it an int cannot be a size, a seed or a step


def choice(default: str, choices: tuple[str, ...], doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def head_dim_of(embed_dim: int, num_heads: int, head_dim: int | None, position: str) -> int:
    """A head's width: ``head_dim``, else ``embed_dim / num_heads``; a ConfigError naming the key that makes the
    shape impossible. The one rule for ``ModelConfig`` and ``MultiHeadAttention`` built on its own."""
    for key, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        _check(value >= 1, key, f"must be >= 1, got {value}")
    _check(head_dim is None or head_dim >= 1, "head_dim", f"must be >= 1, got {head_dim}")
    _check(head_dim is not None or embed_dim % num_heads == 0, "num_heads",
           f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; change one or set head_dim explicitly")
    resolved = head_dim if head_dim is not None else embed_dim // num_heads
    _check(position != "rope" or resolved % 2 == 0, "position",
           f"rope rotates pairs of a head's dimensions: head_dim must be even, got {resolved}")
    return resolved


@dataclass(frozen=True)
class ModelConfig:
    """The architecture. Vocabulary, length and head type come from the task, not from here.

    ``kind`` lstm or gru is a recurrent baseline (``model.rnn``): token embedding, ``num_layers`` of torch's LSTM or
    GRU (``resid_dropout`` between layers), final LayerNorm and the Transformer's head. It ignores the attention
    fields (num_heads, head_dim, mlp_ratio, scaling, backend, position, attn_dropout) except to size itself: with
    ``rnn_hidden`` None its hidden size is the one whose parameter count is closest to the Transformer this config
    would build (``ablate.core.sizes.rnn_hidden_size``).
    """

    embed_dim: int = 128
    num_heads: int = 4
    head_dim: int | None = None
    """Width of one head; ``None`` derives ``embed_dim // num_heads``. Set, it decouples head size from width."""
    num_layers: int = 2
    mlp_ratio: float = 4.0
    """MLP hidden width over embed_dim; 0: attention-only blocks (no MLP and no LayerNorm before it), the toy
    models of induction-head and recall studies (Olsson et al. 2022; Zucchet et al. 2025)."""
    attn_dropout: float = 0.0
    """Dropout on the attention weights, as in ``torch.nn.MultiheadAttention``."""
    resid_dropout: float = 0.0
    """Dropout after ``attn_out`` and after the MLP, ablated apart from ``attn_dropout`` (lstm, gru: between
    recurrent layers). Both kinds also drop out of the token embeddings at this rate."""
    scaling: str = choice("sqrt", SCALINGS, "how attention logits are scaled")
    backend: str = choice("sdpa", BACKENDS, "sdpa: fused kernel; manual: the formula written out")
    bias: bool = True
    position: str = choice("learned", POSITIONS, "learned: embeddings up to seq_len (no longer input); rope: rotary "
                                                 "q and k (base 10000, any length); none: NoPE, causal tasks only")
    kind: str = choice("transformer", KINDS, "transformer: self-attention blocks; lstm, gru: torch's recurrent "
                                             "layers of equal parameter count (a baseline)")
    tie_head: bool = True
    """A language model's output layer shares the token embedding's weights (Press & Wolf 2017); false: its own."""
    init: str = choice("gpt2", INITS, "gpt2: N(0, 0.02), residual projections / sqrt(2 layers), zero biases; "
                                      "torch: each layer's own default (nn.Linear uniform +-1/sqrt(fan_in), "
                                      "nn.Embedding N(0, 1))")
    rnn_hidden: int | None = None
    """lstm, gru: hidden size of every recurrent layer; ``None`` matches the Transformer's parameter count (the
    closest integer, ``ablate.core.sizes.rnn_hidden_size``). Ignored by a transformer."""

    def __post_init__(self) -> None:
        _check(self.num_layers >= 1, "num_layers", f"must be >= 1, got {self.num_layers}")
        head_dim_of(self.embed_dim, self.num_heads, self.head_dim, self.position)
        _check(self.mlp_ratio >= 0, "mlp_ratio", f"must be >= 0 (0: no MLP), got {self.mlp_ratio}")
        for key in ("attn_dropout", "resid_dropout"):
            _check(0.0 <= getattr(self, key) < 1.0, key, f"must be in [0, 1), got {getattr(self, key)}")
        _check(self.rnn_hidden is None or self.rnn_hidden >= 1, "rnn_hidden", f"must be >= 1, got {self.rnn_hidden}")

    @property
    def resolved_head_dim(self) -> int:
        return head_dim_of(self.embed_dim, self.num_heads, self.head_dim, self.position)

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: 0 without an MLP, else at least 1."""
        return max(1, round(self.mlp_ratio * self.embed_dim)) if self.mlp_ratio else 0


@dataclass(frozen=True)
class TaskConfig:
    """What the model learns. Fields of other tasks are ignored by each task."""

    name: str = choice("charlm", TASKS, "charlm: real text in characters; lm: documents of real text in characters "
                                        "or subword tokens (bits per byte); recall: MQAR; listops: nested expressions")
    seq_len: int = 128
    # charlm
    source: str = "python-docs"
    """``python-docs`` (ships with CPython), a path to a .txt file or folder, or ``hf:<name>[:<config>]``."""
    text_column: str = "text"
    tokenizer: str = "char"
    """lm: ``char``, ``bpe`` or ``unigram`` (fitted to the train documents, ``tokenizer_vocab`` tokens), or a path to
    a Hugging Face ``tokenizer.json``."""
    tokenizer_vocab: int = 4096
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    # recall and listops: generated examples
    num_train: int = 20000
    num_val: int = 1000
    num_test: int = 1000
    num_pairs: int = 8
    """recall: key-value pairs per sequence (queries ask for each of them)."""
    vocab_size: int = 64
    """recall: number of distinct key and value tokens."""
    max_depth: int = 3
    """listops: deepest nesting of operators."""
    max_args: int = 4
    """listops: most operands of one operator."""
    eval_lengths: tuple[int, ...] = ()
    """Multiples k >= 2 of seq_len at which the test split is scored again after training (``test/loss_2x`` ...),
    when the model's positions run longer input (rope, none) and the task can build it: charlm: windows k x long of
    the same test text; recall: k x the length and k x the pairs; listops: expressions longer than (k / 2) x seq_len,
    padded to k x seq_len. Each longer set has about ``num_test // k`` examples (k x fewer, as many tokens)."""

    def __post_init__(self) -> None:
        lengths = self.eval_lengths
        _check(isinstance(lengths, (list, tuple)) and all(type(k) is int for k in lengths), "eval_lengths",
               f"must be a list of whole multiples of seq_len, got {lengths!r}")
        _check(all(2 <= k <= 64 for k in lengths) and list(lengths) == sorted(set(lengths)), "eval_lengths",
               f"must be increasing multiples in [2, 64] (1 is the test split itself), got {list(lengths)}")
        object.__setattr__(self, "eval_lengths", tuple(lengths))  # hashable, as a frozen config must be
        _check(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        for key in ("num_train", "num_val", "num_test", "num_pairs", "vocab_size", "max_depth", "max_args"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.tokenizer in TOKENIZERS or self.tokenizer.endswith(".json"), "tokenizer",
               f"must be one of {', '.join(TOKENIZERS)} or a path to a tokenizer.json, got {self.tokenizer!r}")
        _check(32 <= self.tokenizer_vocab <= 1_000_000, "tokenizer_vocab",
               f"must be in [32, 1000000], got {self.tokenizer_vocab}")
        for key in ("val_fraction", "test_fraction"):
            _check(0.0 < getattr(self, key) < 0.5, key, f"must be in (0, 0.5), got {getattr(self, key)}")
        for key, most in (("source", MAX_PATH), ("text_column", 256)):  # MLflow keeps params of 6000 characters
            _check(len(getattr(self, key)) <= most, key, f"must be at most {most} characters, got "
                                                         f"{len(getattr(self, key)):,}")  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """How one run trains. Same config and seed on the CPU give the same loss curve."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    """AdamW decay, applied to weight matrices only (not to biases, norms, embeddings' positions or gains)."""
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``lr * min_lr_ratio``."""
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    """Batches of the fixed validation sample seen at intermediate evaluations; the final one uses the full split."""
    log_every: int = 10
    seed: int = 0
    device: str = choice("auto", DEVICES, "auto picks cuda, then mps, then cpu")
    precision: str = choice("auto", PRECISIONS, "auto: bf16 autocast on CUDA, fp32 elsewhere")
    compile: bool = False
    threads: int | None = None
    """torch intra-op threads; ``None`` leaves torch's default."""
    diverge_factor: float = 4.0
    """A loss above ``diverge_factor`` times the initial loss (or non-finite) ends the run as diverged."""
    checkpoint: bool = False

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "eval_every", "eval_batches", "log_every"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        _check(self.threads is None or 1 <= self.threads <= MAX_THREADS, "threads",
               f"must be in [1, {MAX_THREADS}], got {self.threads}")  # fmt: skip
        _check(self.diverge_factor > 1, "diverge_factor", f"must be > 1, got {self.diverge_factor}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


RUN_SECTIONS = ("model", "task", "train")


# ---------------------------------------------------------------------------------------------------------------
# Building configs from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming ``key``. Ints are accepted where floats are; a mapping is
    accepted where a union offers a dataclass (``int | Seeds``), a scalar where it offers a scalar type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        classes = [t for t in options if dataclasses.is_dataclass(t)]
        if classes and isinstance(value, dict):
            return from_dict(classes[0], value, prefix=key)
        scalars = [t for t in options if not dataclasses.is_dataclass(t)] or options
        for scalar in scalars[1:]:  # int | str: the first scalar type the value is, else the first's error
            if scalar is str and isinstance(value, str):
                return value
        try:
            return _coerce(value, scalars[0], key)
        except ConfigError:
            if not classes:
                raise
            keys = ", ".join(f.name for f in dataclasses.fields(classes[0]))
            problem = f"must be {_type_name(scalars[0])} or a mapping of {keys}, got {short(value)}"
            raise ConfigError(key, problem) from None
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {short(value)}")
        inner = typing.get_args(tp)[1]
        return {k: _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {short(value)}")
        return list(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and abs(value) > MAX_INT:
            raise ConfigError(key, f"must be an int of at most 19 digits (below 2**63), got {short(value)}")
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not (abs(value) <= MAX_INT if isinstance(value, int) else math.isfinite(value)):
            raise ConfigError(key, f"must be a finite number, got {short(value)}")
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(key, f"must be {_type_name(tp)}, got {short(value)}")
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys, wrong types and values outside ``choices``."""
    where = prefix or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where, f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if not isinstance(name, str) or name not in fields:
            raise ConfigError(key, f"unknown key; allowed: {', '.join(fields)}")
        kwargs[name] = _coerce(value, hints[name], key)
        allowed = fields[name].metadata.get("choices")
        if allowed and kwargs[name] not in allowed:
            raise ConfigError(key, f"unknown value {short(value)}; allowed: {', '.join(allowed)}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.at("", prefix) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.num_heads=8"`` -> ``("model.num_heads", 8)``; the value is read by :func:`scalar`."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"expected key=value, got {text!r}")
    try:
        return key.strip(), scalar(raw) if raw.strip() else ""
    except ConfigError as err:
        raise ConfigError("--set", f"{key.strip()}: {err.problem}") from None


def scalar(text: str) -> Any:
    """A value written as text (a ``--set`` value, an MLflow param) read as YAML, as a study file's would be: "8" ->
    8, "null" -> None, and numbers YAML 1.1 leaves as strings as floats ("1e-3" -> 0.001). A ConfigError when the
    text is not YAML."""
    value = parse_yaml(text, "value")
    return float(value) if isinstance(value, str) and _looks_numeric(value) else value


def with_sections_copied(data: dict) -> dict:
    """``data`` with copies of its run sections (those that are mappings), so that setting a key in them leaves the
    caller's mapping as it was."""
    return {**data, **{key: dict(data.get(key) or {}) for key in RUN_SECTIONS if isinstance(data.get(key) or {}, dict)}}


def with_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """``data`` with ``--set key=value`` overrides applied to copies of its run sections: only the run sections can
    be overridden (a study file's plan is the file's)."""
    data = with_sections_copied(data)
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".")[0] not in RUN_SECTIONS:
            raise ConfigError(key, f"unknown key; allowed sections: {', '.join(RUN_SECTIONS)}")
        set_path(data, key, value)
    return data


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``dotted == "a.b"``, creating mappings on the way."""
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"{part!r} is not a mapping")
        node = child
    node[last] = value


def run_config_from(data: dict, overrides: list[str] = (), source: str = "") -> RunConfig:
    """A RunConfig from the ``model``/``task``/``train`` sections of ``data`` (other keys ignored), then overrides."""
    try:
        data = with_overrides(data, overrides)
        return from_dict(RunConfig, {key: data.get(key) or {} for key in RUN_SECTIONS})
    except ConfigError as err:
        raise err.at(source) from None


def with_values(config: RunConfig, values: dict[str, Any]) -> RunConfig:
    """``config`` with dotted keys replaced (``{"model.num_heads": 8}``), validated again."""
    data = to_dict(config)
    for key, value in values.items():
        set_path(data, key, value)
    return from_dict(RunConfig, data)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"num_heads": 8}}`` -> ``{"model.num_heads": 8}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def fmt(value: Any, digits: int | None = None) -> str:
    """A config value as a study file writes it (``null``, ``true``, ``0.1``); floats to ``digits`` significant
    digits when given (tables), exactly otherwise (variant names, which must stay distinct)."""
    if value is None or value == "None":
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if digits else str(value)
    return str(value)
