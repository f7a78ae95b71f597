"""What can be known about a task's data before anything is built: the checks ``ablate study`` and ``ablate train``
run before any store exists, and the builders run again. No torch here (the report and the CLI's checks use it).

- charlm, lm: ``task.source`` names text that exists and can be read (``ablate.tasks.sources``); for lm, the corpus
  itself is split and tokenised (``ablate.tasks.corpus``), so a bad column or vocabulary stops here too.
- recall, listops: the sizes that make a task impossible (or a generation that would never end), the longer test
  sets (``task.eval_lengths``) included where arithmetic tells (listops' are checked when the task is built).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ablate.core.config import TASKS, ConfigError, TaskConfig
from ablate.tasks.sources import check_source

IN_MEMORY_SPLIT_BYTES = 64 << 20  # evaluation rows (Arrow int32) up to this size become tensors; larger: per batch
MAX_LISTOPS_DEPTH = 100
MAX_LISTOPS_TOKENS = 10_000  # mean expression length above which generation takes hours (and almost none fit)


@dataclass(frozen=True)
class Traits:
    """What a task is, known before it is built: the one table the builders, the preflight and the trainer read."""

    builder: str
    """``module.function`` in ``ablate.tasks`` that builds it."""
    metric: str
    """Its own score beside the loss (``val/<metric>``, ``test/<metric>``): bpc, bpb or acc."""
    classifier: bool = False
    """A bidirectional classifier (``Task.num_classes`` set) rather than a causal language model."""
    text: bool = False
    """Its data is a text corpus (``task.source``) cut into windows, its tokens characters."""
    solves: bool = False
    """Its test at longer lengths says up to which multiple it is solved (``test/solved_x``)."""
    vocab: int | None = None
    """Its vocabulary size when fixed by the task (None: set by its data or its config, see ``vocab_guess``)."""
    vocab_from_config: bool = False
    """Its vocabulary is ``task.vocab_size`` tokens and a filler."""


TRAITS = {
    "charlm": Traits("charlm.build", "bpc", text=True),
    "recall": Traits("generated.build_recall", "acc", solves=True, vocab_from_config=True),
    "listops": Traits("generated.build_listops", "acc", classifier=True, vocab=16),
    "lm": Traits("lm.build", "bpb", text=True),
}
assert set(TRAITS) == set(TASKS), "config.TASKS names the tasks this table describes"
CHARLM_VOCAB = 256  # a guess before the text is read: the characters of most corpora


def vocab_guess(name: str, vocab_size: int, tokenizer: str = "char", tokenizer_vocab: int = 0) -> int:
    """The vocabulary task ``name``'s model will have, before the task is built (for the memory estimate)."""
    traits = TRAITS[name]
    if traits.vocab is not None:
        return traits.vocab
    if traits.vocab_from_config:
        return vocab_size + 1
    return CHARLM_VOCAB if name != "lm" or tokenizer == "char" else max(tokenizer_vocab, CHARLM_VOCAB)


def describe_data(cfg: TaskConfig) -> str | None:
    """One line on a corpus before any training: its documents, bytes, tokens and where its tokens are cached (the
    checks built them, so this costs nothing after ``check_task``); None for a task that is not a corpus of tokens."""
    if cfg.name != "lm":
        return None
    from ablate.tasks.corpus import check_corpus

    return check_corpus(cfg).summary()


def check_task(cfg: TaskConfig) -> None:
    """Every problem of ``cfg``'s data that shows without building it, as a ConfigError naming the key."""
    if TRAITS[cfg.name].text:
        check_source(cfg.source, cfg.text_column, cfg.name)
    if cfg.name == "lm":
        if cfg.tokenizer.endswith(".json") and not Path(cfg.tokenizer).expanduser().is_file():
            raise ConfigError("task.tokenizer", f"{cfg.tokenizer!r}: no such file")
        from ablate.tasks.corpus import check_corpus  # datasets and tokenizers: only for a corpus

        check_corpus(cfg)
    elif cfg.name == "recall":
        check_recall(cfg)
    elif cfg.name == "listops":
        check_listops(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Generated tasks


def check_recall(cfg: TaskConfig) -> None:
    pairs = cfg.num_pairs
    if 4 * pairs > cfg.seq_len:
        raise ConfigError(
            "task.num_pairs",
            f"{pairs} pairs need seq_len >= 4 * num_pairs = {4 * pairs} (each pair and its query take 2 positions), "
            f"got seq_len {cfg.seq_len}",
        )
    if cfg.vocab_size // 2 < pairs:
        raise ConfigError(
            "task.vocab_size",
            f"{cfg.vocab_size} is too small for {pairs} distinct keys and values; needs >= 2 * num_pairs = {2 * pairs}",
        )
    most = max(cfg.eval_lengths, default=1)
    if cfg.vocab_size // 2 < most * pairs:  # the longer test sets hold k x the pairs, each key distinct
        raise ConfigError(
            "task.eval_lengths",
            f"{most}x holds {most * pairs} pairs: vocab_size {cfg.vocab_size} gives {cfg.vocab_size // 2} distinct "
            f"keys; raise vocab_size to >= {2 * most * pairs} or drop {most}",
        )


def check_listops(cfg: TaskConfig) -> None:
    """Expressions that can be generated at all: their mean length grows as (max_args / 4) ** max_depth."""
    if cfg.max_depth > MAX_LISTOPS_DEPTH:
        raise ConfigError("task.max_depth", f"must be <= {MAX_LISTOPS_DEPTH}, got {cfg.max_depth}")
    mean = listops_mean_length(cfg.max_depth, cfg.max_args)
    if mean > MAX_LISTOPS_TOKENS:
        raise ConfigError(
            "task.max_depth",
            f"{cfg.max_depth} with max_args {cfg.max_args} makes expressions of {mean:.3g} tokens on average; "
            f"at most {MAX_LISTOPS_TOKENS:,} can be generated in reasonable time: lower max_depth or max_args",
        )


def listops_mean_length(max_depth: int, max_args: int, p_operator: float = 0.5) -> float:
    """Mean tokens of a random listops expression (``generated.listops_expression``): an operator and its closing
    bracket, then its arguments, each a digit or (below max_depth, with chance ``p_operator``) an expression."""
    args = (2 + max_args) / 2 if max_args >= 2 else 1.0
    length = 2 + args  # at max_depth every argument is a digit
    for _ in range(max_depth - 1):
        length = 2 + args * (1 + p_operator * (length - 1))
        if length > 1e300:
            return float("inf")
    return length
