"""The study file (``studies/*.yaml``) as written: its typed shape (:class:`StudyFile`, parsed by
``config.from_dict`` like every other config), the checks of its names and worker counts, and the limits that catch
a typo before it becomes a plan of millions of trials. ``ablate.design.spec`` resolves it into a :class:`StudySpec`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ablate.core import names
from ablate.core.config import (
    ConfigError,
    ModelConfig,
    TaskConfig,
    TrainConfig,
    choice,
)
from ablate.core.sizes import MATCHES
from ablate.tasks.checks import TRAITS

KINDS = ("ablation", "search")
OUTCOMES = tuple(names.OUTCOME_UNITS)  # loss, bpb
TOKENIZER_KEYS = ("task.tokenizer", "task.tokenizer_vocab")  # arms that differ in these differ in what a token is
SAMPLERS = ("tpe", "random", "halton")
PRUNERS = ("none", "median", "hyperband")
HALTON_SEED = 0  # the same nuisance points for every variant, and for every run of the same study file
MAX_SEARCH_COMBINATIONS = 100_000
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # also a folder name under reports/: no "..", no "/"
MAX_NAME = 100  # characters of a study name: it is a folder, a lock file's name and an MLflow experiment
MAX_POINTS = 1000  # tune points, extra points and seeds per variant: a plan of millions of trials is a typo
MAX_VARIANTS = 1000
MAX_WORKERS = 256  # worker processes on one machine
MAX_TOGETHER = 64  # trials one worker trains as one stacked model (``ablate.training.together``)


def check_name(name: object, key: str = "name") -> str:
    """``name`` if it is a safe study name (a single path component: a folder under reports/, a lock file's name),
    else a ConfigError naming ``key``. Names read back from a store are checked too: a store can be shared."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > MAX_NAME:
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise ConfigError(key, f"must be a name of at most {MAX_NAME} letters, digits, '_', '.', '-' (not starting "
                               f"with '.' or '-'), got {shown}")  # fmt: skip
    return name


def check_workers(workers: object, key: str) -> int | str:
    """``workers`` if it is ``auto`` or a number of processes in [1, MAX_WORKERS], else a ConfigError naming ``key``."""
    if workers == "auto" or isinstance(workers, int) and not isinstance(workers, bool) and 1 <= workers <= MAX_WORKERS:
        return workers
    raise ConfigError(key, f"must be auto or a number in [1, {MAX_WORKERS}], got {workers!r}")


def check_together(together: object, key: str) -> int | str:
    """``together`` if it is ``auto`` or a number of trials in [1, MAX_TOGETHER], else a ConfigError naming ``key``."""
    number = isinstance(together, int) and not isinstance(together, bool)
    if together == "auto" or number and 1 <= together <= MAX_TOGETHER:
        return together
    raise ConfigError(key, f"must be auto or a number in [1, {MAX_TOGETHER}], got {together!r}")


@dataclass(frozen=True)
class Range:
    """A nuisance parameter's range. An ablation never tries a value outside ``[low, high]``: they are hard limits."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    """Search on a log scale (learning rates); needs ``low > 0``."""

    def __post_init__(self) -> None:
        if self.low is None or self.high is None or not self.low < self.high:
            raise ConfigError("", f"needs low < high, got low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ConfigError("low", f"must be > 0 on a log scale, got {self.low}")


@dataclass(frozen=True)
class Seeds:
    """Seeds per arm: ``min`` for every arm; arms still undecided then get up to ``max`` (see ``stats.verdicts``)."""

    min: int = 3
    max: int = 3

    def __post_init__(self) -> None:
        if self.min < 1:
            raise ConfigError("min", f"must be >= 1, got {self.min}")
        if self.max < self.min:
            raise ConfigError("max", f"must be >= min ({self.min}), got {self.max}")
        if self.max > MAX_POINTS:
            raise ConfigError("max", f"must be <= {MAX_POINTS}, got {self.max}")


@dataclass(frozen=True)
class Budget:
    trials: int | None = None
    """search: total trials in the study. An ablation's size follows from its plan."""
    timeout: float | None = None
    """Seconds after which workers take no new trial (resume later with the same command)."""
    match: str = choice("steps", MATCHES, "what every arm uses as much of as the base (ablate.core.sizes): steps, "
                                          "tokens, flops or wall (seconds of training); a list (``[steps, flops]``) "
                                          "runs the ablation once per budget, side by side")  # fmt: skip
    value: float | None = None
    """Each arm's budget in the unit of ``match`` (tokens, FLOPs, seconds); default: what the base's train.steps use.
    A wall budget needs it."""

    def __post_init__(self) -> None:
        if self.trials is not None and self.trials < 1:
            raise ConfigError("trials", f"must be >= 1, got {self.trials}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("timeout", f"must be > 0 seconds, got {self.timeout}")
        if self.value is not None and not self.value > 0:
            raise ConfigError("value", f"must be > 0 ({self.match}), got {self.value}")


EXPECTED = ("better", "worse", "equivalent", "not worse", "not better")


@dataclass(frozen=True)
class Claim:
    """A published claim this study puts to the test (``ablate.report.claims`` judges it from the data)."""

    source: str = ""
    """Who claimed it, where: "Vaswani et al. 2017, Table 3 rows (A)"."""
    claim: str = ""
    """The claim in one sentence."""
    published: str = ""
    """The published numbers it rests on."""
    caveat: str = ""
    """What differs here from the published setting, beyond the scale and task the report states itself."""
    expect: dict[str, str] = field(default_factory=dict)
    """Variant -> its expected verdict against the base: better, worse, equivalent, not worse, not better."""
    less_sensitive: str = ""
    """A variant whose learning-rate sensitivity (over the tune points) should be lower than ``than``'s."""
    than: str = "base"
    lr_exponent: dict[str, list[float]] = field(default_factory=dict)
    """Family with a width ladder: variant -> [low, high] expected for b in best lr ∝ width^b."""
    solves: tuple[str, ...] = ()
    """Variants ("base" too) whose test accuracy should reach ``names.SOLVED_ACC`` (a generated task: solved)."""

    @property
    def in_one_study(self) -> bool:
        """Whether one study's numbers judge a part of it (all but ``lr_exponent``, which needs a width ladder)."""
        return bool(self.expect or self.less_sensitive or self.solves)
    member: str = ""
    """In a family: the one member (its label, "dk_fixed") whose numbers test the claim; "": every member."""

    def __post_init__(self) -> None:
        if not self.source or not self.claim:
            raise ConfigError("", "needs source and claim (who said it, in one sentence)")
        if not (self.expect or self.less_sensitive or self.lr_exponent or self.solves):
            raise ConfigError("", "needs an expectation: expect, less_sensitive, lr_exponent or solves")
        for variant, verdict in self.expect.items():
            if verdict not in EXPECTED:
                raise ConfigError(f"expect.{variant}", f"unknown verdict {verdict!r}; allowed: {', '.join(EXPECTED)}")
        for variant, bounds in self.lr_exponent.items():
            if len(bounds) != 2 or not all(isinstance(b, (int, float)) for b in bounds) or not bounds[0] < bounds[1]:
                raise ConfigError(f"lr_exponent.{variant}", f"must be [low, high] with low < high, got {bounds!r}")


@dataclass(frozen=True)
class StudyFile:
    """A study file as written: every top-level key, typed. Unknown keys, wrong types and choices fail here."""

    name: str = ""
    kind: str = choice("ablation", KINDS, "ablation: one factor at a time around the base; search: joint search")
    description: str = ""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scientific: dict[str, list] = field(default_factory=dict)
    """Config key (dotted, or a bare field name naming one field) -> the values to compare; the base value first."""
    nuisance: dict[str, Range] = field(default_factory=dict)
    """Config key -> its range, re-tuned for every scientific value."""
    points: int = 3
    """Ablation: first tune points per variant; more follow until the best is bracketed (see ``ablate.design.plan``)."""
    seeds: int | Seeds = 3
    """Seed re-runs per variant: a number, or ``{min, max}`` for sequential seeds. Fewer than 2 decide nothing."""
    tune_seeds: int = 2
    """Ablation: tune seeds each tune point runs on (never verdict seeds). Two or more let each arm's learning rate be
    chosen from seed means, and bound what the choice costs it (``ablate.stats.tuning``); one run per point cannot."""
    outcome: str = choice("loss", OUTCOMES, "the metric tuning and verdicts are on: loss (nats per token; val/loss "
                                            "picks learning rates, test/loss decides) or bpb (bits per byte, val/bpb "
                                            "and test/bpb; a task scored in bits per byte, lm, only). Arms that "
                                            "change the tokenizer need bpb: per-token losses of different tokens do "
                                            "not compare")  # fmt: skip
    margin: float = 0.03
    """The smallest difference of the verdict metric that matters, in the units of ``outcome`` (loss: nats per
    token; bpb: bits per byte); differences within +-margin count as "equivalent". 0.03 nats is about 2% of a small
    char-level model's loss (1.7 nats/char): less than that rarely decides an architecture. Set it in the metric's
    units for other tasks and outcomes (0.03 nats per character is 0.043 bits per byte of ASCII text)."""
    alpha: float = 0.05
    """Per factor, the chance of any false better/worse/equivalent claim is at most this."""
    max_extra_points: int = 3
    """Ablation: at most this many tune points per variant beyond ``points`` while bracketing its optimum."""
    budget: Budget = field(default_factory=Budget)
    sampler: str | None = choice(None, SAMPLERS, "search only: tpe (default), random or halton")
    pruner: str | None = choice(None, PRUNERS, "search only: median (default), hyperband or none")
    storage: str | None = None
    tracking_uri: str | None = None
    heartbeat: int = 10
    """Seconds between a running trial's heartbeats; a trial silent for 3x this long is failed and retried."""
    workers: int | str = 1
    """Worker processes on this machine when ``--workers`` is not given, or ``auto``: one per core on a CPU, on a GPU
    machine as many per device as fit its memory (``ablate.core.devices``); torch threads are split between them."""
    together: int | str = "auto"
    """Trials of one architecture (a variant's tune points, its seeds) a worker trains as one stacked model, each
    still its own trial and run (``ablate.training.together``): ``auto`` is up to 8 on a CUDA device, as many as fit its
    memory, and 1 (one run at a time) on a CPU, where it does not pay; a number forces it (1: never)."""
    claims: dict[str, Claim] = field(default_factory=dict)
    """Id -> a published claim this study tests; its verdict (reproduced, not reproduced, inconclusive) is computed
    from the study's own verdicts (``ablate.report.claims``)."""
    ladder: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Label -> changes to the base (``{model.embed_dim: 128, model.num_layers: 3}``): the whole study is run once
    per rung, each its own Optuna study ``<name>.<label>`` (see :func:`expand`); the report compares their answers."""

    def __post_init__(self) -> None:
        check_name(self.name)
        check_workers(self.workers, "workers")
        check_together(self.together, "together")
        for key, most in (("points", MAX_POINTS), ("tune_seeds", MAX_POINTS), ("heartbeat", 3600)):
            if not 1 <= getattr(self, key) <= most:
                raise ConfigError(key, f"must be in [1, {most}], got {getattr(self, key)}")
        if not 0 <= self.max_extra_points <= MAX_POINTS:
            raise ConfigError("max_extra_points", f"must be in [0, {MAX_POINTS}], got {self.max_extra_points}")
        if isinstance(self.seeds, int) and not 1 <= self.seeds <= MAX_POINTS:
            raise ConfigError("seeds", f"must be in [1, {MAX_POINTS}], got {self.seeds}")
        if not self.margin > 0:
            raise ConfigError("margin", f"must be > 0, got {self.margin}")
        if not 0 < self.alpha < 0.5:
            raise ConfigError("alpha", f"must be in (0, 0.5), got {self.alpha}")
        if self.outcome != "loss" and TRAITS[self.task.name].metric != self.outcome:
            scored = ", ".join(name for name, traits in TRAITS.items() if traits.metric == self.outcome)
            raise ConfigError("outcome", f"{self.outcome} needs a task scored in {names.OUTCOME_UNITS[self.outcome]} "
                                         f"({scored}); task "
                                         f"{self.task.name} allows loss")  # fmt: skip


def check_tokenizer_outcome(keys: list[str], outcome: str) -> None:
    """Arms that change ``task.tokenizer`` or ``task.tokenizer_vocab`` (``keys``: resolved scientific and nuisance
    keys, or what a ladder changes) are compared in bits per byte: a ConfigError naming ``outcome`` otherwise."""
    changed = [k for k in keys if k in TOKENIZER_KEYS]
    if changed and outcome != "bpb":
        raise ConfigError("outcome", f"must be bpb when arms change {', '.join(changed)}: per-token loss does not "
                                     f"compare across tokenizers, got {outcome}")  # fmt: skip
