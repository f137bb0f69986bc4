"""Convolutions with faster gradients on XLA (same parameters as nnx.Conv / ConvTranspose):
UPerNet's 1x1 and k x k convolutions (`Conv`) and the neck's 2x2 / stride 2 deconvolutions
(`PatchDeconv`). Their forward and gradients are pinned against nnx and torch in
tests/test_fast_ops.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax.models.layers import matmul_bias

_CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# Conv takes k x k kernel gradients per tap (`_conv_same`) on the CPU backend.
PER_TAP_KERNEL_GRAD = True


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_same(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """A stride-1 NHWC convolution (nnx.Conv's conv_general_dilated: the same bits) whose
    kernel gradient is one [I, pixels] x [pixels, O] product per tap.

    XLA:CPU runs autodiff's kernel gradient of a 3x3 convolution at about half its forward
    speed (3072 -> 768 channels at 32 x 32, batch 2, two cores: 1.64 s against a 0.84 s
    forward; per tap: 0.63 s). The taps run in a loop: unrolled, XLA:CPU held all nine input
    windows at once (+4 GiB for ViT-B UPerNet at 512 px, batch 2, float32 or bfloat16). XLA's
    cost analysis counts a loop's body once: `PER_TAP_KERNEL_GRAD = False` turns this off
    (`benchmarks/bench_seg_train_step.py` counts FLOPs that way). The input gradient stays
    XLA's own (jax.vjp of the forward).
    """
    return _conv_same_forward(x, kernel, padding)[0]


def _conv(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                        dimension_numbers=_CONV_DIMENSIONS)


def _conv_same_forward(x, kernel, padding):
    return _conv(x, kernel, padding), (x, kernel)


def _conv_same_backward(padding, residuals, grad):
    x, kernel = residuals
    grad_x = jax.vjp(lambda x: _conv(x, kernel, padding), x)[1](grad)[0]
    # Channels first ([I, N, H', W']): each tap is then a plain [I, pixels] x [pixels, O]
    # product (~20% faster on XLA:CPU than contracting the pixels of [pixels, I]).
    padded = jnp.transpose(jnp.pad(x, ((0, 0), *padding, (0, 0))), (3, 0, 1, 2))
    (n, height, width, _), (kh, kw, channels, _) = grad.shape, kernel.shape
    grad_rows = grad.reshape(-1, grad.shape[-1])

    def tap(offset):  # one input window at a time (unrolled, XLA:CPU held all at once)
        window = jax.lax.dynamic_slice(padded, (0, 0, offset[0], offset[1]),
                                       (channels, n, height, width))
        return jax.lax.dot_general(window.reshape(channels, -1), grad_rows,
                                   (((1,), (0,)), ((), ())))

    offsets = jnp.stack(jnp.meshgrid(jnp.arange(kh), jnp.arange(kw), indexing="ij"), -1)
    return grad_x, jax.lax.map(tap, offsets.reshape(-1, 2)).reshape(kernel.shape)


_conv_same.defvjp(_conv_same_forward, _conv_same_backward)


class Conv(nnx.Conv):
    """nnx.Conv (same parameters, dtype promotion) for NHWC stride-1 convolutions whose
    padding keeps the size (UPerNet's 1x1 and 3x3 ConvModules and classifiers), with faster
    gradients: a 1x1 convolution is `matmul_bias` (XLA:CPU ran autodiff's 1x1 kernel gradient at
    ~11 GFLOP/s: 0.21 s for 768 -> 768 channels at 32 x 32, batch 2); on the CPU backend a
    larger one is `_conv_same` (forward bit for bit nnx.Conv's). Anything else (strides,
    dilation, groups, masks, precision, other backends' k x k) is nnx.Conv.
    """

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        kh, kw = self.kernel_size if len(self.kernel_size) == 2 else (0, 0)
        same = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
        padding = self.padding
        if isinstance(padding, int):
            padding = [(padding, padding)] * 2
        elif not isinstance(padding, str):
            padding = [tuple(p) if isinstance(p, tuple | list) else (p, p) for p in padding]
        plain = (inputs.ndim != 4 or kh % 2 == 0 or kw % 2 == 0 or out_sharding is not None
                 or (padding != "SAME" and padding != same)
                 or any(v not in (None, 1, (1, 1)) for v in
                        (self.strides, self.input_dilation, self.kernel_dilation))
                 or self.feature_group_count != 1 or self.mask is not None
                 or self.precision is not None or self.preferred_element_type is not None
                 or self.conv_general_dilated is not jax.lax.conv_general_dilated
                 or ((kh, kw) != (1, 1)
                     and (not PER_TAP_KERNEL_GRAD or jax.default_backend() != "cpu")))
        if plain:
            return super().__call__(inputs, out_sharding)
        inputs, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], self.bias[...] if self.bias is not None else None),
            dtype=self.dtype)
        if (kh, kw) == (1, 1):
            return matmul_bias(inputs, kernel[0, 0], bias)
        y = _conv_same(inputs, kernel, tuple(same))
        return y if bias is None else y + jnp.reshape(bias, (1, 1, 1, -1))


class PatchDeconv(nnx.ConvTranspose):
    """nnx.ConvTranspose with kernel == strides and VALID padding (mmseg's 2x2 / stride 2
    upsampling deconvolutions): same parameters, computed as one matrix product.

    Such a deconvolution writes each input pixel into its own kh x kw output block: y[n, kh*i
    + a, kw*j + b] = x[n, i, j] @ kernel[kh-1-a, kw-1-b] + bias (lax.conv_transpose does not
    flip the kernel, the lhs-dilated convolution it lowers to reads it backwards). Here
    that is `matmul_bias` over [I, kh*kw*O] and one transpose of the blocks into place. XLA:CPU
    runs the lhs-dilated convolution's kernel gradient as a direct loop (2.6 s of a 9.7 s ViT-B
    UPerNet step at 128 px, batch 2); as a product it is one [pixels, I]^T x [pixels, 4*O].
    Other settings fall back to nnx.ConvTranspose.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        plain = (self.bias is None or tuple(self.strides or ()) != (kh, kw)
                 or self.padding != "VALID" or self.transpose_kernel or inputs.ndim != 4
                 or any(d != 1 for d in (self.kernel_dilation or (1, 1)))
                 or self.precision is not None or self.preferred_element_type is not None)
        if plain:
            return super().__call__(inputs)
        inputs, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], self.bias[...]), dtype=self.dtype)
        n, h, w, _ = inputs.shape
        out = kernel.shape[-1]
        blocks = jnp.transpose(kernel[::-1, ::-1], (2, 0, 1, 3)).reshape(-1, kh * kw * out)
        y = matmul_bias(inputs, blocks, jnp.tile(bias, kh * kw)).reshape(n, h, w, kh, kw, out)
        return jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(n, h * kh, w * kw, out)
