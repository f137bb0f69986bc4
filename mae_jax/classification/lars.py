"""LARS exactly as the official MAE linear probe uses it (``util/lars.py``, from MoCo v3).

Per parameter ``p`` with gradient ``g``, every step of the official optimiser does::

    if p.ndim > 1:                       # not a bias / norm scale
        g = g + weight_decay * p
        q = trust_coefficient * |p| / |g|   if |p| > 0 and |g| > 0, else 1
        g = g * q
    mu = momentum * mu + g               # mu starts at 0
    p = p - lr * mu                      # lr of the current step (MAE sets it per iteration)

``optax.lars`` is *not* this optimiser:

  * it applies the learning rate before the momentum (``scale_by_learning_rate`` then ``trace``),
    so its momentum buffer stores ``lr``-scaled steps. With a constant ``lr`` both give the same
    parameters (up to float rounding); with a schedule (MAE's linear-probe warmup + cosine, set
    every iteration) the official update is ``lr_t * mu_t`` while optax's is
    ``sum_k momentum^(t-k) lr_k g_k``, which differs;
  * its weight-decay and trust-ratio masks default to every parameter (the official skips
    ``ndim <= 1`` parameters for both).

The trust ratio itself (``optax.scale_by_trust_ratio`` with ``min_norm=0, eps=0``: ratio 1 when
either norm is 0) and ``optax.add_decayed_weights`` are the official formulas, so `lars` chains
those optax pieces with the ``ndim > 1`` mask, then ``trace`` (momentum), then the learning rate.
"""

import jax
import optax


def _is_matrix(params):
    """The official rule: weight decay and trust ratio only for parameters with ndim > 1."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def lars(learning_rate, *, momentum=0.9, trust_coefficient=0.001, weight_decay=0.0):
    """The official MAE / MoCo v3 LARS as an optax ``GradientTransformation``.

    learning_rate: a float or an optax schedule ``step -> lr`` (step counts updates from 0).
    Defaults are ``main_linprobe.py``'s (``LARS(head params, lr, weight_decay=0)`` with the class
    defaults momentum 0.9, trust_coefficient 0.001). Parameters with ``ndim <= 1`` get neither
    weight decay nor the trust ratio. ``update(grads, state, params)`` needs ``params``.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_is_matrix),
        optax.masked(
            optax.scale_by_trust_ratio(min_norm=0.0, trust_coefficient=trust_coefficient, eps=0.0),
            _is_matrix,
        ),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(learning_rate),
    )
