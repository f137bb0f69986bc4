"""One train step for every task: the task gives a loss function, the core does the rest.

    loss_fn(model, batch, rng) -> (loss, metrics)

runs on a model merged from the state inside the jitted step; whatever the forward changes in
the model's non-trainable state (BatchNorm statistics) is carried into the new state. Gradient
accumulation splits the batch into micro-batches inside the same compiled step (lax.scan), so
the effective batch, the schedule and the step count do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mae_jax.core import sharding as sharding_lib
from mae_jax.core.state import TrainState

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum_steps: int = 1,
    trainable: Any = nnx.Param,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """(state, batch) -> (state, metrics); batch arrays are [B, ...], B = the effective batch.

    `trainable` must be the filter the state was split with (`TrainState.create`). metrics: the
    loss, what `loss_fn` reports (both averaged over micro-batches), grad_norm, param_norm and
    the step's lr.
    """

    def compute(params, rest, batch, rng):
        # copy: fresh Variables of this trace, which the forward may update (BatchNorm).
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss, metrics = loss_fn(model, batch, rng)
        return loss, (metrics, nnx.split(model, trainable, ...)[2])

    grad_fn = jax.value_and_grad(compute, has_aux=True)

    def train_step(state: TrainState, batch):
        rng = state.step_rng()
        if grad_accum_steps == 1:
            (loss, (metrics, rest)), grads = grad_fn(state.params, state.rest, batch, rng)
        else:
            # [B, ...] -> [accum, B/accum, ...] keeping each device's rows on that device.
            micro = jax.tree.map(
                lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch
            )

            def accumulate(carry, inputs):
                rest, totals = carry
                index, micro_batch = inputs
                (loss, (metrics, rest)), grads = grad_fn(
                    state.params, rest, micro_batch, jax.random.fold_in(rng, index)
                )
                return (rest, jax.tree.map(jnp.add, totals, (loss, metrics, grads))), None

            (loss, (metrics, _)), grads = jax.eval_shape(
                grad_fn, state.params, state.rest, jax.tree.map(lambda x: x[0], micro), rng
            )
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (loss, metrics, grads))
            (rest, totals), _ = jax.lax.scan(
                accumulate, (state.rest, zeros), (jnp.arange(grad_accum_steps), micro)
            )
            loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, totals)
        new_state, step_metrics = state.apply_gradients(grads, tx=tx, loss=loss, rest=rest)
        return new_state, metrics | step_metrics | {"lr": schedule(state.step)}

    return train_step


def compile_step(step_fn, state_shardings, mesh):
    """One jit of `step_fn(state, batch) -> (state, metrics)`: explicit shardings, donated state."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
