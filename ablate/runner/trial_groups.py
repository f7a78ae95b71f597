"""The study runner's side of trials trained together (``ablate.training.together``): how many a worker takes at once
(``together_size``), which waiting trials go together (``take_alike``: one architecture, differing in learning rate
and seed only), and each told to Optuna as ``study.optimize`` tells a single trial (``tell_together``)."""

from __future__ import annotations

import contextlib
import math

import optuna
from optuna.trial import FrozenTrial, TrialState

from ablate.core import devices, optuna_private
from ablate.core.config import ConfigError, RunConfig
from ablate.design.spec import StudySpec
from ablate.runner.objective import Objective

AUTO_TOGETHER = 8  # ``together: auto`` on CUDA: at most this many trials trained as one model


def together_size(spec: StudySpec, gpus: list[int], run_bytes: int, workers: int) -> int:
    """Trials of one architecture a worker trains as one model (``spec.together``): a number as given; ``auto``: 1
    where it does not pay (a CPU: ``together.pays``), else up to AUTO_TOGETHER, as many as fit in the memory share
    (``devices.GPU_MEMORY_SHARE``) of each of ``workers`` on the smallest GPU, by the preflight's estimate of a run."""
    from ablate.training.together import pays

    wall = spec.compute is not None and spec.compute.match == "wall"
    if spec.together != devices.AUTO:
        if wall and spec.together > 1:
            raise ConfigError("together", "a wall budget's seconds would be shared by the trials trained together; "
                              "set together: 1 or auto", spec.source)  # fmt: skip
        return int(spec.together)
    if wall or not pays("cuda" if gpus else "cpu"):
        return 1
    fit = int(devices.GPU_MEMORY_SHARE * min(gpus)) // max(1, run_bytes * math.ceil(workers / len(gpus)))
    return max(1, min(AUTO_TOGETHER, fit))


def take_alike(study: optuna.Study, objective: Objective, size: int) -> list[optuna.Trial]:
    """The first waiting trial (the one ``study.ask`` would take) and up to ``size - 1`` later waiting trials that
    can train together with it (``together.check_alike``: they differ in learning rate and seed only), each now
    RUNNING and ours; empty when there is no second one (``study.optimize`` takes the first alone)."""
    from ablate.training.together import check_alike

    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if len(waiting) < 2:
        return []

    def config(t: FrozenTrial) -> RunConfig:  # the planned values, as prepared when it runs
        return objective.config(optuna_private.planned_params(t), t.user_attrs)

    group = waiting[:1]
    with contextlib.suppress(ValueError):  # ConfigError included: the trial's own run will say it
        head = config(group[0])
        for t in waiting[1:]:
            if len(group) == size:
                break
            with contextlib.suppress(ValueError):
                check_alike([head, config(t)])
                group.append(t)
    if len(group) < 2:
        return []
    # as study.ask pops a waiting trial (under the plan lock, so no other worker takes it first)
    return [trial for trial in (optuna_private.take(study, t) for t in group) if trial is not None]


def tell_together(study: optuna.Study, objective: Objective, trials: list[optuna.Trial]) -> None:
    """Train ``trials`` as one model, with a heartbeat for each, then tell each as ``study.optimize`` would: its
    value (COMPLETE), PRUNED, or FAIL (diverged, an error, an interrupt). An interrupt is re-raised after."""
    with contextlib.ExitStack() as heartbeats:
        for trial in trials:
            heartbeats.enter_context(optuna_private.heartbeat(study, trial))
        outcomes, error = objective.group(trials)
    for trial, outcome in zip(trials, outcomes, strict=True):
        state, value = None, None
        try:
            value = outcome()
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except (Exception, KeyboardInterrupt):
            state = TrialState.FAIL
        study.tell(trial, value, state=state, skip_if_finished=True)
    if error is not None and not isinstance(error, Exception):
        raise error
