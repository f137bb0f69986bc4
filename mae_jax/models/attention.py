"""Multi-head self-attention (timm layout) with optional BEiT relative position bias."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.models.layers import dense, product_result_dtype


def attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *, bias=None, implementation=None
) -> jax.Array:
    """query/key/value: [N, T, H, Dh] -> [N, T, H, Dh]; bias: optional [1 or N, H, T, T], any
    float dtype.

    implementation: None/"xla" (`xla_attention` below), "cudnn" (the fused flash attention of
    `jax.nn.dot_product_attention`), or "auto" (cudnn on GPU with 16-bit inputs when the shape
    is supported, XLA otherwise).

    cuDNN's kernel takes the bias in the input dtype and keeps its own float32 softmax
    statistics.
    """
    if implementation == "auto":
        if jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return _cudnn(query, key, value, bias)
            except (NotImplementedError, ValueError, RuntimeError):
                pass  # shape or dtype cuDNN does not support: fall back to XLA below
    elif implementation == "cudnn":
        return _cudnn(query, key, value, bias)
    elif implementation not in (None, "xla"):
        raise ValueError(
            f"Unknown attention implementation {implementation!r}: use None, 'xla', 'cudnn' "
            "or 'auto'."
        )
    return xla_attention(query, key, value, bias=bias)


def _cudnn(query, key, value, bias):
    bias = None if bias is None else bias.astype(query.dtype)
    return jax.nn.dot_product_attention(query, key, value, bias=bias, implementation="cudnn")


def xla_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *, bias: jax.Array | None = None
) -> jax.Array:
    """query/key/value: [N, T, H, Dh], bias: optional [1 or N, H, T, T] -> [N, T, H, Dh].

    The computation of `jax.nn.dot_product_attention(implementation="xla")`, in its order
    (float32 logits from 16-bit inputs, scaled, plus the bias in float32, float32 softmax,
    probabilities cast to the value dtype), so float32 results are the same bits. Three
    differences, all for the backward pass: no grouped-query axis (jax's [N, H, 1, T, T]
    layouts cost transposed copies of the probabilities), `softmax` below, which keeps only
    its output for the gradient, and the products taken heads-major ([N, H, T, Dh]: XLA:CPU
    otherwise transposes inside each product of the backward pass; ~4% of the ViT-Tiny MAE CPU
    step). Together they made the CPU step of ViT-Tiny MAE faster.
    """
    # jax's choice: an explicit bf16 x bf16 -> f32 algorithm keeps the backward dots'
    # operand types consistent (jax-ml/jax#24047).
    precision = {
        jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
        jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32,
    }.get(jnp.dtype(query.dtype))
    logits_dtype = jnp.promote_types(query.dtype, jnp.float32)
    query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))  # [N, H, T, Dh]
    logits = jnp.einsum(
        "nhqd,nhkd->nhqk", query, key, precision=precision, preferred_element_type=logits_dtype
    )
    logits = logits * jnp.asarray(query.shape[-1] ** -0.5, logits.dtype)
    if bias is not None:
        logits = (logits + bias).astype(logits.dtype)
    probs = softmax(logits.astype(jnp.float32)).astype(key.dtype)
    out = jnp.einsum("nhqk,nhkd->nhqd", probs, value,
                     preferred_element_type=product_result_dtype(value.dtype))
    return jnp.swapaxes(out.astype(value.dtype), 1, 2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """`jax.nn.softmax` (same forward) whose derivative is written from its output alone.

    jax.nn.softmax's derivative (with the default `jax_softmax_custom_jvp=False`) is autodiff
    of exp(x - max) / sum, which keeps the exponentials and the reciprocal sum besides the
    output: two [N, H, T, T] float32 tensors per attention layer instead of one.
    """
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(x.max(axis, keepdims=True)))
    return unnormalized / unnormalized.sum(axis, keepdims=True)


@softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x, axis)
    return y, y * (x_dot - (y * x_dot).sum(axis, keepdims=True))


@functools.lru_cache(maxsize=8)
def relative_position_index(grid_size: tuple[int, int]) -> np.ndarray:
    """BEiT's [1 + h*w, 1 + h*w] index into a relative-position table of (2h-1)(2w-1) + 3 rows
    (the last three: token-to-cls, cls-to-token, cls-to-cls)."""
    height, width = grid_size
    coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij")).reshape(
        2, -1
    )
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    relative[:, :, 0] += height - 1
    relative[:, :, 1] += width - 1
    relative[:, :, 0] *= 2 * width - 1
    num_relative = (2 * height - 1) * (2 * width - 1) + 3
    index = np.zeros((height * width + 1,) * 2, dtype=np.int32)
    index[1:, 1:] = relative.sum(-1)
    index[0, :] = num_relative - 3
    index[:, 0] = num_relative - 2
    index[0, 0] = num_relative - 1
    return index


class Attention(nnx.Module):
    """timm `Attention`: fused qkv Linear (with bias), scale Dh**-0.5, output projection.

    With `relative_grid=(h, w)`, a learned BEiT-style relative position bias (zero-initialised,
    as mmsegmentation's MAE backbone) is added to the logits; the input must then be
    [N, 1 + h*w, D].
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        dtype,
        attention_impl,
        relative_grid: tuple[int, int] | None = None,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"Width {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.qkv = dense(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = dense(dim, dim, dtype=dtype, rngs=rngs)
        if relative_grid is not None:
            height, width = relative_grid
            rows = (2 * height - 1) * (2 * width - 1) + 3
            self.relative_position_bias_table = nnx.Param(jnp.zeros((rows, num_heads)))
        else:
            self.relative_position_bias_table = None
        self.relative_grid = None if relative_grid is None else tuple(relative_grid)

    def __call__(
        self, x: jax.Array, *, bias: jax.Array | None = None, queries: jax.Array | None = None
    ) -> jax.Array:
        """x: [N, T, D] -> [N, T, D]; bias: optional [H, T, T] added to the logits.

        queries: optional [N, M] token indices: only those tokens attend (keys and values
        still come from all T), and the output is their rows, [N, M, D].
        """
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        query = qkv[:, :, 0]
        if queries is not None:
            if bias is not None or self.relative_position_bias_table is not None:
                raise ValueError("Attention with `queries` takes no bias.")
            query = jnp.take_along_axis(query, queries[:, :, None, None], axis=1)
        if self.relative_position_bias_table is not None:
            index = relative_position_index(self.relative_grid)
            if index.shape[0] != tokens:
                raise ValueError(
                    f"Relative position bias is built for {index.shape[0]} tokens, got {tokens}."
                )
            relative = self.relative_position_bias_table[...][index].transpose(2, 0, 1)
            bias = relative if bias is None else bias + relative
        if bias is not None:  # float32 (a float32 table), added to float32 logits
            bias = bias[None]
        out = attention(
            query, qkv[:, :, 1], qkv[:, :, 2], bias=bias, implementation=self.attention_impl
        )
        return self.proj(out.reshape(batch, query.shape[1], dim))
