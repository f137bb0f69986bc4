"""The training loop every task runs.

Host batches become global arrays, one compiled step runs with donated state, metrics are read
back only at log steps, checkpoints are written every N steps, hooks (reconstructions,
evaluation) run every N steps, SIGTERM / Ctrl-C saves and stops, and a non-finite step stops the
run with a clear error before any checkpoint of bad state is written. The time spent getting
each batch (the host pipeline and the copy to the devices) is reported at log steps as the share
of the wall time the loop waited for input (`RunLogger.log_train`), the slowest process's when
there are several (`slowest_input`). `profile` traces a few steps
with jax.profiler (host input, dispatch and device ops) for TensorBoard or Perfetto.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np

from mae_jax.core import preemption
from mae_jax.core import sharding as sharding_lib
from mae_jax.core.checkpointing import Checkpointer
from mae_jax.core.errors import BadDataError
from mae_jax.core.preemption import PreemptionGuard
from mae_jax.core.processes import failing_together
from mae_jax.core.run_logging import RunLogger
from mae_jax.core.state import TrainState


def slowest_input(seconds: float, broken: bool = False,
                  gather: Callable | None = None) -> tuple[float, int | None, bool]:
    """(the longest time any process waited for its batches, that process, whether any
    process's input is broken as a whole) from this process's `seconds` and `broken`;
    (seconds, None, broken) with one process. The step is one collective program, so the
    process that waits longest for its input holds the others back, and one process stopping
    for broken data alone would leave the others waiting in the step: every process calls
    this at the same steps (one tiny all-gather) and all stop together. `gather`:
    multihost_utils.process_allgather (tests pass their own)."""
    if gather is None:
        if jax.process_count() == 1:
            return seconds, None, broken
        from jax.experimental import multihost_utils

        gather = multihost_utils.process_allgather
    mine = np.array([seconds, float(broken)], np.float32)
    gathered = np.asarray(gather(mine), dtype=np.float64).reshape(-1, 2)
    slowest = int(np.argmax(gathered[:, 0]))
    return float(gathered[slowest, 0]), slowest, bool(gathered[:, 1].any())


class NonFiniteLossError(FloatingPointError):
    """The loss, gradients or parameters stopped being finite; no bad state was saved."""


@dataclasses.dataclass
class Hook:
    """Runs `fn(step, state)` every `every_steps` steps and after the last one (0: never).

    missed(step): whether its run at `step` did not finish (e.g. an evaluation that failed
    after that step's checkpoint was written); a run resumed from `step` then runs it first."""

    every_steps: int
    fn: Callable[[int, TrainState], None]
    at_end: bool = True
    missed: Callable[[int], bool] | None = None

    def due(self, step: int, total_steps: int) -> bool:
        if self.every_steps <= 0:
            return False
        return step % self.every_steps == 0 or (self.at_end and step == total_steps)


class StepProfiler:
    """Traces steps first + 1 to last (`profile=(first, last)`) into `directory` with
    jax.profiler; a run (re)started inside that range traces the rest of it, one past it
    none. Several processes write one sub-folder each. A profiler that fails (no CUPTI, a
    full disk) warns and costs the trace, never the run."""

    def __init__(self, steps: tuple[int, int] | None, directory: str):
        self.steps, self.tracing = steps, False
        if jax.process_count() > 1:
            directory = os.path.join(directory, f"process_{jax.process_index()}")
        self.directory = directory

    def before_step(self, step: int, state) -> None:
        """`step`: the steps done; starts the trace when the next one is in range."""
        if self.steps and not self.tracing and self.steps[0] <= step < self.steps[1]:
            jax.block_until_ready(state)  # the steps already queued stay out of the trace
            try:
                jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            except Exception as error:  # noqa: BLE001
                self._failed("start", error)
                return
            self.tracing, self.first = True, step + 1

    def after_step(self, step: int, state) -> None:
        if self.tracing and step >= self.steps[1]:
            jax.block_until_ready(state)  # the device's work of the last step inside the trace
            self.stop(step)

    def stop(self, step: int) -> None:
        if not self.tracing:
            return
        self.tracing = False
        try:
            jax.profiler.stop_trace()
        except Exception as error:  # noqa: BLE001  (never masks the error that ended a run)
            self._failed("stop", error)
            return
        self.steps = None
        if jax.process_index() == 0:
            print(f"Profile of steps {self.first}-{step} written to {self.directory} (TensorBoard "
                  "with tensorboard-plugin-profile, or its perfetto_trace.json.gz in "
                  "ui.perfetto.dev).", flush=True)

    def _failed(self, what: str, error: Exception) -> None:
        self.steps = None  # no second try
        warnings.warn(f"config.profile_steps: the profiler failed to {what} ({type(error).__name__}"
                      f": {error}); the run goes on without a trace.", stacklevel=3)


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    step: int  # the last step done
    metrics: dict[str, float]  # the last logged training metrics ...
    preempted: bool  # stopped early on SIGTERM / Ctrl-C (a checkpoint was saved)
    metrics_step: int | None = None  # ... of this step (before `step` when stopped early)


def run_loop(
    *,
    state: TrainState,
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]],
    batches: Iterator[Mapping[str, np.ndarray]],
    mesh,
    start_step: int,
    total_steps: int,
    checkpointer: Checkpointer,
    logger: RunLogger,
    metadata_fn: Callable[[int], dict] = lambda step: {},
    hooks: tuple[Hook, ...] = (),
    profile: tuple[int, int] | None = None,
    profile_dir: str = "profile",
) -> LoopResult:
    """Trains from `start_step` to `total_steps` (or until a stop signal).

    start_step: the step of the checkpoint the state was restored from (0: a new state).
    profile: (first, last): steps first + 1 to last traced into `profile_dir` (`StepProfiler`).
    """
    profiler = StepProfiler(profile, profile_dir)
    if profile and profile[0] >= total_steps:
        warnings.warn(f"config.profile_steps starts at step {profile[0]}, at or past the run's "
                      f"{total_steps} steps: nothing will be traced.", stacklevel=2)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    step = start_step
    last_saved = start_step if start_step > 0 else None  # never cite a checkpoint not written
    last_metrics: dict[str, float] = {}
    metrics_step = None
    preempted = False
    input_seconds = 0.0  # waiting for batches since the last log step
    preemption.record_stop(None)
    agreement = preemption.StopAgreement(mesh) if jax.process_count() > 1 else None

    def check_finite(step: int) -> None:
        # Read only at log, hook and checkpoint steps: no per-step host sync.
        bad = int(jax.device_get(state.nonfinite_steps))
        if bad:
            if last_saved is None:
                kept = "no checkpoint was saved, so a re-run starts from scratch"
            else:
                kept = (
                    f"the last good checkpoint (step {last_saved}, which passed this check) is "
                    "intact and a re-run resumes from it (if it diverges again soon after, its "
                    f"parameters may already be too large: move {checkpointer.directory}/"
                    f"{last_saved} aside to fall back to an older one)"
                )
            raise NonFiniteLossError(
                f"The loss, gradients or parameters became NaN/inf (first seen by step {step}; "
                f"{bad} bad step(s)). Stopped without saving; {kept}. Lower the learning rate "
                "(--config_change_ok to change it on resume), enable clip_grad_norm, or use "
                "float32."
            )

    with PreemptionGuard() as guard:
        try:
            for hook in hooks if start_step > 0 else ():  # a restored state is finite
                if hook.missed and hook.due(step, total_steps) and hook.missed(step):
                    hook.fn(step, state)
            while step < total_steps:
                profiler.before_step(step, state)
                waited_from = time.perf_counter()
                batch = sharding_lib.global_batch_from_host(next(batches), batch_sharding)
                input_seconds += time.perf_counter() - waited_from
                state, metrics = train_step(state, batch)
                step += 1
                profiler.after_step(step, state)
                log_now = logger.should_log(step)
                if log_now:
                    check_finite(step)
                    last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    metrics_step = step
                    broken = getattr(batches, "broken", None)  # decodable.Batches
                    waited, waiting, broken_anywhere = slowest_input(input_seconds,
                                                                     broken is not None)
                    if broken_anywhere:  # on every process at this step
                        raise BadDataError(broken or "Another process of this run found its "
                                           "training data broken as a whole (its log names "
                                           "files): check the data.")
                    with failing_together(f"writing the log of step {step}"):  # process 0
                        checkpointer.check()  # a failed background write stops the run now
                        logger.log_train(step, last_metrics, input_seconds=waited,
                                         input_process=waiting)
                    input_seconds = 0.0
                save = step % checkpointer.save_every_steps == 0 or step == total_steps
                due = [hook for hook in hooks if hook.due(step, total_steps)]
                if (due or save) and not log_now:
                    check_finite(step)  # no checkpoint, pictures or evaluation of a bad state
                if save:  # before the hooks: a failing evaluation cannot cost this checkpoint
                    checkpointer.save(step, state, metadata=metadata_fn(step), force=True)
                    last_saved = step
                # A stop asked for before this step's hooks comes first: an evaluation can
                # outlast a pre-emption's grace period, and a resume runs the evaluations it
                # skipped (Hook.missed). Hook steps are the same on every process.
                stop_first = bool(due) and guard.requested_anywhere()
                for hook in () if stop_first else due:  # they overlap the checkpoint's write
                    hook.fn(step, state)
                # Several processes must agree on the stop step: they compare flags at log
                # steps and, without waiting for the devices, every few steps (StopAgreement).
                agreed = (guard.requested if agreement is None
                          else agreement.check(step, guard.requested))
                stop = stop_first or agreed or (log_now and guard.requested_anywhere())
                if stop and last_saved != step:
                    check_finite(step)
                    checkpointer.save(step, state, metadata=metadata_fn(step), force=True)
                    last_saved = step
                if stop:
                    preempted = True
                    preemption.record_stop(step)
                    print(f"Stopped at step {step} on request; re-run the same command to resume.")
                    break
        finally:
            profiler.stop(step)  # a run that ends or stops inside the range
        checkpointer.wait()  # still guarded: a stop signal now cannot abandon the last write
        if not preempted and guard.requested_anywhere():  # it came after the last check
            preempted = True
            preemption.record_stop(step)
            print(f"Stopped after step {step} on request (its checkpoint is saved); re-run the "
                  "same command to finish (the export, the loss curve).", flush=True)
    return LoopResult(state=state, step=step, metrics=last_metrics, preempted=preempted,
                      metrics_step=metrics_step)
