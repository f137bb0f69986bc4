"""The hand-written derivatives behind the fast train step: LayerNorm's custom VJP, the
output-only softmax JVP, the einsum XLA attention, the recomputed GELU, Linear's VJP, the
2x2 deconvolution as a product and the convolutions' kernel gradients.

Each is pinned against references we did not write: the forward against nnx.LayerNorm /
jax.nn.softmax / jax.nn.dot_product_attention / nnx.Linear / nnx.ConvTranspose / nnx.Conv (same
float32 bits where the operations are the same), the gradients against jax autodiff of the
plain formulas and against torch autograd (torch.nn.functional.layer_norm /
scaled_dot_product_attention / gelu / linear / conv_transpose2d / conv2d).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mae_jax.models import convolution, layers
from mae_jax.models.attention import attention, softmax, xla_attention
from mae_jax.models.convolution import Conv, PatchDeconv
from mae_jax.models.layers import LAYER_NORM_EPS, LayerNorm, Linear
from mae_jax.models.vit import gelu

N, T, H, DH, D = 2, 7, 3, 8, 16


def normal(seed, shape, dtype=jnp.float32, scale=1.0, shift=0.0):
    return (shift + scale * jax.random.normal(jax.random.PRNGKey(seed), shape)).astype(dtype)


def plain_layer_norm(x, scale, bias):
    """The textbook formula, for jax autodiff."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + LAYER_NORM_EPS) * scale + bias


def make_layer_norm(output_dtype=jnp.float32):
    norm = LayerNorm(D, output_dtype=output_dtype, rngs=nnx.Rngs(0))
    # Non-trivial affine parameters, so their gradients and the scale's role are exercised.
    norm.scale[...] = normal(1, (D,), scale=0.5, shift=1.0)
    norm.bias[...] = normal(2, (D,), scale=0.5)
    return norm


def layer_norm_grads(norm, x, cotangent, *, plain=False):
    """Gradients of <norm(x), cotangent> w.r.t. (x, scale, bias); `plain`: of the formula."""
    graphdef, params, rest = nnx.split(norm, nnx.Param, ...)

    def loss(x, params):
        if plain:
            y = plain_layer_norm(x, params["scale"][...], params["bias"][...])
            y = y.astype(norm.output_dtype)
        else:
            y = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y.astype(jnp.float32) * cotangent)

    grad_x, grad_params = jax.grad(loss, argnums=(0, 1))(x, params)
    return grad_x, grad_params["scale"][...], grad_params["bias"][...]


def test_layer_norm_forward_is_nnx_layer_norm_bit_for_bit():
    norm = make_layer_norm()
    reference = nnx.LayerNorm(D, epsilon=LAYER_NORM_EPS, use_fast_variance=False,
                              rngs=nnx.Rngs(0))
    reference.scale[...], reference.bias[...] = norm.scale[...], norm.bias[...]
    # A large mean next to the spread: the two-pass variance matters here.
    x = normal(3, (N, T, D), scale=2.0, shift=100.0)
    np.testing.assert_array_equal(jax.jit(norm)(x), jax.jit(reference)(x))


def test_layer_norm_gradients_match_autodiff_and_torch():
    norm = make_layer_norm()
    x = normal(3, (N, T, D), scale=2.0, shift=3.0)
    cotangent = normal(4, (N, T, D))
    ours = jax.jit(lambda x: layer_norm_grads(norm, x, cotangent))(x)
    plain = layer_norm_grads(norm, x, cotangent, plain=True)
    for got, want in zip(ours, plain, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    xt = torch.tensor(np.asarray(x), requires_grad=True)
    scale = torch.tensor(np.asarray(norm.scale[...]), requires_grad=True)
    bias = torch.tensor(np.asarray(norm.bias[...]), requires_grad=True)
    y = torch.nn.functional.layer_norm(xt, (D,), scale, bias, eps=LAYER_NORM_EPS)
    (y * torch.tensor(np.asarray(cotangent))).sum().backward()
    for got, want in zip(ours, (xt.grad, scale.grad, bias.grad), strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_layer_norm_bf16_input_and_output_gradients_match_autodiff():
    norm = make_layer_norm(output_dtype=jnp.bfloat16)
    x = normal(3, (N, T, D), jnp.bfloat16, scale=2.0)
    cotangent = normal(4, (N, T, D))
    assert norm(x).dtype == jnp.bfloat16
    ours = layer_norm_grads(norm, x, cotangent)
    plain = layer_norm_grads(norm, x, cotangent, plain=True)
    assert ours[0].dtype == jnp.bfloat16 and ours[1].dtype == jnp.float32
    for got, want in zip(ours, plain, strict=True):
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=2e-2, atol=2e-2)


def test_layer_norm_with_mask_keeps_nnx_behaviour():
    norm = make_layer_norm()
    x = normal(3, (N, T, D))
    mask = jnp.arange(D) < D // 2
    reference = nnx.LayerNorm(D, epsilon=LAYER_NORM_EPS, use_fast_variance=False,
                              rngs=nnx.Rngs(0))
    reference.scale[...], reference.bias[...] = norm.scale[...], norm.bias[...]
    np.testing.assert_array_equal(norm(x, mask=mask), reference(x, mask=mask))


def test_softmax_matches_jax_softmax_and_its_derivatives():
    x = normal(5, (N, H, T, T), scale=3.0)
    np.testing.assert_array_equal(jax.jit(softmax)(x), jax.jit(jax.nn.softmax)(x))
    cotangent = normal(6, x.shape)
    got = jax.grad(lambda x: jnp.sum(softmax(x) * cotangent))(x)
    want = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x) * cotangent))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Forward mode too (the rule is a JVP; the VJP is its transpose).
    tangent = normal(7, x.shape)
    _, got = jax.jvp(softmax, (x,), (tangent,))
    _, want = jax.jvp(jax.nn.softmax, (x,), (tangent,))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def attention_inputs(dtype=jnp.float32):
    return tuple(normal(seed, (N, T, H, DH), dtype) for seed in (10, 11, 12))


def attention_grads(fn, q, k, v, bias, cotangent):
    def loss(q, k, v, bias):
        return jnp.sum(fn(q, k, v, bias=bias).astype(jnp.float32) * cotangent)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)


@pytest.mark.parametrize("bias_batch", [1, N])
def test_xla_attention_matches_jax_dot_product_attention(bias_batch):
    q, k, v = attention_inputs()
    bias = normal(13, (bias_batch, H, T, T))
    cotangent = normal(14, (N, T, H, DH))

    def reference(q, k, v, *, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")

    np.testing.assert_allclose(jax.jit(xla_attention)(q, k, v, bias=bias),
                               jax.jit(reference)(q, k, v, bias=bias), rtol=1e-6, atol=1e-6)
    got = attention_grads(xla_attention, q, k, v, bias, cotangent)
    want = attention_grads(reference, q, k, v, bias, cotangent)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

    # torch autograd of scaled_dot_product_attention ([N, H, T, Dh] layout, additive mask).
    tq, tk, tv = (torch.tensor(np.asarray(a).transpose(0, 2, 1, 3), requires_grad=True)
                  for a in (q, k, v))
    tbias = torch.tensor(np.asarray(bias), requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tbias)
    (out * torch.tensor(np.asarray(cotangent).transpose(0, 2, 1, 3))).sum().backward()
    for g, t in zip(got[:3], (tq, tk, tv), strict=True):
        np.testing.assert_allclose(g, t.grad.numpy().transpose(0, 2, 1, 3), rtol=1e-4,
                                   atol=1e-5)
    np.testing.assert_allclose(got[3], tbias.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_xla_attention_bf16_with_float32_bias_matches_float32_formula():
    q, k, v = attention_inputs(jnp.bfloat16)
    bias = normal(13, (1, H, T, T))
    cotangent = normal(14, (N, T, H, DH))
    out = xla_attention(q, k, v, bias=bias)
    assert out.dtype == jnp.bfloat16

    def plain(q, k, v, *, bias):
        """The formula in float32 from the same bf16 values."""
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(DH) + bias
        return jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits), v)

    np.testing.assert_allclose(np.float32(out), plain(q, k, v, bias=bias), rtol=2e-2, atol=2e-2)
    got = attention_grads(xla_attention, q, k, v, bias, cotangent)
    want = attention_grads(plain, q, k, v, bias, cotangent)
    assert [g.dtype for g in got] == [jnp.bfloat16] * 3 + [jnp.float32]
    for g, w in zip(got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.float32(g), np.float32(w), atol=3e-2 * scale)
    # And jax's own XLA attention on the same bf16 inputs agrees about as closely.
    jax_out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")
    np.testing.assert_allclose(np.float32(out), np.float32(jax_out), atol=1e-2)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN attention needs an NVIDIA GPU (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("shape, with_bias, train, kv_tokens", [
    ((8, 50, 12, 64), False, True, None),  # MAE ViT-B/16 encoder at 224 px: 49 visible + cls
    ((8, 197, 16, 32), False, True, None),  # the MAE decoder (512 wide, 16 heads)
    # Its last block in MAE.loss: the 147 removed patches' queries against all 197 tokens.
    ((8, 147, 16, 32), False, True, 197),
    ((2, 1025, 12, 64), True, False, None),  # ViT-B + UPerNet's 512 px window, relative bias
    ((2, 1025, 12, 64), True, True, None),  # ... and its train step
])
def test_auto_attention_compiles_on_the_gpu_and_matches_xla_attention(shape, with_bias, train,
                                                                      kv_tokens):
    """The bf16 steps use implementation="auto": cuDNN's fused kernel where it takes the shape.
    Its fallback catches what cuDNN rejects while tracing; a rejection when XLA compiles would
    crash the step instead, so each shape the benchmarks run is compiled here, forward and
    (where trained) backward, against xla_attention on the same bf16 inputs."""
    kv_shape = shape if kv_tokens is None else (shape[0], kv_tokens, *shape[2:])
    q = normal(20, shape, jnp.bfloat16)
    k, v = (normal(seed, kv_shape, jnp.bfloat16) for seed in (21, 22))
    bias = normal(23, (1, shape[2], shape[1], shape[1])) if with_bias else None
    auto = functools.partial(attention, implementation="auto")

    def relative_error(got, want):
        got, want = np.float32(got), np.float32(want)
        return np.linalg.norm(got - want) / np.linalg.norm(want)

    out = jax.jit(auto)(q, k, v, bias=bias)
    assert relative_error(out, jax.jit(xla_attention)(q, k, v, bias=bias)) < 2e-2
    if train:
        cotangent = normal(24, shape)
        got = attention_grads(auto, q, k, v, bias, cotangent)
        want = attention_grads(xla_attention, q, k, v, bias, cotangent)
        for g, w in zip(got, want, strict=True):
            if w is not None:
                assert relative_error(g, w) < 3e-2


def test_attention_rejects_an_unknown_implementation():
    q, k, v = attention_inputs()
    with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
        attention(q, k, v, implementation="flash")


def test_recomputed_gelu_matches_torch_exact_gelu_and_its_gradient():
    """torch's formula x / 2 * (1 + erf(x / sqrt(2))): within float32 rounding of torch's
    nn.GELU() and of jax.nn.gelu(approximate=False) (the erfc form); gradients as torch's."""
    x = normal(20, (N, T, 4 * D), scale=3.0)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    yt = torch.nn.functional.gelu(xt)
    y = jax.jit(gelu)(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(gelu(x) ** 2)))(x)
    (yt ** 2).sum().backward()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    # Far in the negative tail: exactly torch's values (0; the erfc form gives -7.6e-23 at -10).
    tail = jnp.asarray([-30.0, -10.0, 0.0, 10.0])
    np.testing.assert_array_equal(
        gelu(tail), torch.nn.functional.gelu(torch.tensor(np.asarray(tail))).numpy())


def layer_grads(layer, x, cotangent, dtype):
    """layer(x in dtype), jitted, and the gradients of sum(y * cotangent) w.r.t. x, the
    kernel and the bias."""
    graphdef, params = nnx.split(layer, nnx.Param)

    def loss(x, params):
        y = nnx.merge(graphdef, params)(x.astype(dtype))
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

    (_, y), (grad_x, grad_params) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params)
    bias = grad_params["bias"][...] if "bias" in grad_params else None
    return y, grad_x, grad_params["kernel"][...], bias


def assert_grads_close(got, expected, dtype, bf16_tolerance=2 ** -6):
    """float32: to summation order; bfloat16 compute: to bf16 rounding of the largest value."""
    for a, b in zip(got, expected, strict=True):
        if b is None:
            assert a is None
            continue
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        atol = 1e-5 if dtype == jnp.float32 else bf16_tolerance * np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=1e-5 if dtype == jnp.float32 else 0, atol=atol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_is_nnx_linear_forward_and_gradients_match_autodiff_and_torch(dtype):
    """layers.Linear (custom VJP) vs nnx.Linear with the same parameters: forward bit for bit
    (bfloat16 on the CPU: the same float32 sums rounded once, `layers._dot`; equal at this size);
    gradients of x, kernel and bias against jax autodiff of nnx.Linear (float32: to summation
    order; bfloat16 compute with float32 parameters: to bf16 rounding) and, in float32, against
    torch.nn.functional.linear autograd. bfloat16: the kernel gradient is also pinned against the
    exact (float64) sum of the bf16 operands' products, to which ours is correctly rounded. Autodiff
    is not, under jax 0.11.2 (the GPU machine's version): its weight gradient's sums round in
    bf16 along the way, 4x ours' error here (2 bf16 steps off at the largest values)."""
    ours = Linear(D, 3 * D, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ours.bias[...] = normal(21, (3 * D,))
    reference = nnx.Linear(D, 3 * D, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    reference.bias[...] = ours.bias[...]
    x, cotangent = normal(22, (N, T, D)), normal(23, (N, T, 3 * D))

    y, *got = layer_grads(ours, x, cotangent, dtype)
    y_ref, *expected = layer_grads(reference, x, cotangent, dtype)
    np.testing.assert_array_equal(y, y_ref)
    # bfloat16: sums of 14 bf16 products, rounded to bf16 (8 bits) once (ours; autodiff under
    # jax 0.10) or along the way (autodiff under jax 0.11: up to 2 ** -6.7 of the largest).
    assert_grads_close(got, expected, dtype, bf16_tolerance=2 ** -6)
    if dtype == jnp.bfloat16:
        rows = np.asarray(x.astype(dtype), np.float64).reshape(N * T, D)
        grad_rows = np.asarray(cotangent.astype(dtype), np.float64).reshape(N * T, 3 * D)
        exact = rows.T @ grad_rows
        # Correctly rounded: within half a bf16 step (2 ** -8 relative), plus float32's own
        # summation-order error.
        np.testing.assert_allclose(np.asarray(got[1], np.float64), exact,
                                   rtol=2 ** -8 * (1 + 2 ** -10), atol=1e-6)
    if dtype == jnp.float32:
        xt = torch.tensor(np.asarray(x), requires_grad=True)
        kernel = torch.tensor(np.asarray(ours.kernel[...]).T.copy(), requires_grad=True)
        bias = torch.tensor(np.asarray(ours.bias[...]), requires_grad=True)
        out = torch.nn.functional.linear(xt, kernel, bias)
        (out * torch.tensor(np.asarray(cotangent))).sum().backward()
        np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-5, atol=1e-5)
        for a, b in zip(got, (xt.grad, kernel.grad.T, bias.grad), strict=True):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)


def test_bf16_linear_on_the_cpu_is_the_float32_product_rounded_once():
    """The CPU's bfloat16 products take a float32 result rounded once to bfloat16
    (`layers._dot`): against numpy's float64 product of the same bf16 values, rounded, at
    most one bf16 step apart, and rarely that (summation order); the gradients likewise."""
    x = normal(30, (4, 96, 768)).astype(jnp.bfloat16)
    kernel = normal(31, (768, 3072), scale=0.03).astype(jnp.bfloat16)
    y = jax.jit(lambda x, k: layers._matmul(x, k))(x, kernel)
    assert y.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    rounded = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16), np.float32)
    got = np.asarray(y, np.float32)
    step = np.abs(rounded) * 2.0 ** -7  # one bf16 step (8 significant bits), at most ...
    assert (np.abs(got - rounded) <= step + 1e-6).all()  # ... or float32's error near 0
    assert (got != rounded).mean() < 0.01
    cotangent = normal(32, y.shape).astype(jnp.bfloat16)
    grad_x, grad_k = jax.jit(jax.grad(
        lambda x, k: jnp.sum(layers._matmul(x, k).astype(jnp.float32) * cotangent),
        argnums=(0, 1)))(x, kernel)
    c64 = np.asarray(cotangent, np.float64)
    for got, exact in ((grad_x, c64 @ np.asarray(kernel, np.float64).T),
                       (grad_k, np.asarray(x, np.float64).reshape(-1, 768).T
                        @ c64.reshape(-1, 3072))):
        assert got.dtype == jnp.bfloat16
        error = np.abs(np.asarray(got, np.float64) - exact)
        assert (error <= np.abs(exact) * 2.0 ** -7 + 1e-3 * np.abs(exact).max()).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_patch_deconv_is_conv_transpose_forward_and_gradients_match_autodiff_and_torch(dtype):
    """convolution.PatchDeconv (2x2 / stride 2 as one product) vs nnx.ConvTranspose with the same
    parameters: forward and the gradients of x, kernel and bias against jax autodiff of
    nnx.ConvTranspose (float32: to summation order; bf16 compute: to bf16 rounding) and, in
    float32, against torch.nn.functional.conv_transpose2d autograd (the weight [I, O, kh, kw]
    with the kernel's taps flipped, as the mmseg converter loads it)."""
    settings = dict(strides=(2, 2), padding="VALID", dtype=dtype, param_dtype=jnp.float32)
    ours = PatchDeconv(D, 6, (2, 2), rngs=nnx.Rngs(0), **settings)
    ours.bias[...] = normal(31, (6,))
    reference = nnx.ConvTranspose(D, 6, (2, 2), rngs=nnx.Rngs(0), **settings)
    reference.bias[...] = ours.bias[...]
    x, cotangent = normal(32, (N, 3, 5, D)), normal(33, (N, 6, 10, 6))
    y, *got = layer_grads(ours, x, cotangent, dtype)
    y_ref, *expected = layer_grads(reference, x, cotangent, dtype)
    assert y.shape == y_ref.shape == (N, 6, 10, 6) and y.dtype == y_ref.dtype
    # bfloat16: sums of D (x, y) or up to 2 N 3 5 (kernel, bias) products, rounded to bf16.
    assert_grads_close((y, *got), (y_ref, *expected), dtype)
    if dtype == jnp.float32:
        xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=True)
        weight = np.asarray(ours.kernel[...])[::-1, ::-1].transpose(2, 3, 0, 1).copy()
        weight = torch.tensor(weight, requires_grad=True)
        bias = torch.tensor(np.asarray(ours.bias[...]), requires_grad=True)
        out = torch.nn.functional.conv_transpose2d(xt, weight, bias, stride=2)
        (out * torch.tensor(np.asarray(cotangent).transpose(0, 3, 1, 2).copy())).sum().backward()
        np.testing.assert_allclose(y, out.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5,
                                   atol=1e-5)
        grad_weight = weight.grad.numpy().transpose(2, 3, 0, 1)[::-1, ::-1]
        for a, b in zip(got, (xt.grad.numpy().transpose(0, 2, 3, 1), grad_weight,
                              bias.grad.numpy()), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size, padding, use_bias",
                         [(1, "SAME", True), (3, 1, False), (3, "SAME", True), (5, 2, False)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_is_nnx_conv_forward_and_gradients_match_autodiff_and_torch(
        kernel_size, padding, use_bias, dtype):
    """convolution.Conv (1x1: `matmul_bias`; k x k on the CPU: `_conv_same`'s per-tap kernel
    gradient) vs nnx.Conv with the same parameters: forward (k x k: the same bits) and the
    gradients of x, kernel and bias against jax autodiff of nnx.Conv (float32: to summation
    order; bf16 compute: to bf16 rounding) and, in float32, against
    torch.nn.functional.conv2d autograd."""
    settings = dict(padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32)
    size = (kernel_size, kernel_size)
    ours = Conv(D, 6, size, rngs=nnx.Rngs(0), **settings)
    reference = nnx.Conv(D, 6, size, rngs=nnx.Rngs(0), **settings)
    if use_bias:
        ours.bias[...] = reference.bias[...] = normal(41, (6,))
    x, cotangent = normal(42, (N, 5, 7, D)), normal(43, (N, 5, 7, 6))
    y, *got = layer_grads(ours, x, cotangent, dtype)
    y_ref, *expected = layer_grads(reference, x, cotangent, dtype)
    assert y.shape == y_ref.shape == (N, 5, 7, 6) and y.dtype == y_ref.dtype
    if kernel_size > 1:
        np.testing.assert_array_equal(y, y_ref)
    assert_grads_close((y, *got), (y_ref, *expected), dtype)
    if dtype == jnp.float32:
        xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=True)
        weight = torch.tensor(np.asarray(ours.kernel[...]).transpose(3, 2, 0, 1).copy(),
                              requires_grad=True)
        bias = torch.tensor(np.asarray(ours.bias[...]), requires_grad=True) if use_bias else None
        out = torch.nn.functional.conv2d(xt, weight, bias, padding=kernel_size // 2)
        (out * torch.tensor(np.asarray(cotangent).transpose(0, 3, 1, 2).copy())).sum().backward()
        np.testing.assert_allclose(y, out.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5,
                                   atol=1e-5)
        torch_grads = (xt.grad.numpy().transpose(0, 2, 3, 1),
                       weight.grad.numpy().transpose(2, 3, 1, 0),
                       bias.grad.numpy() if use_bias else None)
        assert_grads_close(got, torch_grads, dtype)


def test_conv_per_tap_kernel_gradient_holds_one_input_window_at_a_time(monkeypatch):
    """XLA's temp memory for a 3x3 Conv's gradients (batch 2, 32 x 32, 64 -> 64 channels):
    the per-tap kernel gradient needs less than three input windows more than autodiff's (the
    padded input, its channels-first copy, one window; ~nine when its taps were unrolled)."""
    x, cotangent = normal(51, (2, 32, 32, 64)), normal(52, (2, 32, 32, 64))
    window = x.size * 4  # bytes of one float32 input window

    def temp_bytes(per_tap):
        monkeypatch.setattr(convolution, "PER_TAP_KERNEL_GRAD", per_tap)
        graphdef, params = nnx.split(Conv(64, 64, (3, 3), padding=1, rngs=nnx.Rngs(0)))

        def loss(x, params):
            return jnp.sum(nnx.merge(graphdef, params)(x) * cotangent)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_tap, autodiff = temp_bytes(True), temp_bytes(False)
    assert per_tap < autodiff + 3 * window, (per_tap, autodiff, window)
