"""What every task's run shares: the workdir (locked, its config recorded), the mesh, the state
(initialised or restored from the newest intact checkpoint), checkpoints, logging and the
loop. A task library plugs in its model, loss, data and hooks:

    with Run(config, workdir, devices=devices) as run:
        graphdef, state, start_step = run.init_state(spec, tx)
        logger = run.start_logging(total_steps=..., start_step=start_step)
        result = run.train(state, step_fn, batches, start_step=..., total_steps=..., hooks=...)
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from mae_jax.core import config as core_config
from mae_jax.core import loop, run_record
from mae_jax.core import sharding as sharding_lib
from mae_jax.core.checkpointing import Checkpointer
from mae_jax.core.errors import BadDataError
from mae_jax.core.processes import failing_together, from_process_0, same_on_every_process
from mae_jax.core.run_logging import RUN_OUTPUTS, RunLogger, image_path, read_metrics
from mae_jax.core.state import TrainState, init_or_restore, tree_size
from mae_jax.core.step import compile_step
from mae_jax.core.workdir import check_shared, ensure_workdir, lock_workdir, set_aside
from mae_jax.models.factory import ModelSpec
from mae_jax.models.layers import make_rngs


def with_step(results: dict, step: int) -> dict:
    """A task's last evaluation with `step`, the step it trained to; the evaluation's own step
    as `evaluated_step` when it differs (a run stopped early, after an earlier evaluation)."""
    evaluated = results.get("step", step)
    return results | {"step": step} | ({"evaluated_step": evaluated} if evaluated != step
                                       else {})


def config_hash(config: ml_collections.ConfigDict) -> int:
    """31 bits of the config, without the locations of files each host may keep a copy of
    (data folders, starting weights): only a folder source's kind counts."""
    flat = {key: "folder:" if str(value).startswith("folder:") else value
            for key, value in run_record.flat_config(config).items()
            if not key.endswith(("data_dir", "manual_dir", "init_from"))}
    return zlib.crc32(json.dumps(flat, sort_keys=True, default=str).encode()) & 0x7FFFFFFF


def _count(number: int) -> str:
    """12.34M for a model, 520 for a linear probe's head (was "0.00M")."""
    return f"{number / 1e6:.2f}M" if number >= 100_000 else f"{number:,}"


class Run:
    """One run in `workdir` over `devices` (default: all devices of all processes).

    Before any data or model work: locks the workdir (a second run on it fails at once),
    finds the newest intact checkpoint (damaged newer ones are moved aside) and checks the
    config against the run's record (`run_record`: changed hyperparameters are refused unless
    `config.config_change_ok`). `resume_step` is that checkpoint's step, None for a new run.
    The accepted changes are recorded when training starts (`record_config_changes`).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, devices=None):
        self.config = config
        # Every process runs the same config: a difference (an override given to one host)
        # trained apart without a word, or hung at the first step count that differed (QA).
        same_on_every_process(config_hash(config), "the config (a hash of it)", fix="give "
                              "every process the same command: the same --config file and "
                              "overrides.")
        with failing_together("making the workdir"):  # a clear error on every process
            self.workdir = ensure_workdir(workdir)
        self.devices = list(devices or jax.devices())
        self.is_main = jax.process_index() == 0
        self.logger: RunLogger | None = None
        self.state_shardings: Any = None
        self.checkpointer: Checkpointer | None = None
        self.num_examples: int | None = None  # init_state's, saved with each checkpoint
        self._lock = lock_workdir(self.workdir)
        try:
            check_shared(self.workdir)
            self.mesh = sharding_lib.create_mesh(
                data=config.mesh.data, fsdp=config.mesh.fsdp, devices=self.devices
            )
            print(f"Mesh: {dict(self.mesh.shape)} over {len(self.devices)} "
                  f"{self.devices[0].platform} device(s), {jax.process_count()} process(es).")
            self.checkpointer = Checkpointer(
                self.workdir, save_every_steps=config.checkpoint_every_steps,
                keep=config.keep_checkpoints,
            )
            self.resume_step = self.checkpointer.newest_intact_step(move_damaged=True)
            self.config_changes = run_record.ConfigChanges()
            if config.get("eval_only", False):  # changes no record: says what it evaluates
                with failing_together(f"writing {run_record.EVAL_CONFIG_FILE}"):
                    if self.is_main:
                        run_record.record_eval_config(self.workdir, config,
                                                      resume_step=self.resume_step)
            else:
                with failing_together("checking or writing the config record"):
                    self.config_changes = run_record.record_config(
                        self.workdir, config, resume_step=self.resume_step, write=self.is_main)
        except BaseException:
            self.close(quiet=True)
            raise

    # ------------------------------------------------------------------------- state
    def init_state(
        self, spec: ModelSpec, tx: optax.GradientTransformation, *, trainable: Any = nnx.Param,
        num_examples: int | None = None,
    ) -> tuple[nnx.GraphDef, TrainState, int]:
        """(graphdef, state born sharded, start step): the newest intact checkpoint, else a new
        state.

        Parameters come from `config.seed`, step randomness from `config.seed + 1`. Writes
        `model.json` (what `mae_jax.weights.load` reads back). num_examples: the training
        images counted now, saved with each checkpoint; a resume whose count differs from its
        checkpoint's is refused (`check_same_data`).
        """
        seed = self.config.seed

        def init():
            model = spec.build(make_rngs(seed))
            return TrainState.create(model, tx, rng_seed=seed + 1, trainable=trainable)

        graphdef = nnx.split(nnx.eval_shape(lambda: spec.build(make_rngs(seed))), trainable, ...)[0]
        state, self.state_shardings, start_step, metadata = init_or_restore(
            init, self.mesh, self.checkpointer, self.resume_step
        )
        if self.config.get("eval_only", False):  # trains nothing (QA: "Resuming from step")
            began = (f"Evaluating this workdir's checkpoint of step {start_step}." if start_step
                     else "Evaluating (no checkpoint in this workdir).")
        else:
            began = f"Resuming from step {start_step}." if start_step else "Starting from scratch."
        print(began, f"{_count(tree_size(state.params))} trainable parameters.")
        if start_step and self.config.get("eval_only") and self.config.get("init_from"):
            print(f"Note: eval_only evaluates this workdir's checkpoint of step {start_step}; "
                  f"init_from ({self.config.init_from}) only starts a new run. To evaluate it, "
                  "give a --workdir without checkpoints.", flush=True)
        self.num_examples = num_examples
        if start_step and num_examples is not None:
            self.check_same_data(metadata.get("num_examples"), num_examples, start_step)
        written_by = metadata.get("process_count")  # absent in checkpoints before 2026-12-07
        reads_data = not self.config.get("eval_only", False)
        if self.is_main and reads_data and written_by not in (None, jax.process_count()):
            print(f"Note: the checkpoint of step {start_step} was written by {written_by} "
                  f"process(es), this run has {jax.process_count()}. Each process reads its own "
                  "share of the data in its own order, so from here on the examples come in "
                  "another order than in the uninterrupted run (in the current epoch some may "
                  "come twice, others not at all). The parameters, optimizer state and "
                  f"schedule carry on exactly; with {written_by} process(es) the data order "
                  "would too.", flush=True)
        with failing_together(f"writing {self.workdir}/model.json"):
            if self.is_main:
                spec.save(self.workdir)
        return graphdef, state, start_step

    def check_same_data(self, saved: int | None, now: int, step: int) -> None:
        """Refuses a resume whose training set changed size since the checkpoint (None: saved
        before 2026-12-08): the schedule (when in epochs) and the data order would change
        without a word (QA: images added to a folder between runs). --config_change_ok takes
        the new data, with a note."""
        if saved is None and str(self.config.data.get("source", "")).startswith(
                ("folder:", "generated:")):  # a checkpoint of before 2026-12-07 22:00 UTC
            print(f"Note: the checkpoint of step {step} predates the full shuffle of folder "
                  "sources (each epoch a permutation of the whole listing): from here on the "
                  "images come in another order than in the uninterrupted run.", flush=True)
        if saved is None or int(saved) == now:
            return
        what = (f"The training data changed since the checkpoint of step {step}: {saved} "
                f"images then, {now} now ({self.config.data.get('source', 'the source')})")
        if not self.config.get(run_record.CHANGE_OK_FIELD, False):
            raise BadDataError(
                f"{what}. The data order, and a schedule given in epochs, would change. Restore "
                "the data to resume the same run, add --config_change_ok to go on with this "
                "data, or give a new --workdir.")
        in_epochs = self.config.get("num_epochs") and not self.config.get("total_steps")
        epochs = ", and the schedule in epochs follows it" if in_epochs else ""
        print(f"Note: {what}; going on with it (--config_change_ok): another data order{epochs}.",
              flush=True)

    def _set_aside_earlier_outputs(self) -> None:
        """A run starting from scratch in a workdir that holds an earlier run's metrics,
        results, pictures, logs or export (its checkpoints deleted, or none saved yet) keeps
        them as `<name>.replaced-<time>` instead of appending to, mixing with or overwriting
        them (QA: a new run reported the earlier run's eval_results.json as its own)."""
        evaluation = () if self.config.get("eval_only", False) else (  # this one's own
            run_record.EVAL_CONFIG_FILE,)
        for name in (*RUN_OUTPUTS, "export", *evaluation):
            path = os.path.join(self.workdir, name)
            if os.path.isdir(path) or (os.path.isfile(path) and os.path.getsize(path) > 0):
                kept = set_aside(path)
                print(f"Starting from scratch, but {self.workdir} holds an earlier run's {name} "
                      f"(no checkpoint to resume): kept as {kept}.", flush=True)

    # ------------------------------------------------------------------------- loop
    def start_logging(self, *, total_steps: int, start_step: int) -> RunLogger:
        with failing_together("starting the run's logs"):  # process 0 writes
            if start_step == 0 and self.is_main:
                self._set_aside_earlier_outputs()
            self.logger = RunLogger(
                self.workdir, total_steps=total_steps, is_main=self.is_main,
                log_every=self.config.log_every_steps, global_batch_size=self.config.batch_size,
                start_step=start_step, tensorboard=self.config.get("tensorboard", True),
            )
        return self.logger

    def train(
        self,
        state: TrainState,
        step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]],
        batches: Iterator[dict],
        *,
        start_step: int,
        total_steps: int,
        hooks: tuple[loop.Hook, ...] = (),
        metadata_fn: Callable[[int], dict] = lambda step: {"step": step},
    ) -> loop.LoopResult:
        """Compiles the step once and runs the loop to `total_steps` (or a stop signal);
        `config.profile_steps` 'A:B' traces steps A + 1 to B into `workdir/profile`."""
        self.record_config_changes()
        train_step = compile_step(step_fn, self.state_shardings, self.mesh)
        processes = jax.process_count()  # read back by a resume (init_state)
        counted = {} if self.num_examples is None else {"num_examples": int(self.num_examples)}
        return loop.run_loop(
            state=state, train_step=train_step, batches=batches, mesh=self.mesh,
            start_step=start_step, total_steps=total_steps, checkpointer=self.checkpointer,
            logger=self.logger, hooks=hooks,
            metadata_fn=lambda step: {**metadata_fn(step), "process_count": processes,
                                      **counted},
            profile=core_config.profile_steps(self.config.get("profile_steps", "")),
            profile_dir=os.path.join(self.workdir, "profile"),
        )

    def evaluated_at(self, step: int) -> bool:
        """Whether metrics.jsonl holds an evaluation of `step` (`loop.Hook.missed`: a
        checkpoint is written before its step's evaluation, so a failed evaluation loses only
        itself, and the resumed run evaluates that step first)."""
        # Process 0's reading for every process: they must agree on running the evaluation's
        # collectives, whatever each host's view of the shared file.
        return bool(from_process_0(lambda: any(
            record["step"] == step for record in read_metrics(self.workdir, kind="eval")),
            "reading metrics.jsonl"))

    def pictures_at(self, name: str, step: int) -> bool:
        """Whether picture `name` of `step` was written (`loop.Hook.missed`, as
        `evaluated_at`): process 0's answer, for every process."""
        return bool(from_process_0(lambda: os.path.exists(image_path(self.workdir, name, step)),
                                   "looking for the pictures"))

    def record_config_changes(self) -> None:
        """Appends this resume's accepted config changes to `config_history.jsonl` (once, on
        process 0). Called when training starts: a resume that failed before it (a checkpoint
        that does not fit, missing data) changed nothing, so it records nothing."""
        with failing_together("writing config_history.jsonl"):
            if self.is_main:
                self.config_changes.write(self.workdir)
        self.config_changes = run_record.ConfigChanges()

    # ------------------------------------------------------------------------- end
    def close(self, *, quiet: bool = False) -> None:
        """Finishes pending checkpoint writes, closes the logs, unlocks the workdir.

        quiet: another error is already on its way up; a failed write is then printed in one
        line instead of replacing that error.
        """
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
        except Exception as error:
            if not quiet:
                raise
            print(f"Also: {str(error).splitlines()[0]}", flush=True)
        finally:
            if self.logger is not None:
                self.logger.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(quiet=error is not None)
