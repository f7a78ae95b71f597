"""Checks that need neither training nor a store: run by ``ablate study`` (through ``families.load_specs``) and
``ablate train`` (``load_run_config``, here) before anything is written, so a run that cannot work fails in a
second with one line naming the key, not in every trial after the stores exist.

- the task's data (``ablate.tasks.checks``): the source exists and is text, generated tasks can be generated;
- the model fits the task: no positions at all (``model.position: none``) only for a causal (language-model) task;
- memory: a run whose parameters, gradients, AdamW state, activations and data cannot fit in this machine's memory
  (``estimate_bytes``, an estimate that errs high by up to half) is refused, naming the key that makes it too large.

No torch: the estimate is arithmetic on the config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ablate.core import sizes
from ablate.core.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    fmt,
    run_config_from,
    with_values,
)
from ablate.core.inputs import read_yaml
from ablate.tasks.checks import IN_MEMORY_SPLIT_BYTES, TRAITS, check_task, describe_data, vocab_guess

if TYPE_CHECKING:
    from ablate.design.spec import StudySpec

FLOAT = 4  # bytes of an fp32 value: parameters, gradients and optimizer state stay fp32 under bf16 autocast
STATE_COPIES = 4  # parameters, gradients, AdamW's two moments
CHARLM_BYTES_PER_CHAR = 40  # the text as str, utf-32 codes, windows as int32 rows (Arrow) and int64 tensors
# The keys a run's memory grows with, each with its default: the one whose default saves the most is named.
SIZE_KEYS = {
    "model.embed_dim": ModelConfig.embed_dim,
    "model.num_layers": ModelConfig.num_layers,
    "model.num_heads": ModelConfig.num_heads,
    "model.head_dim": None,
    "model.mlp_ratio": ModelConfig.mlp_ratio,
    "model.rnn_hidden": None,
    "train.batch_size": TrainConfig.batch_size,
    "task.seq_len": TaskConfig.seq_len,
    "task.vocab_size": TaskConfig.vocab_size,
    "task.tokenizer_vocab": TaskConfig.tokenizer_vocab,
    "task.num_train": TaskConfig.num_train,
    "task.num_val": TaskConfig.num_val,
    "task.num_test": TaskConfig.num_test,
    "task.eval_lengths": TaskConfig.eval_lengths,
}


def load_run_config(path: str | Path, overrides: list[str] = (), *, preflight: bool = True) -> RunConfig:
    """A run config file, or a study file whose base configuration is trained; with ``preflight`` also checked
    against this machine (the data source, the memory) before anything is written."""
    config = run_config_from(read_yaml(path), overrides, str(path))
    if preflight:
        try:
            check_run(config)
        except ConfigError as err:
            raise err.at(str(path)) from None
    return config


def check_run(cfg: RunConfig, where: str = "") -> None:
    """The task's data and the memory of one run; ``where`` prefixes the key (``scientific.model.embed_dim``)."""
    try:
        check_task(cfg.task)
    except ConfigError as err:
        raise ConfigError(where or err.key, err.problem if not where else f"{err.key}: {err.problem}") from None
    check_model(cfg, where)
    check_memory(cfg, where)


def check_model(cfg: RunConfig, where: str = "") -> None:
    """A ConfigError when the model cannot work on the task: no positions on a bidirectional classifier (an lstm or
    gru ignores positions)."""
    if cfg.model.kind == "transformer" and cfg.model.position == "none" and TRAITS[cfg.task.name].classifier:
        problem = (f"none needs a causal (language-model) task: {cfg.task.name}'s bidirectional classifier without "
                   "positions sees a bag of tokens; use rope or learned")  # fmt: skip
        raise ConfigError(where or "model.position", problem if not where else f"model.position: {problem}")


def check_study(spec: StudySpec) -> None:
    """``check_run`` for every configuration a study can train: the base, each variant, each nuisance range's ends.
    The data source is checked once per distinct task."""
    tasks_seen: set[TaskConfig] = set()
    for where, cfg in _configs(spec):
        if cfg.task not in tasks_seen:
            tasks_seen.add(cfg.task)
            try:
                check_task(cfg.task)
            except ConfigError as err:
                raise _at(where, err) from None
        try:
            check_model(cfg)
            check_memory(cfg)
        except ConfigError as err:
            raise _at(where, err) from None


def data_lines(spec: StudySpec) -> list[str]:
    """What ``check_study`` found of each distinct corpus the study trains on (size, tokens, cache), a line each."""
    tasks = dict.fromkeys(cfg.task for _, cfg in _configs(spec))
    return [line for task in tasks if (line := describe_data(task))]


def _configs(spec: StudySpec) -> list[tuple[str, RunConfig]]:
    """Every configuration a study can train, with the study key that makes it: the base, each variant, each
    nuisance range's ends."""
    configs: list[tuple[str, RunConfig]] = [("", spec.base)]
    for variant in spec.variants()[1:]:
        value = variant.values[variant.factor]
        configs.append((f"scientific.{variant.factor}", with_values(spec.base, {variant.factor: value})))
    for p in spec.nuisance:
        for end in (p.low, p.high):
            value = int(end) if p.integer else end
            configs.append((f"nuisance.{p.key}", with_values(spec.base, {p.key: value})))
    return configs


def _at(where: str, err: ConfigError) -> ConfigError:
    """A variant's error named by the study key that produced it, the run key in the message."""
    return ConfigError(where, f"{err.key}: {err.problem}") if where else err


# ---------------------------------------------------------------------------------------------------------------
# Memory


def run_bytes(cfg: RunConfig) -> int:
    """Bytes one run of ``cfg`` holds at its peak, by ``estimate_bytes`` (errs high): what a worker slot needs."""
    return estimate_bytes(_sizes(cfg))


def check_memory(cfg: RunConfig, where: str = "") -> None:
    """A ConfigError naming the key that makes ``cfg`` too large for this machine's memory, if it is."""
    sizes = _sizes(cfg)
    need, have = estimate_bytes(sizes), machine_memory()
    if have is None or need <= have:
        return
    candidates = {key: {**sizes, key: default} for key, default in SIZE_KEYS.items()}
    candidates["task.source"] = {**sizes, "text_bytes": 0}
    key = max(candidates, key=lambda k: need - estimate_bytes(candidates[k]))
    value = cfg.task.source if key == "task.source" else sizes[key]
    problem = (f"{fmt(value)} needs about {_gib(need)} to train (parameters, gradients, AdamW state, activations "
               f"and data; an estimate), more than the {_gib(have)} of memory here")  # fmt: skip
    raise ConfigError(where or key, problem if not where else f"{key}: {problem}")


def estimate_bytes(s: dict) -> int:
    """Bytes one training run holds at its peak, from the sizes of ``_sizes``: fp32 state, every activation kept
    for the backward pass (the T x T attention weights of every layer unless a fused GPU kernel runs), or the T x T
    logits, weights and entropies of one layer when an evaluation measures them, or one layer's scores and weights
    at the longest ``task.eval_lengths`` k (batches k x smaller, k x longer: k x a training batch's T x T scores).
    Measured on the CPU (widths 128 to 512, T 256 to 1024, torch 2.13): 1.15 to 1.5 times the growth of peak
    resident memory during training. An lstm or gru (``_recurrent_bytes``) keeps no T x T matrix."""
    model, B, T = _model_of(s), int(s["train.batch_size"]), int(s["task.seq_len"])
    C, L, H, D, hidden = model.embed_dim, model.num_layers, model.num_heads, model.resolved_head_dim, model.mlp_hidden
    V = vocab_guess(s["task.name"], int(s["task.vocab_size"]), s["task.tokenizer"], int(s["task.tokenizer_vocab"]))
    params = sizes.param_count(model, V, T) + C * max(V, 10)  # the head counted untied: a classifier's own head
    scores = B * H * T * T  # one layer's attention matrix
    training = L * B * T * (10 * C + 6 * H * D + 3 * hidden) + 3 * B * T * V
    training += 3 * L * scores if s["model.backend"] == "manual" or not s["fused"] else 0
    k = max(s["task.eval_lengths"], default=1)
    longer = 0 if k == 1 else 4 * max(1, B // k) * H * (k * T) ** 2 + max(1, B // k) * k * T * (4 * C + hidden + V)
    acts = max(training, 4 * scores, longer)  # evaluations run after the step's activations are freed
    if s["model.kind"] != "transformer":
        params, acts = _recurrent_bytes(s, V)
    if TRAITS[s["task.name"]].text:
        data = CHARLM_BYTES_PER_CHAR * int(s["text_bytes"])
        if s["task.name"] == "lm":  # memory-mapped but for validation and test rows up to a size, as int64 tensors
            data = min(data, 2 * 2 * 2 * IN_MEMORY_SPLIT_BYTES)
    else:  # inputs and targets of every row, as int32 (Arrow) and int64 (tensors)
        data = sum(int(s[key]) for key in ("task.num_train", "task.num_val", "task.num_test")) * T * 2 * (4 + 8)
        data += len(s["task.eval_lengths"]) * int(s["task.num_test"]) * T * 2 * (4 + 8)  # the longer test sets
    return FLOAT * (STATE_COPIES * params + acts) + data


def _recurrent_bytes(s: dict, V: int) -> tuple[int, int]:
    """Parameters and activations (in values) of an lstm or gru: per layer and token its gates, cell and hidden
    state and input, kept for the backward pass (and as many again for torch's CPU kernel's workspace); no T x T.
    Measured on the CPU (width 128, T 512, batch 32, torch 2.13): 1.2 times the growth of peak resident memory."""
    model, B, T = _model_of(s), int(s["train.batch_size"]), int(s["task.seq_len"])
    C, L = model.embed_dim, model.num_layers
    N, g = sizes.rnn_hidden_size(model, T), sizes.GATES[s["model.kind"]]
    params = sizes.param_count(model, V, T) + C * max(V, 10)  # the head counted untied, as above
    training = L * B * T * 2 * (g + 3) * N + B * T * (N + 10 * C) + 3 * B * T * V
    k = max(s["task.eval_lengths"], default=1)
    longer = max(1, B // k) * k * T * ((g + 3) * N + 4 * C + V)  # no grad: one layer's values at a time
    return params, max(training, longer)


def _model_of(s: dict) -> ModelConfig:
    """The model of a size dict: its head width explicit, since a candidate of ``check_memory`` may set a default
    ``embed_dim`` that its ``num_heads`` does not divide."""
    C, H = int(s["model.embed_dim"]), int(s["model.num_heads"])
    return ModelConfig(embed_dim=C, num_heads=H, head_dim=int(s["model.head_dim"] or max(1, C // H)),
                       num_layers=int(s["model.num_layers"]), mlp_ratio=float(s["model.mlp_ratio"]),
                       kind=s["model.kind"], rnn_hidden=s["model.rnn_hidden"])  # fmt: skip


def machine_memory() -> int | None:
    """Physical memory in bytes, or a container's limit when lower (cgroup v2 or v1); None when unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _sizes(cfg: RunConfig) -> dict:
    """The numbers memory depends on, by config key, plus the task's name and the bytes of a local text."""
    sections = {"model": cfg.model, "train": cfg.train, "task": cfg.task}
    sizes: dict = {key: getattr(sections[key.split(".")[0]], key.split(".")[1]) for key in SIZE_KEYS}
    sizes["task.name"], sizes["model.backend"], sizes["model.kind"] = cfg.task.name, cfg.model.backend, cfg.model.kind
    sizes["task.tokenizer"] = cfg.task.tokenizer
    sizes["fused"] = cfg.train.device == "cuda" or cfg.train.device == "auto" and has_cuda()
    sizes["text_bytes"] = _text_bytes(cfg.task.source) if TRAITS[cfg.task.name].text else 0
    return sizes


def has_cuda() -> bool:
    """Whether an NVIDIA driver is loaded (without torch): where ``device: auto`` trains on a GPU, and sdpa's fused
    kernels keep no T x T matrix (on the CPU, measured with torch 2.13, they keep about as much as the manual one)."""
    return Path("/proc/driver/nvidia/version").exists()


def _text_bytes(source: str) -> int:
    """Bytes of a local source's .txt files (0 for python-docs and hf: datasets, whose size shows when loaded)."""
    if source == "python-docs" or source.startswith("hf:"):
        return 0
    path = Path(source).expanduser()
    files = [path] if path.is_file() else sorted(path.rglob("*.txt")) if path.is_dir() else []
    return sum(f.stat().st_size for f in files)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.0f} GiB" if n >= 10 * 2**30 else f"{n / 2**30:.1f} GiB"

