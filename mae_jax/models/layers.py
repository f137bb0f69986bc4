"""Layers shared by the ViT, MAE decoder and heads: the official initialisation, the
mixed-precision policy and its normalisation layers.

Mixed precision follows what the official fp16-autocast runs compute: parameters and the
residual stream stay float32; matmuls, convolutions and attention run in the compute `dtype`
(bfloat16); LayerNorm / BatchNorm statistics, softmax and losses are float32. torch's type
promotion gives the float32 residual stream there (`x + attn(x)` with a float32 `x`); here the
same promotion does, because position tables, tokens and layer scales are float32 parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_NORM_EPS = 1e-6

# xavier_uniform, as the official `_init_weights` applies to every Linear (fans from [in, out]).
xavier_uniform = nnx.initializers.xavier_uniform()
# The official code initialises the patch-embed conv as a Linear on its [D, 3*P*P] view.
patch_embed_init = nnx.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1
)
token_init = nnx.initializers.normal(stddev=0.02)


def make_rngs(*args, **streams) -> nnx.Rngs:
    """`nnx.Rngs(*args, **streams)` whose counters are host (numpy) integers: the same keys
    (`fold_in(key, count)` with the same counts), cheaper to trace.

    Each key drawn updates the stream's counter with `count[...] += 1`. Inside a trace (every
    model build under jit / eval_shape, every train step with drop path) flax 0.12 then compares
    the new value's `.sharding`, which a tracer answers by raising an error whose message walks
    every operation traced so far: the cost grows with the program, and was ~80% of tracing a
    model (ViT-B MAE 2.42 -> 0.43 s, ViT-H/14 5.63 -> 0.76 s; `benchmarks/bench_trace.py`). A
    numpy counter is a constant of the trace, updated on the host. Build these Rngs inside the
    function traced for the gain; passed into a jit (its counters then traced), they behave as
    nnx.Rngs do.
    """
    rngs = nnx.Rngs(*args, **streams)
    for _, stream in rngs.items():
        shape = jnp.shape(stream.key[...])
        stream.count = HostCount(np.zeros(shape, np.uint32), tag=stream.tag)
    return rngs


class HostCount(nnx.RngCount):
    """A stream counter held in numpy, never shared: reads return copies and updates replace
    the array. A trace keeps a numpy constant by reference until it is lowered, and
    `count[...] += 1` adds in place to what a read returned, so a read sharing the counter's
    memory would give the key drawn the next count; graph copies (`nnx.clone`) share leaves, so
    an update in place would advance the copy's counter too. A traced value (the Rngs passed
    into a jit) takes flax's own path."""

    def get_value(self, **index):
        value = super().get_value(**index)
        return value.copy() if isinstance(value, np.ndarray) else value

    def set_value(self, value, **index):
        whole = index.get("index", Ellipsis) is Ellipsis
        on_host = isinstance(value, np.ndarray | np.generic)
        if whole and on_host and isinstance(self._raw_value, np.ndarray):
            return super().set_value(np.array(value, copy=True))  # replaced, not written into
        return super().set_value(value, **index)


def torch_bias_init(fan_in: int):
    """PyTorch's default conv / linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    The official MAE re-initialises only Linear biases (to 0); the patch-embed conv bias and
    mmseg's ConvTranspose biases keep this default. torch takes fan_in from the weight:
    in_channels * kh * kw for a conv, weight.size(1) * kh * kw = out_channels * kh * kw for a
    ConvTranspose2d.
    """
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def residual_dtype(dtype) -> jnp.dtype:
    """The residual stream's dtype for a compute dtype: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


class FixedEmbedding(nnx.Variable):
    """A position table that is not trained (not an `nnx.Param`, so no optimizer state)."""


@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x: [..., I] @ kernel: [I, O] (one dtype) -> [..., O], nnx.Linear's dot_general (the
    same bits), with the kernel's gradient taken as one [tokens, I]^T x [tokens, O] product.

    Autodiff of nnx.Linear transposes the dot: on the CPU backend XLA then copies the [tokens,
    O] cotangent transposed and runs a slower product for every weight gradient (a ~3.3 GFLOP
    MLP kernel: 34 ms + a 7 ms copy against 21 ms here; ViT-Tiny MAE step ~8% faster).
    """
    return _matmul_forward(x, kernel)[0]


def product_result_dtype(dtype):
    """The `preferred_element_type` for a product of two `dtype` operands, whose caller then
    rounds the result once to `dtype`: float32 for 16-bit operands on the CPU backend, None
    (the operands' dtype, nnx's product) elsewhere. XLA:CPU computes a bfloat16 x bfloat16 ->
    bfloat16 product in float32 anyway, but through a slower kernel: asked for float32 it runs
    YNNPACK's bf16 kernel, [6304, 512] x [512, 2048] 51 vs 134 ms on one Intel Xeon core (the
    MAE bf16 CPU step: ViT-B 112 px -33%, ViT-Tiny 224 px -37%). The values are the same
    float32 sums rounded once (in another order: about 1 in 6,000 elements differs by one bf16
    step at width 768)."""
    if dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "cpu":
        return jnp.float32
    return None


def _dot(lhs: jax.Array, rhs: jax.Array, contract: tuple) -> jax.Array:
    """dot_general without batch axes, in `product_result_dtype`'s precision."""
    out = jax.lax.dot_general(lhs, rhs, (contract, ((), ())),
                              preferred_element_type=product_result_dtype(lhs.dtype))
    return out.astype(lhs.dtype)


def _matmul_forward(x, kernel):
    return _dot(x, kernel, ((x.ndim - 1,), (0,))), (x, kernel)


def _matmul_backward(residuals, grad):
    x, kernel = residuals
    grad_x = _dot(grad, kernel, ((grad.ndim - 1,), (1,)))
    rows, grad_rows = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    return grad_x, _dot(rows, grad_rows, ((0,), (0,)))


_matmul.defvjp(_matmul_forward, _matmul_backward)


def matmul_bias(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """nnx.Linear's forward (`_matmul`, then the bias added as nnx adds it)."""
    y = _matmul(x, kernel)
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


class Linear(nnx.Linear):
    """nnx.Linear (same parameters, dtype promotion and forward) with `matmul_bias`'s gradient.
    Without a bias, or with a custom dot_general / precision / preferred element type, it is
    nnx.Linear."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        plain = (self.bias is None or out_sharding is not None or self.precision is not None
                 or self.preferred_element_type is not None
                 or self.dot_general is not jax.lax.dot_general)
        if plain:
            return super().__call__(inputs, out_sharding)
        inputs, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return matmul_bias(inputs, kernel, bias)


def dense(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs) -> Linear:
    return Linear(
        in_features,
        out_features,
        kernel_init=xavier_uniform,
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm computed in float32 (input, statistics, affine) whose output is cast to
    `output_dtype`, the compute dtype of the matmul that follows (torch autocast runs
    layer_norm in float32 too). Parameters `scale` / `bias` as nnx.LayerNorm's.

    The variance is two-pass (mean of (x - mean)^2), as torch's: the one-pass E[x^2] - E[x]^2
    loses the spread of a row whose mean is large next to it (1000 + U(0, 1): std 0.67, not 1).
    The forward is nnx's; the backward is written out (`_layer_norm`) to keep less memory.
    """

    def __init__(self, features: int, *, output_dtype, rngs: nnx.Rngs):
        super().__init__(
            features,
            epsilon=LAYER_NORM_EPS,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            use_fast_variance=False,
            rngs=rngs,
        )
        self.output_dtype = output_dtype

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """x: [..., D] (any float dtype) -> [..., D] in `output_dtype`."""
        if mask is not None or self.scale is None or self.bias is None:  # not used by our models
            return super().__call__(x, mask=mask).astype(self.output_dtype)
        y = _layer_norm(x.astype(jnp.float32), self.scale[...], self.bias[...], self.epsilon)
        return y.astype(self.output_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """x: [..., D] float32, scale / bias: [D] -> [..., D]: nnx.LayerNorm's two-pass forward
    (same operations in the same order, so the same float32 bits), torch's backward.

    Autodiff of nnx.LayerNorm keeps x - mean, its square and three [..., D] products for the
    backward pass; this VJP keeps the normalised input and 1/std only (as torch's
    native_layer_norm), which made the CPU train step of ViT-Tiny MAE ~25% faster.
    """
    return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(x, scale, bias, epsilon):
    centered = x - x.mean(-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + epsilon)
    y = centered * (inv_std * scale) + bias  # nnx's `_normalize` order
    return y, (centered * inv_std, inv_std, scale)


def _layer_norm_backward(epsilon, residuals, grad):
    normalized, inv_std, scale = residuals
    grad_normalized = grad * scale
    # d/dx of (x - mean) / std for a row: (g - mean(g) - x_hat * mean(g * x_hat)) / std.
    grad_x = inv_std * (
        grad_normalized
        - grad_normalized.mean(-1, keepdims=True)
        - normalized * (grad_normalized * normalized).mean(-1, keepdims=True)
    )
    batch_axes = tuple(range(grad.ndim - 1))
    return grad_x, (grad * normalized).sum(batch_axes), grad.sum(batch_axes)


_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


def layer_norm(features: int, *, dtype, rngs: nnx.Rngs) -> LayerNorm:
    """LayerNorm (eps 1e-6, as the official) in float32, output in the compute `dtype`."""
    return LayerNorm(features, output_dtype=dtype, rngs=rngs)


class BatchNorm(nnx.BatchNorm):
    """BatchNorm with PyTorch's running statistics, computed in float32, output in `dtype`.

    Training mode normalises with the biased batch variance (as torch) but, unlike
    nnx.BatchNorm, updates the running variance with the UNBIASED one (n / (n - 1)), as
    torch's BatchNorm / SyncBatchNorm do. Inside a jitted step over a batch sharded on the data
    axis the statistics are plain reductions over the global array (GSPMD adds the cross-device
    sums) and n is the global count, which is SyncBN's. Variables keep nnx.BatchNorm's names
    (`scale`, `bias`, `mean`, `var`) so checkpoints and weight maps stay valid.
    `momentum` is Flax's (torch momentum 0.1 == 0.9 here).
    """

    def __init__(self, num_features: int, *, dtype=jnp.float32, **kwargs):
        if kwargs.get("axis", -1) != -1 or kwargs.get("axis_name") is not None:
            raise ValueError(
                "BatchNorm normalises the last (channel) axis over all others, across devices "
                "by GSPMD: axis and axis_name are not supported."
            )
        kwargs.setdefault("param_dtype", jnp.float32)
        # No default mode: every call says train or eval (a forgotten flag is an error).
        kwargs.setdefault("use_running_average", None)
        kwargs["use_fast_variance"] = False  # always two-pass statistics (see __call__)
        super().__init__(num_features, dtype=dtype, **kwargs)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """x: [..., C] -> [..., C] in `dtype`; statistics over every axis but the last."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("Pass use_running_average=True (evaluation) or False (training).")
        x = x.astype(residual_dtype(x.dtype))
        axes = tuple(range(x.ndim - 1))
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            # Two-pass statistics in float32 (nnx's use_fast_variance=False order).
            mean = x.mean(axes)
            var = jnp.square(x - mean).mean(axes)
            count = x.size // x.shape[-1]
            unbiased = var * (count / max(count - 1, 1))
            # set_value, not `[...] =`: flax checks an indexed update's `.sharding`, which costs
            # a walk over the whole traced program per call (see `make_rngs`).
            self.mean.set_value(jax.lax.stop_gradient(
                self.momentum * self.mean[...] + (1 - self.momentum) * mean
            ))
            self.var.set_value(jax.lax.stop_gradient(
                self.momentum * self.var[...] + (1 - self.momentum) * unbiased
            ))
        # nnx's `_normalize` order, so float32 results match nnx.BatchNorm's bit for bit.
        y = x - mean
        mul = jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            mul = mul * self.scale[...]
        y = y * mul
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype or x.dtype)
