"""The names shared by tracking, the study runner and the report: one place, so they cannot drift apart.

MLflow layout: one experiment per study (``ablate`` for single runs); in it one parent run per study and one
nested child run per trial. Params are the resolved config flattened with dots (``model.num_heads``) plus
``derived.*``. Metric names follow ``train/loss``, ``val/loss``, ``val/bpc``, ``val/acc``, ``perf/tokens_per_s``.
"""

import math

DEFAULT_EXPERIMENT = "ablate"

# Tags (MLflow) ---------------------------------------------------------------------------------------------------
TAG_STUDY = "ablate.study"  # study name, on the parent and every child run
TAG_ROLE = "ablate.role"  # "study" on the parent run, "trial" on a child run, "run" on a single `ablate train` run
TAG_TRIAL = "ablate.trial"  # Optuna trial number
TAG_KIND = "ablate.kind"  # "ablation" or "search": which design produced the data
TAG_PHASE = "ablate.phase"  # ablation: "tune" (nuisance exploration) or "seed" (re-run of a variant's best point)
TAG_VARIANT = "ablate.variant"  # "base" or "<param>=<value>", e.g. "model.num_heads=8"
TAG_FACTOR = "ablate.factor"  # the scientific parameter a variant changes ("" for base)
TAG_STATUS = "ablate.status"  # the trainer's status: completed, diverged, stopped (pruned), failed
TAG_REASON = "ablate.reason"  # why a run diverged, stopped or failed
TAG_FAMILY = "ablate.family"  # on a member study's parent run: the family it belongs to
TAG_SETUP_ID = "ablate.setup_id"  # on a study's parent run: the Optuna study's set-up id (ATTR_SETUP_ID)
TAG_SPEC_SHA256 = "ablate.spec_sha256"  # on a study's parent run: sha256 of the study file as written
TAG_GIT_COMMIT = "git.commit"
TAG_GIT_DIRTY = "git.dirty"
TAG_DEVICE = "ablate.device"
TAG_BACKEND = "ablate.backend"

# Optuna user attributes -------------------------------------------------------------------------------------------
ATTR_RUN_ID = "mlflow_run_id"  # on a trial: its MLflow child run
ATTR_PARENT_RUN_ID = "mlflow_parent_run_id"  # on a study
ATTR_SETUP_ID = "setup_id"  # on a study: a random id set when it is created, tagged on its parent run
ATTR_KIND = "kind"  # on a study: "ablation" or "search"
ATTR_SPEC = "spec"  # on a study: the study file's mapping, as loaded
ATTR_SOURCE = "source"  # on a study: its file's path as run (relative to the directory it ran from when inside it)
ATTR_REPORT_CLAIM = "report_claim"  # on a study: which finished trials a worker is writing the report of, and when
ATTR_FAMILY = "family"  # on a member of a family (a ladder, several budgets): the study file's name
ATTR_MEMBER = "member"  # on a member: its label in the family ("w128", "flops")
ATTR_FAMILY_SPEC = "family_spec"  # on a member: the family's study file, as loaded (passwords masked)
ATTR_PHASE = "phase"  # on a trial, as TAG_PHASE
ATTR_VARIANT = "variant"  # on a trial, as TAG_VARIANT
ATTR_FACTOR = "factor"  # on a trial, as TAG_FACTOR
ATTR_SEED = "seed"  # on a trial: train.seed
ATTR_POINT = "point"  # on a planned trial: tune: the Halton point's index; seed: train.seed (phase+variant+point = key)
ATTR_STATUS = "status"  # on a trial: the trainer's status (a diverged run is an Optuna FAIL with status "diverged")
ATTR_RETRY_OF = "retry_of"  # on a re-enqueued copy: the number of the attempt it repeats
ATTR_ATTEMPT = "attempt"  # on a planned trial: 1 for the first attempt at its key, then 2, 3, ...
ATTR_REASON = "reason"  # on a failed or interrupted trial: why (the exception, the signal, the lost heartbeat)
ATTR_WORKER = "worker"  # on a trial: host:pid of the worker that took it
ATTR_UNIFORM = "uniform_loss"  # on a finished trial: a uniform guess's score on validation, in the study's outcome
# units (what a diverged tune run counts as)
ATTR_OUTCOME = "outcome"  # on a seed trial: the verdict metric in the study's outcome units (test/loss or test/bpb; a
# diverged run: the uniform guess's score on test)

# Statuses: the trainer's status of a run, and how Optuna and MLflow record it. One table, following
# mlflow.optuna.MlflowStorage (COMPLETE -> FINISHED, PRUNED -> KILLED, FAIL -> FAILED). A diverged run is an
# Optuna FAIL (told from a failed one by ATTR_STATUS) and a FAILED MLflow run.
COMPLETED, STOPPED, DIVERGED, FAILED, INTERRUPTED = "completed", "stopped", "diverged", "failed", "interrupted"
STATUSES = {  # trainer status -> (Optuna state, MLflow run status)
    COMPLETED: ("COMPLETE", "FINISHED"),
    STOPPED: ("PRUNED", "KILLED"),
    DIVERGED: ("FAIL", "FAILED"),
    FAILED: ("FAIL", "FAILED"),
    INTERRUPTED: ("FAIL", "KILLED"),  # Ctrl-C or SIGTERM: a stop, not a result; the trial goes back in the queue
}
OUTCOMES = (COMPLETED, DIVERGED)  # the statuses that are results: a diverged run counts, at the uniform-guess loss
MLFLOW_STATUS = {status: run for status, (_, run) in STATUSES.items()}
STATUS_OF_STATE = {"COMPLETE": COMPLETED, "PRUNED": STOPPED, "FAIL": FAILED, "RUNNING": "running",
                   "WAITING": "waiting"}  # an Optuna state's status when a trial carries no ATTR_STATUS
MLFLOW_OF_STATE = {state: MLFLOW_STATUS[status] for state, status in STATUS_OF_STATE.items() if status in MLFLOW_STATUS}


def status_of(recorded: str | None, state: str) -> str:
    """A trial's status, for the plan and the report alike: the trainer's as recorded (ATTR_STATUS, else the run's
    TAG_STATUS) or, without one, what its Optuna state (a name, ``"COMPLETE"``) stands for. A pruned trial is
    stopped whatever its run said last: the pruner stopped it after its last log."""
    if state == "PRUNED":
        return STOPPED
    return recorded or STATUS_OF_STATE.get(state, "")


def trial_run_name(number: int, phase: str, variant: str) -> str:
    """A trial's MLflow run name, the same whether its worker created the run or a recovery did."""
    return f"{number}-{phase}-{variant}"


def trial_tags(study: str, kind: str, number: int, phase: str, variant: str, factor: str) -> dict[str, str]:
    """The tags that identify a trial's MLflow run (besides ``mlflow.parentRunId``)."""
    return {TAG_STUDY: study, TAG_ROLE: "trial", TAG_TRIAL: str(number), TAG_KIND: kind, TAG_PHASE: phase,
            TAG_VARIANT: variant, TAG_FACTOR: factor}


# Artifacts -------------------------------------------------------------------------------------------------------
CONFIG_ARTIFACT = "config.yaml"  # on every run: the resolved config
MAPS_ARTIFACT = "attention/attention_maps.png"  # on every run: attention of one validation sample
CHECKPOINT_DIR = "checkpoint"  # holds model.pt when train.checkpoint
STUDY_ARTIFACT = "study.yaml"  # on a study's parent run: the study file as written (+ ".sha256")
BASE_CONFIG_ARTIFACT = "base_config.yaml"  # on a study's parent run
REPORT_DIR = "report"  # on a study's parent run: index.html, results.csv, summary.md, verdicts.json
TAG_NOTE = "mlflow.note.content"  # on a study's parent run: its answer, as the run's description in the MLflow UI
TAG_ANSWER_PREFIX = "answer."  # on a study's parent run: "answer.<factor>" = "<choice> (<verdict>)"

# Metrics ----------------------------------------------------------------------------------------------------------
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TOKENS_PER_S = "perf/tokens_per_s"
VAL_LOSS = "val/loss"  # at intermediate evaluations: the fixed validation sample; final: the full split
TEST_LOSS = "test/loss"  # the full test split, once, at the end of a completed run
BEST_VAL_LOSS = "best/val/loss"
WALL_S = "perf/wall_s"  # the whole run: set-up, training, evaluations
TRAIN_S = "perf/train_s"  # training steps only (what a wall budget counts)
PEAK_MEM_MB = "perf/peak_mem_mb"
PARAMS = "cost/params"
FLOPS_PER_TOKEN = "cost/flops_per_token"
FLOPS_TOTAL = "cost/flops_total"
TOKENS = "cost/tokens"  # tokens trained on (batch_size * seq_len per step)
STEPS = "cost/steps"  # optimizer steps done


def val_metric(task_metric: str) -> str:
    """``"bpc"`` -> ``"val/bpc"``; the task's own metric."""
    return f"val/{task_metric}"


def test_metric(task_metric: str) -> str:
    """``"bpc"`` -> ``"test/bpc"``; the task's own metric on the test split."""
    return f"test/{task_metric}"


# The study's outcome (``outcome:`` in a study file): the metric its tuning and verdicts are on. Per-token loss
# (nats) compares only arms that share a tokenizer; bits per byte compare any.
OUTCOME_UNITS = {"loss": "nats", "bpb": "bits per byte"}


def outcome_label(outcome: str, split: str = "test", prose: bool = False) -> str:
    """The outcome on ``split`` (test or val) as pages, tables, plots and the terminal name it: loss as they always
    have (``test/loss``; in prose ``test loss``, ``validation loss``), any other with its unit, ``test/bpb (bits per
    byte)``: a number in bits per byte must never pass for a loss."""
    if outcome == "loss":
        return f"{'validation' if split == 'val' else split} loss" if prose else f"{split}/loss"
    return f"{split}/{outcome} ({OUTCOME_UNITS[outcome]})"


def in_outcome_units(loss: float, outcome: str, tokens_per_byte: float) -> float:
    """A loss in nats per token in the outcome's units: itself, or bits per byte (bits per token times the split's
    tokens per byte). The one conversion: the trainer's bpb metric and the uniform-guess ceilings both use it."""
    return loss / math.log(2) * tokens_per_byte if outcome == "bpb" else loss


def entropy_metric(layer: int, head: int) -> str:
    return f"attn/entropy/l{layer}h{head}"


def max_logit_metric(layer: int) -> str:
    return f"attn/max_logit/l{layer}"


SOLVED_ACC = 0.9  # recall: the test accuracy that counts as solving it (SOLVED_X)
SOLVED_X = "test/solved_x"
"""recall: the largest multiple of the training length (1, 2, 4, ...) up to which test accuracy stays at or above
``SOLVED_ACC``; 0 when not even at 1x. Logged only beside the longer-length metrics (``at_length``)."""


def at_length(metric: str, times: int) -> str:
    """``("test/loss", 2)`` -> ``"test/loss_2x"``: a test metric scored again at ``times`` x the training length
    (``task.eval_lengths``). MLflow allows no '@' in metric names."""
    return f"{metric}_{times}x"
