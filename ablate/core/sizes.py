"""Compute-matched comparisons: every arm of a study trains until it has used the base's budget of optimizer steps,
tokens, FLOPs or seconds (``budget.match`` in a study file). A cheaper arm trains longer, its warmup, cosine and
evaluations stretched to its own length. No torch: the study file's checks and the report use it.

- ``steps``: every arm trains ``train.steps``, the default (nothing is matched, as before budgets existed).
- ``tokens``: ``steps * batch_size * seq_len`` (training batches are always full; padding counts as tokens).
- ``flops``: the trainer's own count (:func:`flops_per_sequence`): every matmul of the forward and backward pass,
  from the config; the tests check it against the FLOPs torch counts in the built model.
- ``wall``: seconds of training steps (set-up and evaluations excluded), measured by the trainer, which stops after
  the step that reaches them and runs its learning-rate schedule on the share of the seconds used, not on steps
  (the budget-aware schedule of Geiping & Goldstein 2023, "Cramming"). A step count fixed from a timing would miss
  the budget by the timing's error, and each worker would time its own. The price: a run is not reproducible step
  for step, and its seconds depend on the machine and its load, so compare arms on one kind of machine.

The base's budget is its ``train.steps`` in the unit of ``match``, or ``budget.value`` when given (a wall budget needs
it). An arm trains ``ceil(budget / cost of one of its steps)`` steps: at least the budget, less than one step over.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from ablate.core import names
from ablate.core.config import ConfigError, ModelConfig, RunConfig, with_values

MATCHES = ("steps", "tokens", "flops", "wall")
UNITS = {"steps": "steps", "tokens": "tokens", "flops": "FLOPs", "wall": "s"}
USED = {"steps": names.STEPS, "tokens": names.TOKENS, "flops": names.FLOPS_TOTAL, "wall": names.TRAIN_S}
"""The run metric that says how much of its budget an arm used."""
MAX_STEPS = 10**9  # steps of one arm: a budget that asks for more is a typo
VOCAB_KEYS = ("task.name", "task.source", "task.text_column", "task.val_fraction", "task.test_fraction",
              "task.vocab_size")  # fmt: skip
"""Keys that change a task's vocabulary or classes, hence the FLOPs of the model's head: a FLOP budget taken from the
base cannot be counted for an arm that changes them (only the trainer knows a text's vocabulary)."""


# ---------------------------------------------------------------------------------------------------------------
# Counting


def flops_per_sequence(cfg: ModelConfig, vocab_size: int, seq_len: int, num_classes: int | None = None,
                       max_len: int | None = None) -> int:  # fmt: skip
    """Training FLOPs of one sequence of ``seq_len`` tokens: every matmul, 2 FLOPs per multiply-add, forward and
    backward (the gradients of input and weights: 3x the forward), as torch's ``FlopCounterMode`` counts them.

    Per token: the q, k, v and attn_out projections and the MLP (2 x their weights), and a language model's tied
    head (2 * vocab * C); attention 2 * T * (H * D) for q k^T and as much for weights @ v, the full T x T (no discount
    for causal masking, as PaLM's App. B counts it). A classifier's head runs once per sequence. Not counted: what is
    no matmul (embedding lookups, rotary positions, norms, softmax, activations: O(C) per token) and the optimizer
    (O(weights) per step, well under 1% at batch_size * seq_len >= 1000). 6N (N every parameter) would also count the
    position embedding, norms and biases as matmuls: 3% to 15% more at this suite's sizes, the most for the narrowest
    model. The count is the same for every ``model.position``: learned, rotary and no positions add no matmul.

    lstm, gru (g = 4, 3 gates, hidden size h): per token and layer 2 * (input + h) * g * h forward (input C for the
    first layer, h above), the projection h -> C when h != C, the same head: nothing grows with T (the recurrence is
    T sequential steps, a cost in latency, not in FLOPs). torch skips the gradient of the zero initial state, 2 g h^2
    per layer and sequence, under 1/T of the recurrent term: not subtracted. ``max_len``: the length the model is
    built at, which sets an RNN's matched hidden size under learned positions (default ``seq_len``).
    """
    C, L = cfg.embed_dim, cfg.num_layers
    head = vocab_size * C if num_classes is None else 0  # a classifier's head runs once per sequence, below
    if cfg.kind == "transformer":
        HD = cfg.num_heads * cfg.resolved_head_dim
        hidden = cfg.mlp_hidden
        per_token = 6 * (L * (C * 3 * HD + HD * C + 2 * C * hidden) + head) + 12 * L * seq_len * HD
    else:
        h = rnn_hidden_size(cfg, seq_len if max_len is None else max_len)
        per_token = 6 * (_rnn_weights(cfg.kind, C, L, h) + head)
    return seq_len * per_token + (6 * C * num_classes if num_classes is not None else 0)


# ---------------------------------------------------------------------------------------------------------------
# The recurrent baseline at equal parameters

GATES = {"lstm": 4, "gru": 3}


def param_count(cfg: ModelConfig, vocab_size: int, max_len: int, num_classes: int | None = None) -> int:
    """Trainable parameters of ``transformer.build_model(cfg, vocab_size, max_len, num_classes)``, the tied head
    counted once (the tests check it against the built model for every kind)."""
    C, b = cfg.embed_dim, int(cfg.bias)
    head = C * num_classes + num_classes if num_classes is not None else 0 if cfg.tie_head else vocab_size * C
    shared = vocab_size * C + C + b * C + head
    if cfg.kind == "transformer":
        return shared + _transformer_body(cfg, max_len)
    return shared + _rnn_body(cfg, rnn_hidden_size(cfg, max_len))


def rnn_hidden_size(cfg: ModelConfig, max_len: int) -> int:
    """An lstm's or gru's hidden size: ``cfg.rnn_hidden`` when set, else the h >= 1 whose model has the parameter
    count closest to the Transformer of the same config (``kind: transformer``, built at ``max_len``; the smaller h
    on a tie). Both share the embedding, final LayerNorm and head, so only the bodies are matched: the blocks (and a
    learned position table, T x C) against the recurrent layers and the h -> C projection. A step of h changes the
    count by about 2 g (2 L - 1) h, so the match is within about 1 / h of the total (under 1% from h = 100)."""
    if cfg.rnn_hidden is not None:
        return cfg.rnn_hidden
    target = _transformer_body(dataclasses.replace(cfg, kind="transformer"), max_len)
    best, h = 1, 1
    while True:  # increasing in h except for a drop at h == C (the projection goes): scan past both
        if abs(_rnn_body(cfg, h) - target) < abs(_rnn_body(cfg, best) - target):
            best = h
        if h >= cfg.embed_dim and _rnn_body(cfg, h) > target:
            return best
        h += 1


def crossover_length(cfg: ModelConfig, vocab_size: int, max_len: int, num_classes: int | None = None) -> int:
    """The shortest sequence length T at which the Transformer of ``cfg``'s sizes spends more training FLOPs per
    token than ``cfg``'s lstm or gru, both built at ``max_len`` (the RNN matched there unless ``rnn_hidden`` is set).

    Per token the Transformer costs a + 12 L T (H D) (its weights, then attention's T x T term), the RNN a constant r:
    T = floor((r - a) / (12 L H D)) + 1, and 1 when the RNN has no more matmul weights (at equal parameters both
    have about as many, so attention is the costlier per token at about every length)."""
    if cfg.kind not in GATES:
        raise ValueError(f"crossover_length compares an lstm or gru with the Transformer, got kind {cfg.kind!r}")
    transformer = dataclasses.replace(cfg, kind="transformer")
    r = flops_per_sequence(cfg, vocab_size, 1, num_classes, max_len)  # per token at T = 1: the constant
    return crossover_from(flops_per_sequence(transformer, vocab_size, 1, num_classes, max_len), 1, r,
                          attention_slope(cfg))  # fmt: skip


def attention_slope(cfg: ModelConfig) -> int:
    """A Transformer's training FLOPs per token added by one more token of context: 12 L H D (q k^T and the
    weights @ v, forward and backward, in every layer)."""
    return 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim


def crossover_from(transformer_per_token: float, seq_len: int, rnn_per_token: float, slope: float) -> int:
    """``crossover_length`` from per-token FLOPs already counted: the Transformer's at ``seq_len`` (a + slope * T),
    a recurrent model's (constant in T). The shortest T from which the Transformer is the costlier per token."""
    a = transformer_per_token - slope * seq_len
    return max(1, int((rnn_per_token - a) // slope) + 1)


def _rnn_weights(kind: str, C: int, L: int, h: int) -> int:
    """Matmul weights of the recurrent layers (input-to-hidden and hidden-to-hidden) and the h -> C projection."""
    return sum(GATES[kind] * h * (width + h) for width in [C] + [h] * (L - 1)) + (0 if h == C else h * C)


def _rnn_body(cfg: ModelConfig, h: int) -> int:
    """Parameters of an RNN's layers (torch keeps two bias vectors per gate) and its projection h -> C."""
    C, L, b = cfg.embed_dim, cfg.num_layers, int(cfg.bias)
    return _rnn_weights(cfg.kind, C, L, h) + b * (2 * GATES[cfg.kind] * h * L + (0 if h == C else C))


def _transformer_body(cfg: ModelConfig, max_len: int) -> int:
    """Parameters of the blocks and a learned position table: what the Transformer has beside the shared parts."""
    C, L, b = cfg.embed_dim, cfg.num_layers, int(cfg.bias)
    HD, hidden = cfg.num_heads * cfg.resolved_head_dim, cfg.mlp_hidden
    mlp = 2 * C * hidden + (C + b * C) + b * (hidden + C) if hidden else 0  # its LayerNorm, weights, biases
    per_layer = (C + b * C + C * 3 * HD + HD * C + b * (3 * HD + C) + mlp
                 + (cfg.num_heads if cfg.scaling in ("learned", "qknorm", "logn") else 0))  # fmt: skip
    return (max_len * C if cfg.position == "learned" else 0) + L * per_layer


def tokens_per_step(cfg: RunConfig) -> int:
    return cfg.train.batch_size * cfg.task.seq_len


def step_cost(match: str, cfg: RunConfig, vocab_size: int, num_classes: int | None) -> int:
    """What one optimizer step of ``cfg`` costs in the unit of ``match`` (not ``wall``: only a clock knows)."""
    if match == "steps":
        return 1
    if match == "tokens":
        return tokens_per_step(cfg)
    if match == "flops":
        return cfg.train.batch_size * flops_per_sequence(cfg.model, vocab_size, cfg.task.seq_len, num_classes)
    raise ValueError(f"a {match} budget has no cost per step known before training")


def stretched(cfg: RunConfig, steps: int) -> RunConfig:
    """``cfg`` trained for ``steps``: its warmup and evaluation interval scaled by the same factor, so the schedule
    (warmup, then cosine to the floor) and the evaluations fall at the same shares of the run."""
    train = cfg.train
    ratio = Fraction(steps, train.steps)
    warmup = min(steps, math.floor(train.warmup_steps * ratio + Fraction(1, 2)))
    every = max(1, math.floor(train.eval_every * ratio + Fraction(1, 2)))
    train = dataclasses.replace(train, steps=steps, warmup_steps=warmup, eval_every=every)
    return dataclasses.replace(cfg, train=train)


# ---------------------------------------------------------------------------------------------------------------
# The budget of a study


@dataclass(frozen=True)
class ComputeBudget:
    """Each arm's budget: ``value`` in the unit of ``match``, or else what the ``base``'s train.steps use."""

    match: str
    base: RunConfig
    value: float | None = None

    @property
    def unit(self) -> str:
        return UNITS[self.match]

    def total(self, vocab_size: int, num_classes: int | None) -> Fraction:
        """The budget of every arm (exact), for the vocabulary and classes of the task the arms share."""
        if self.value is not None:
            return Fraction(self.value)
        return Fraction(self.base.train.steps * step_cost(self.match, self.base, vocab_size, num_classes))

    def steps(self, cfg: RunConfig, vocab_size: int, num_classes: int | None) -> int:
        """Optimizer steps of ``cfg`` to use the budget, on a task of this vocabulary and classes."""
        return math.ceil(self.total(vocab_size, num_classes) / step_cost(self.match, cfg, vocab_size, num_classes))

    def resolve(self, cfg: RunConfig, vocab_size: int, num_classes: int | None) -> RunConfig:
        """``cfg`` with its own ``train.steps`` (warmup and evaluations stretched); a wall budget leaves it as is."""
        if self.match == "wall":
            return cfg
        steps = self.steps(cfg, vocab_size, num_classes)
        if steps > MAX_STEPS:
            raise ConfigError("budget.value", f"an arm would train {steps:,} steps; at most {MAX_STEPS:,}")
        return stretched(cfg, steps)

    def derived(self, vocab_size: int, num_classes: int | None) -> dict[str, object]:
        """What a run records of its budget (MLflow params ``derived.budget_*``)."""
        return {"budget_match": self.match, "budget_value": float(self.total(vocab_size, num_classes)),
                "budget_unit": self.unit}  # fmt: skip


def from_study(match: str, value: float | None, base: RunConfig, scientific: dict[str, tuple],
               nuisance: Iterable[str]) -> ComputeBudget | None:  # fmt: skip
    """The study file's ``budget.match`` and ``budget.value``, checked against what the study varies; None for
    ``steps`` (every arm trains train.steps, exactly as a study without a budget does)."""
    varied = [(f"scientific.{key}", key) for key in scientific] + [(f"nuisance.{key}", key) for key in nuisance]
    if match == "steps":
        if value is not None:
            raise ConfigError("budget.value", "a steps budget is train.steps; set that, or match tokens, flops or wall")
        return None
    if match == "wall" and value is None:
        raise ConfigError("budget.value", "a wall budget needs its seconds of training per arm, e.g. value: 60")
    for where, key in varied:
        if key == "train.steps":
            raise ConfigError(where, f"cannot be varied under budget.match {match}: each arm's length follows from it")
        if match == "flops" and value is None and key in VOCAB_KEYS:
            raise ConfigError(where, "changes the vocabulary, so the base's FLOPs do not carry over to its arms; give "
                                   "budget.value (FLOPs per arm)")  # fmt: skip
    budget = ComputeBudget(match, base, value)
    if match != "wall":  # every arm's steps, with the fewest FLOPs a vocabulary allows (the most steps)
        arms = [base] + [with_values(base, {key: v}) for key, values in scientific.items() for v in values[1:]]
        for arm in arms:
            steps = budget.steps(arm, 1, None)
            if steps > MAX_STEPS:
                where = "budget.value" if value is not None else "budget.match"
                raise ConfigError(where, f"an arm would train {steps:,} steps to use the budget; at most {MAX_STEPS:,}")
    return budget
