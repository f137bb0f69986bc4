"""The training machinery shared by `train.py` (MAE) and `segment.py` (UPerNet).

One loop: sharded state created or restored, one compiled step with donated state, host batches
turned into global arrays, metrics read back only at log steps, periodic checkpoints, hooks
(reconstructions, evaluation) every N steps, a clean save on SIGTERM / Ctrl-C, and a stop with
a clear error, before any checkpoint of bad state, when the loss stops being finite.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import sharding as sharding_lib
from mae_jax.checkpointing import Checkpointer, PreemptionGuard
from mae_jax.run_logging import RunLogger

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"Unknown compute dtype {name!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def maybe_initialize_distributed(enabled: bool) -> None:
    """Joins JAX's multi-process runtime (one process per host; coordinator from the
    environment: SLURM, Open MPI, TPU pods, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID)."""
    if enabled:
        jax.distributed.initialize()


def ensure_workdir(workdir: str) -> str:
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    try:
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise PermissionError(f"Cannot write to workdir {workdir}: {error}") from error
    return workdir


def init_or_restore(
    init_fn: Callable[[], Any],
    mesh,
    checkpointer: Checkpointer,
) -> tuple[Any, Any, int, dict]:
    """Returns (state, shardings, start_step, metadata), the state born sharded.

    When `checkpointer` holds a finished checkpoint, the state is read straight into its
    shardings (the initialiser only runs abstractly); otherwise `init_fn` runs under jit.
    """
    abstract = jax.eval_shape(init_fn)
    shardings = sharding_lib.state_shardings(abstract, mesh)
    latest = checkpointer.latest_step()
    if latest is None:
        state = jax.jit(init_fn, out_shardings=shardings)()
        return state, shardings, 0, {}
    target = sharding_lib.abstract_with_shardings(abstract, shardings)
    try:
        state, metadata = checkpointer.restore(latest, abstract_state=target)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"The checkpoint at step {latest} in {checkpointer.directory} does not fit this "
            "config (another model size or optimizer?). Resume with the config that wrote it, "
            f"or start a new run in another --workdir. Details: {error}"
        ) from error
    return state, shardings, int(latest), metadata


def compile_step(step_fn, state_shardings, mesh):
    """One jit of `step_fn(state, batch) -> (state, metrics)`: explicit shardings, donated state."""
    batch_sharding = sharding_lib.batch_sharding(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


@dataclasses.dataclass
class Hook:
    """Runs `fn(step, state)` every `every_steps` steps and after the last one (0: never)."""

    every_steps: int
    fn: Callable[[int, Any], None]
    at_end: bool = True

    def due(self, step: int, total_steps: int) -> bool:
        if self.every_steps <= 0:
            return False
        return step % self.every_steps == 0 or (self.at_end and step == total_steps)


def run_loop(
    *,
    state: Any,
    train_step: Callable[[Any, dict], tuple[Any, dict]],
    batches: Iterator[Mapping[str, np.ndarray]],
    mesh,
    start_step: int,
    total_steps: int,
    checkpointer: Checkpointer,
    logger: RunLogger,
    metadata_fn: Callable[[int], dict] = lambda step: {},
    hooks: tuple[Hook, ...] = (),
    extra_scalars: Callable[[int], dict] = lambda step: {},
) -> tuple[Any, int]:
    """Trains from `start_step` to `total_steps`; returns (state, last step done).

    `state` must be a dict with a "nonfinite_steps" counter that `train_step` increments when
    the loss is not finite: it is read only at log and checkpoint steps (no per-step host sync).
    """
    batch_sharding = sharding_lib.batch_sharding(mesh)
    step = start_step
    last_saved = start_step

    def check_finite(step: int) -> None:
        bad = int(jax.device_get(state["nonfinite_steps"]))
        if bad:
            raise NonFiniteLossError(
                f"The loss became NaN/inf (first seen by step {step}; {bad} bad step(s)). "
                f"Stopped without saving; the last good checkpoint (step {last_saved}) is "
                "intact. Lower the learning rate, enable clip_grad_norm, or use float32."
            )

    with PreemptionGuard() as guard:
        while step < total_steps:
            host_batch = next(batches)
            batch = sharding_lib.global_batch_from_host(host_batch, batch_sharding)
            state, metrics = train_step(state, batch)
            step += 1
            if logger.should_log(step):
                check_finite(step)
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                logger.log_train(step, scalars | extra_scalars(step))
            for hook in hooks:
                if hook.due(step, total_steps):
                    hook.fn(step, state)
            # Several processes must agree on the stop step: they compare flags at log steps.
            if logger.should_log(step):
                stop = guard.requested_anywhere()
            else:
                stop = guard.requested and jax.process_count() == 1
            if step % checkpointer.save_every_steps == 0 or stop or step == total_steps:
                check_finite(step)
                checkpointer.save(step, state, metadata=metadata_fn(step), force=True)
                last_saved = step
            if stop:
                print(f"Stopped at step {step} on request; re-run the same command to resume.")
                break
    checkpointer.wait()
    return state, step


def tree_size(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
