"""Classification evaluation over a validation split (all processes together): top-1, top-5 and
cross-entropy, `eval_results.json`, metrics.jsonl / TensorBoard.

As the official `engine_finetune.evaluate`: resize + centre crop, the model in eval mode
(BatchNorm running statistics, no drop path), accuracies over all examples. The loss here is
the mean over examples (the official averages per-batch means, weighting a short last batch
like a full one). Top-5 becomes top-min(5, classes) for datasets with fewer classes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mae_jax.core import sharding as sharding_lib
from mae_jax.core.processes import failing_together
from mae_jax.core.run_logging import RESULTS_FILE, RunLogger, write_results


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """logits [B, K], labels [B], mask [B] (False: padding) -> sums over the real examples:
    {"count", "top1", "top5", "loss"}."""
    mask = mask.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    top_k = min(5, logits.shape[-1])
    _, best = jax.lax.top_k(logits, top_k)
    hits = best == labels[:, None]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "count": mask.sum(),
        "top1": (hits[:, 0] * mask).sum(),
        "top5": (hits.any(axis=-1) * mask).sum(),
        "loss": (loss * mask).sum(),
    }


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Sums of `batch_sums` -> {"top1", "top5" (percent), "loss", "num_examples"}."""
    count = float(sums["count"])
    if count == 0:
        raise ValueError("The evaluation split yielded no examples.")
    return {
        "top1": 100.0 * float(sums["top1"]) / count,
        "top5": 100.0 * float(sums["top5"]) / count,
        "loss": float(sums["loss"]) / count,
        "num_examples": int(count),
    }


class Evaluator:
    """One pass over `config.data.eval_split`; `__call__(step, state)` returns the results and
    writes eval_results.json (main process)."""

    def __init__(self, config, graphdef, mesh, source: str, workdir: str,
                 logger: RunLogger | None):
        from mae_jax.data.constants import normalize_uint8

        self.config = config
        self.source = source
        self.workdir = workdir
        self.logger = logger
        self.batch_sharding = sharding_lib.batch_sharding(mesh)

        @jax.jit
        def step_sums(params, rest, batch, totals):
            model = nnx.merge(graphdef, params, rest)
            logits = model(normalize_uint8(batch["image"]), train=False)
            sums = batch_sums(logits, batch["label"], batch["mask"])
            return jax.tree.map(jnp.add, totals, sums)

        self.step_sums = step_sums

    def batches(self):
        from mae_jax.data import images as data  # TensorFlow: input pipeline only

        config = self.config
        return data.create_eval_iterator(
            source=self.source,
            image_size=config.model.image_size,
            global_batch_size=config.eval_batch_size,
            split=config.data.eval_split,
            data_dir=config.data.data_dir or None,
            download=config.data.download,
            resize_ratio=config.data.resize_ratio,
        )

    def evaluate(self, state) -> dict[str, float]:
        """The metrics alone (no files, no logging)."""
        totals = {name: jnp.zeros((), jnp.float32) for name in ("count", "top1", "top5", "loss")}
        for local in self.batches():
            batch = sharding_lib.global_batch_from_host(local, self.batch_sharding)
            # Device-side sums: no host sync until the pass is over.
            totals = self.step_sums(state.params, state.rest, batch, totals)
        return summarize(jax.device_get(totals))

    def __call__(self, step: int, state, *, log: bool = True) -> dict[str, Any]:
        """log=False: not in metrics.jsonl (a finished run's evaluation, reported again)."""
        # The split is named (QA: an eval_only run of another split replaced the file with
        # nothing saying so).
        results = self.evaluate(state) | {"step": int(step),
                                          "split": str(self.config.data.eval_split)}
        with failing_together(f"writing the evaluation of step {step}"):  # process 0
            if jax.process_index() == 0:
                write_results(self.workdir, results,
                              keep_other=bool(self.config.get("eval_only", False)))
            if self.logger is not None and log:
                self.logger.log_eval(step, {k: v for k, v in results.items()
                                            if k not in ("step", "split")})
        return results


def read_results(workdir: str) -> dict[str, Any]:
    with open(os.path.join(workdir, RESULTS_FILE)) as handle:
        return json.load(handle)

