"""LARS (mae_jax.classification.lars) vs the official MAE util/lars.py, written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mae_jax.classification.lars import lars


def official_lars(params, grads_per_step, lrs, *, weight_decay, momentum=0.9, trust=0.001):
    """facebookresearch/mae util/lars.py LARS.step, in float64, one call per step."""
    params = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for name, p in params.items():
            dp = np.asarray(grads[name], np.float64)
            if p.ndim > 1:
                dp = dp + weight_decay * p
                param_norm = np.linalg.norm(p)
                update_norm = np.linalg.norm(dp)
                q = 1.0
                if param_norm > 0 and update_norm > 0:
                    q = trust * param_norm / update_norm
                dp = dp * q
            mu[name] = momentum * mu[name] + dp
            params[name] = p - lr * mu[name]
    return params


def _problem(seed=0, steps=6):
    rng = np.random.default_rng(seed)
    params = {
        "kernel": rng.normal(size=(5, 3)).astype(np.float32),  # 2-D: decay + trust ratio
        "bias": rng.normal(size=(3,)).astype(np.float32),  # 1-D: neither
        "scale": (1.0 + 0.1 * rng.normal(size=(5,))).astype(np.float32),  # 1-D norm scale
    }
    grads = [
        {k: (0.5 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
        for _ in range(steps)
    ]
    return params, grads


def _run(tx, params, grads):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for g in grads:
        params, state = step(params, state, jax.tree.map(jnp.asarray, g))
    return {k: np.asarray(v) for k, v in params.items()}


def _warmup_cosine(step):  # a per-iteration schedule like main_linprobe's adjust_learning_rate
    step = jnp.asarray(step, jnp.float32)
    return jnp.where(step < 2, 0.4 * (step + 1) / 2, 0.2 * (1 + jnp.cos(jnp.pi * (step - 2) / 6)))


def test_lars_with_a_learning_rate_schedule_matches_the_official_optimizer_to_1e6():
    params, grads = _problem()
    lrs = [float(_warmup_cosine(t)) for t in range(len(grads))]
    for weight_decay in (0.0, 0.05):
        ours = _run(lars(_warmup_cosine, weight_decay=weight_decay), params, grads)
        ref = official_lars(params, grads, lrs, weight_decay=weight_decay)
        for name in params:
            np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_lars_with_a_constant_learning_rate_matches_the_official_optimizer_to_1e6():
    params, grads = _problem(seed=1)
    ours = _run(lars(0.3, momentum=0.8, trust_coefficient=0.01), params, grads)
    ref = official_lars(params, grads, [0.3] * len(grads), weight_decay=0.0, momentum=0.8,
                        trust=0.01)
    for name in params:
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_one_dimensional_parameters_take_plain_momentum_sgd_steps_without_decay_or_trust_ratio():
    params, grads = _problem(seed=2, steps=1)
    ours = _run(lars(0.5, weight_decay=0.1), params, grads)
    for name in ("bias", "scale"):  # first step: mu = g, p - lr * g
        np.testing.assert_allclose(ours[name], params[name] - 0.5 * grads[0][name], atol=1e-7)
    # The kernel's step is rescaled to trust * |p| / |g + wd p| * (g + wd p): norm 0.001 |p|.
    # (rtol 1e-4: the step is recovered as a difference of float32 parameters.)
    step = params["kernel"].astype(np.float64) - ours["kernel"]
    np.testing.assert_allclose(
        np.linalg.norm(step), 0.5 * 0.001 * np.linalg.norm(params["kernel"]), rtol=1e-4
    )


def test_zero_parameter_or_zero_gradient_matrices_use_a_trust_ratio_of_one():
    params = {"kernel": np.zeros((3, 2), np.float32), "other": np.ones((2, 2), np.float32)}
    grads = [{"kernel": np.full((3, 2), 0.25, np.float32), "other": np.zeros((2, 2), np.float32)}]
    ours = _run(lars(1.0), params, grads)
    np.testing.assert_allclose(ours["kernel"], -0.25 * np.ones((3, 2)), atol=1e-7)  # q = 1
    np.testing.assert_allclose(ours["other"], np.ones((2, 2)), atol=0)  # zero update stays zero


def test_optax_lars_is_not_the_official_optimizer_under_a_schedule_which_is_why_it_is_not_used():
    params, grads = _problem()
    lrs = [float(_warmup_cosine(t)) for t in range(len(grads))]
    ref = official_lars(params, grads, lrs, weight_decay=0.0)
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    theirs = _run(
        optax.lars(_warmup_cosine, weight_decay_mask=mask, trust_ratio_mask=mask), params, grads
    )
    # optax applies lr before momentum: its buffer keeps old learning rates.
    assert np.abs(theirs["bias"] - ref["bias"]).max() > 1e-2
