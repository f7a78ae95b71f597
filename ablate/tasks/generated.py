"""Generated tasks whose answers lie far away: ``recall`` (MQAR) and ``listops`` (nested expressions).

Both are drawn from the seed alone, and every example is unique across train, validation and test, so no split
leaks into another. Generation runs once per (config, seed); `datasets` caches the rows.

Each also builds its test split again at k x seq_len (``task.eval_lengths``, ``Task.longer``), from its own seeded
stream, ``num_test // k`` examples (at least 1), cached the same way:
- recall: k x the length and k x the pairs (so "solved at 4x" means 4x the bindings held over 4x the distance;
  ``task.vocab_size`` must give k x num_pairs distinct keys).
- listops: expressions longer than (k / 2) x seq_len and at most k x seq_len (longer than any seen before), drawn at
  the smallest depth above ``max_depth`` that yields them most often, with the same ``max_args``.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterator

import datasets
import numpy as np

from ablate.core.config import ConfigError, TaskConfig
from ablate.tasks.base import IGNORE, SPLITS, Task, build_rows, build_splits, digest_of, row_features
from ablate.tasks.checks import MAX_LISTOPS_DEPTH, TRAITS, check_listops, check_recall

# ---------------------------------------------------------------------------------------------------------------
# recall: multi-query associative recall (Arora et al. 2023, "Zoology")
#
# An example of seq_len + 1 tokens: the pairs k1 v1 k2 v2 ... first, then filler 0s in which every key comes back
# once, at a random position, followed by its value. inputs = example[:-1], targets = example[1:] kept only where
# the input is a queried key (-100 elsewhere): the model must fetch the value bound to that key far earlier.
# Token ids: 0 filler, keys 1..K, values K+1..vocab_size, with K = vocab_size // 2.

FILLER = 0


def build_recall(cfg: TaskConfig, seed: int) -> Task:
    check_recall(cfg)
    pairs, n_keys = cfg.num_pairs, cfg.vocab_size // 2
    n_values = cfg.vocab_size - n_keys
    spec = {"task": "recall", "seed": seed, **_fields(cfg, "seq_len", "num_pairs", "vocab_size")}
    digest = digest_of(spec)
    data = build_splits(
        "recall", digest, _recall_rows, {"cfg": cfg, "seed": seed}, _sizes(cfg),
        row_features(cfg.seq_len, classification=False, padded=False),
    )  # fmt: skip
    return Task(
        name="recall",
        data=data,
        vocab_size=cfg.vocab_size + 1,
        seq_len=cfg.seq_len,
        num_classes=None,
        metric=TRAITS["recall"].metric,
        digest=digest,
        vocab=("_", *(f"k{i}" for i in range(1, n_keys + 1)), *(f"v{i}" for i in range(1, n_values + 1))),
        description=f"recall (MQAR): {pairs} pairs in {cfg.seq_len} tokens, {cfg.vocab_size} key/value tokens",
        longer=functools.partial(_recall_longer, cfg, seed),
    )


def _recall_longer(cfg: TaskConfig, seed: int, times: int) -> datasets.Dataset:
    spec = {"task": "recall", "seed": seed, "times": times, **_fields(cfg, "seq_len", "num_pairs", "vocab_size")}
    return build_rows("recall", digest_of(spec), _recall_rows, {"cfg": cfg, "seed": seed, "times": times},
                      row_features(times * cfg.seq_len, classification=False, padded=False))  # fmt: skip


def recall_example(
    rng: np.random.Generator, seq_len: int, pairs: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One example of ``seq_len + 1`` tokens (see the layout above) and the positions of its queried keys."""
    n_keys = vocab_size // 2
    keys = rng.choice(n_keys, pairs, replace=False) + 1
    values = rng.choice(vocab_size - n_keys, pairs, replace=False) + 1 + n_keys
    seq = np.full(seq_len + 1, FILLER, dtype=np.int32)
    seq[0 : 2 * pairs : 2], seq[1 : 2 * pairs : 2] = keys, values
    slots = (seq_len + 1 - 2 * pairs) // 2  # two-token query slots after the pairs
    pos = 2 * pairs + 2 * np.sort(rng.choice(slots, pairs, replace=False))
    order = rng.permutation(pairs)
    seq[pos], seq[pos + 1] = keys[order], values[order]
    return seq, pos


def recall_targets(inputs: np.ndarray, pairs: int, vocab_size: int) -> np.ndarray:
    """The targets of ``inputs`` (..., T) recomputed from the inputs alone: a key after the pairs -> its value."""
    n_keys = vocab_size // 2
    targets = np.full(inputs.shape, IGNORE, dtype=np.int64)
    for row, out in zip(inputs.reshape(-1, inputs.shape[-1]), targets.reshape(-1, inputs.shape[-1]), strict=True):
        bound = dict(zip(row[0 : 2 * pairs : 2].tolist(), row[1 : 2 * pairs : 2].tolist(), strict=True))
        for t in range(2 * pairs, len(row)):
            if 1 <= row[t] <= n_keys:
                out[t] = bound[int(row[t])]
    return targets


def _recall_rows(cfg: TaskConfig, seed: int, times: int = 1) -> Iterator[dict]:
    """The three splits; ``times`` k > 1: the longer test set alone (k x seq_len, k x num_pairs)."""
    rng = np.random.default_rng([seed, 1] if times == 1 else [seed, 1, times])
    seq_len, pairs = times * cfg.seq_len, times * cfg.num_pairs

    def make() -> tuple[bytes, dict]:
        seq, pos = recall_example(rng, seq_len, pairs, cfg.vocab_size)
        targets = np.full(seq_len, IGNORE, dtype=np.int32)
        targets[pos] = seq[pos + 1]  # the value, predicted where its key comes back
        return seq.tobytes(), {"inputs": seq[:-1], "targets": targets}

    yield from _unique(make, sum(_sizes(cfg).values()) if times == 1 else longer_size(cfg, times))


# ---------------------------------------------------------------------------------------------------------------
# listops: nested expressions such as [MAX 3 [MIN 7 2 ] [SM 4 9 ] ] -> 3, right-padded with 0 to seq_len.
# MED is the lower median, SM the sum modulo 10. The root always has an operator among its arguments (when
# max_depth >= 2), so the answer depends on tokens far apart. Classification into the 10 digits.

LISTOPS_VOCAB = ("<pad>", *"0123456789", "[MAX", "[MIN", "[MED", "[SM", "]")
DIGIT0, OP0, CLOSE = 1, 11, 15
OPERATORS: tuple[Callable[[list[int]], int], ...] = (
    max,
    min,
    lambda args: sorted(args)[(len(args) - 1) // 2],
    lambda args: sum(args) % 10,
)
P_OPERATOR = 0.5  # chance that an argument below max_depth is itself an expression (as in checks.listops_mean_length)


def build_listops(cfg: TaskConfig, seed: int) -> Task:
    check_listops(cfg)
    _check_listops_fits(cfg)
    for times in cfg.eval_lengths:  # before training: a longer set that cannot be drawn fails now, not at the end
        listops_longer_depth(cfg, times)
    spec = {"task": "listops", "seed": seed, **_fields(cfg, "seq_len", "max_depth", "max_args")}
    digest = digest_of(spec)
    data = build_splits(
        "listops", digest, _listops_rows, {"cfg": cfg, "seed": seed}, _sizes(cfg),
        row_features(cfg.seq_len, classification=True, padded=True),
    )  # fmt: skip
    return Task(
        name="listops",
        data=data,
        vocab_size=len(LISTOPS_VOCAB),
        seq_len=cfg.seq_len,
        num_classes=10,
        metric=TRAITS["listops"].metric,
        digest=digest,
        vocab=LISTOPS_VOCAB,
        description=f"listops: depth <= {cfg.max_depth}, <= {cfg.max_args} arguments, padded to {cfg.seq_len}",
        longer=functools.partial(_listops_longer, cfg, seed),
    )


def _listops_longer(cfg: TaskConfig, seed: int, times: int) -> datasets.Dataset:
    spec = {"task": "listops", "seed": seed, "times": times, **_fields(cfg, "seq_len", "max_depth", "max_args")}
    return build_rows("listops", digest_of(spec), _listops_rows, {"cfg": cfg, "seed": seed, "times": times},
                      row_features(times * cfg.seq_len, classification=True, padded=True))  # fmt: skip


def longer_window(cfg: TaskConfig, times: int) -> tuple[int, int]:
    """listops at ``times`` x seq_len: expression lengths in (lo, hi], longer than any of the half-as-long set."""
    return times * cfg.seq_len // 2, times * cfg.seq_len


@functools.lru_cache(maxsize=64)
def listops_longer_depth(cfg: TaskConfig, times: int) -> tuple[int, float]:
    """The max_depth at which expressions fall in ``longer_window`` most often (200 seeded draws per depth, from
    ``cfg.max_depth`` up until most draws are too long) and that share; a ConfigError when under 5% ever do."""
    lo, hi = longer_window(cfg, times)
    best = (cfg.max_depth, 0.0)
    for depth in range(cfg.max_depth, MAX_LISTOPS_DEPTH + 1):
        rnd = random.Random(f"listops-depth-{depth}")
        lengths = sorted(_listops_length(rnd, depth, cfg.max_args, hi) for _ in range(200))
        share = sum(lo < n <= hi for n in lengths) / len(lengths)
        best = max(best, (depth, share), key=lambda pair: pair[1])
        if lengths[len(lengths) // 2] > hi:
            break
    if best[1] < 0.05:
        raise ConfigError("task.eval_lengths", f"{times}x: listops with max_args {cfg.max_args} rarely makes "
                                               f"expressions of {lo + 1} to {hi} tokens at any depth; drop {times} "
                                               "or raise max_args")  # fmt: skip
    return best


def _listops_length(rnd: random.Random, max_depth: int, max_args: int, cap: int) -> int:
    """The length of one random expression, or ``cap + 1`` once it is longer than ``cap`` (deep draws explode)."""
    n = 0
    stack = [1]  # depths of the expressions still to draw; an expression: operator, arguments, bracket
    while stack:
        depth = stack.pop()
        n_args = rnd.randint(2, max_args) if max_args >= 2 else 1
        forced = rnd.randrange(n_args) if depth == 1 and max_depth >= 2 else -1
        n += 2
        for i in range(n_args):
            if depth < max_depth and (i == forced or rnd.random() < P_OPERATOR):
                stack.append(depth + 1)
            else:
                n += 1
        if n > cap:
            return cap + 1
    return n


def listops_expression(rnd: random.Random, max_depth: int, max_args: int, depth: int = 1) -> tuple[list[int], int]:
    """Token ids of one random expression and its value."""
    op = rnd.randrange(len(OPERATORS))
    n_args = rnd.randint(2, max_args) if max_args >= 2 else 1
    forced = rnd.randrange(n_args) if depth == 1 and max_depth >= 2 else -1
    tokens, args = [OP0 + op], []
    for i in range(n_args):
        if depth < max_depth and (i == forced or rnd.random() < P_OPERATOR):
            sub, value = listops_expression(rnd, max_depth, max_args, depth + 1)
            tokens += sub
        else:
            value = rnd.randrange(10)
            tokens.append(DIGIT0 + value)
        args.append(value)
    return [*tokens, CLOSE], OPERATORS[op](args)


def listops_value(tokens: list[int]) -> int:
    """Evaluate token ids (padding ignored): the reference the generator's labels are checked against."""
    stack: list[list[int]] = []
    for tok in tokens:
        if OP0 <= tok < CLOSE:
            stack.append([tok - OP0])
        elif DIGIT0 <= tok < OP0:
            stack[-1].append(tok - DIGIT0)
        elif tok == CLOSE:
            op, *args = stack.pop()
            if not stack:
                return OPERATORS[op](args)
            stack[-1].append(OPERATORS[op](args))
    raise ValueError("unbalanced expression")


def _check_listops_fits(cfg: TaskConfig) -> None:
    """Generation rejects expressions longer than seq_len: refuse up front when almost none would fit."""
    rnd = random.Random(0)
    lengths = [len(listops_expression(rnd, cfg.max_depth, cfg.max_args)[0]) for _ in range(200)]
    fits = sum(n <= cfg.seq_len for n in lengths)
    if fits < 20:
        raise ConfigError(
            "task.seq_len",
            f"{cfg.seq_len} is too short for listops with max_depth {cfg.max_depth} and max_args {cfg.max_args}: "
            f"{fits} of 200 sampled expressions fit (lengths {min(lengths)} to {max(lengths)})",
        )


def _listops_rows(cfg: TaskConfig, seed: int, times: int = 1) -> Iterator[dict]:
    """The three splits; ``times`` k > 1: the longer test set alone (``longer_window``, padded to k x seq_len)."""
    if times == 1:
        rnd = random.Random(f"listops-{seed}")  # str seeds are hashed the same way in every process
        depth, (lo, hi), total, patience = cfg.max_depth, (0, cfg.seq_len), sum(_sizes(cfg).values()), 10
    else:
        rnd = random.Random(f"listops-{seed}-{times}x")
        (depth, share), (lo, hi) = listops_longer_depth(cfg, times), longer_window(cfg, times)
        total, patience = longer_size(cfg, times), math.ceil(10 / share)

    def make() -> tuple[bytes, dict] | None:
        tokens, label = listops_expression(rnd, depth, cfg.max_args)
        if not lo < len(tokens) <= hi:
            return None
        inputs = np.zeros(hi, dtype=np.int32)
        inputs[: len(tokens)] = tokens
        return inputs.tobytes(), {"inputs": inputs, "targets": label, "length": len(tokens)}

    yield from _unique(make, total, patience)


# ---------------------------------------------------------------------------------------------------------------


def _unique(make: Callable[[], tuple[bytes, dict] | None], total: int, patience: int = 10) -> Iterator[dict]:
    """``total`` distinct rows from ``make`` (None = rejected draw), or a ConfigError when the space runs out
    (after ``patience`` misses per row asked for, plus 1000)."""
    seen: set[bytes] = set()
    misses = 0
    while len(seen) < total:
        made = make()
        if made is None or made[0] in seen:
            misses += 1
            if misses > patience * total + 1000:
                raise ConfigError(
                    "task.num_train",
                    f"could only draw {len(seen)} distinct examples of the {total} asked for (train + val + test); "
                    "ask for fewer or make the task larger (seq_len, vocab_size, max_depth, max_args)",
                )
            continue
        seen.add(made[0])
        yield made[1]


def longer_size(cfg: TaskConfig, times: int) -> int:
    """Examples in the test set at ``times`` x seq_len: as many tokens as the test split, at least one example."""
    return max(1, cfg.num_test // times)


def _sizes(cfg: TaskConfig) -> dict[str, int]:
    return dict(zip(SPLITS, (cfg.num_train, cfg.num_val, cfg.num_test), strict=True))


def _fields(cfg: TaskConfig, *names: str) -> dict:
    return {name: getattr(cfg, name) for name in ("num_train", "num_val", "num_test", *names)}
