"""Mixup / CutMix in timm's 'batch' mode, label smoothing and the fine-tuning losses, in JAX.

The official MAE fine-tuning recipe builds ``timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0,
cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode='batch', label_smoothing=0.1,
num_classes=N)`` and trains with ``SoftTargetCrossEntropy`` (``LabelSmoothingCrossEntropy(0.1)``
when mixup is off, plain cross-entropy when smoothing is 0 as well). In 'batch' mode timm draws
one set of parameters per batch:

  * with probability ``prob`` the batch is mixed, otherwise ``lam = 1`` (no mixing);
  * if both alphas are > 0, CutMix is used with probability ``switch_prob``, Mixup otherwise;
    ``lam ~ Beta(alpha, alpha)`` of the chosen method;
  * Mixup: ``x = lam * x + (1 - lam) * x[::-1]``;
  * CutMix: a box from ``rand_bbox`` (side ``int(size * sqrt(1 - lam))``, centre uniform over
    the pixels, halves ``cut // 2`` on each side, clipped to the image) is pasted from
    ``x[::-1]`` and ``lam`` is corrected to ``1 - box area / image area``;
  * targets ``lam * smooth(y) + (1 - lam) * smooth(y[::-1])`` with ``off = smoothing / classes``,
    ``on = 1 - smoothing + off``.

Everything is jit-able with static shapes: the CutMix box is a mask built from iota comparisons,
and the mixup / cutmix choice is a ``jnp.where``. Images are channels-last ``[B, H, W, C]``.
"""

import jax
import jax.numpy as jnp


def _check_images(images):
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"expected float images [B, H, W, C], got {images.dtype} of shape {images.shape}"
        )


def smooth_one_hot(labels, num_classes, smoothing=0.0, dtype=jnp.float32):
    """timm ``one_hot(..., on_value=1 - smoothing + smoothing / K, off_value=smoothing / K)``."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    hot = jax.nn.one_hot(labels, num_classes, dtype=dtype)
    return hot * jnp.asarray(on - off, dtype) + jnp.asarray(off, dtype)


def mixup_target(labels, num_classes, lam=1.0, smoothing=0.0, dtype=jnp.float32):
    """timm ``mixup_target``: ``lam * smooth(y) + (1 - lam) * smooth(flip(y))`` (flip on axis 0)."""
    y1 = smooth_one_hot(labels, num_classes, smoothing, dtype)
    y2 = smooth_one_hot(labels[::-1], num_classes, smoothing, dtype)
    lam = jnp.asarray(lam, dtype)
    return y1 * lam + y2 * (1.0 - lam)


def sample_mix_params(key, *, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0):
    """timm ``Mixup._params_per_batch``: returns ``(lam, use_cutmix)`` as 0-d float32 / bool.

    ``lam`` is 1 (and ``use_cutmix`` False) when the batch is not mixed. Only the alphas must be
    static (Python floats); ``switch_prob`` and ``prob`` may be traced.
    Key use: ``k_apply, k_switch, k_lam = jax.random.split(key, 3)``.
    """
    if mixup_alpha <= 0.0 and cutmix_alpha <= 0.0:
        raise ValueError("one of mixup_alpha > 0 or cutmix_alpha > 0 must hold")
    k_apply, k_switch, k_lam = jax.random.split(key, 3)
    applied = jax.random.uniform(k_apply) < prob
    if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0.0)
    # One Beta draw with the chosen method's alpha (timm draws only that method's Beta too).
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha).astype(jnp.float32)
    lam_mix = jax.random.beta(k_lam, alpha, alpha)
    lam = jnp.where(applied, lam_mix, 1.0).astype(jnp.float32)
    return lam, use_cutmix & applied


def rand_bbox(key, lam, height, width):
    """timm ``rand_bbox`` (no margin): ``(yl, yh, xl, xh)`` int32, rows ``yl:yh``, cols ``xl:xh``.

    ``cut_h = int(H * sqrt(1 - lam))``; ``cy = randint(0, H)`` (exclusive end);
    ``yl = clip(cy - cut_h // 2, 0, H)``, ``yh = clip(cy + cut_h // 2, 0, H)``; same for x.
    Key use: ``k_y, k_x = jax.random.split(key)``.
    """
    k_y, k_x = jax.random.split(key)
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    yl = jnp.clip(cy - cut_h // 2, 0, height)
    yh = jnp.clip(cy + cut_h // 2, 0, height)
    xl = jnp.clip(cx - cut_w // 2, 0, width)
    xh = jnp.clip(cx + cut_w // 2, 0, width)
    return yl, yh, xl, xh


def box_mask(box, height, width):
    """Bool ``[H, W]`` mask of a ``(yl, yh, xl, xh)`` box, from iota comparisons."""
    yl, yh, xl, xh = box
    rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
    return (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)


def mixup_cutmix(
    images,
    labels,
    key,
    *,
    num_classes,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    switch_prob=0.5,
    label_smoothing=0.1,
    prob=1.0,
    group=0,
):
    """timm ``Mixup(mode='batch', correct_lam=True)`` on a batch: returns ``(images, targets)``.

    images: float ``[B, H, W, C]`` (normalised, B even as timm asserts); labels: int ``[B]``;
    key: a JAX key. targets: ``[B, num_classes]`` soft labels in the images' dtype.
    Key use: ``k_params, k_box = jax.random.split(key)``; ``k_params`` goes to
    `sample_mix_params` and ``k_box`` to `rand_bbox`. jit-able (keyword arguments static).

    group=G < B: each run of G images is a batch of its own, as each GPU's batch is in the
    official training (its own lam, method and box; images paired within it), with the keys
    ``jax.random.split(key, B // G)``. B must be a multiple of G, G even.
    """
    _check_images(images)
    if images.shape[0] % 2:
        raise ValueError(f"batch size must be even for mixup / cutmix, got {images.shape[0]}")
    if 0 < group < images.shape[0]:
        if images.shape[0] % group or group % 2:
            raise ValueError(f"mixup groups of {group} images must be even and divide the batch "
                             f"of {images.shape[0]}")
        count = images.shape[0] // group
        options = dict(num_classes=num_classes, mixup_alpha=mixup_alpha,
                       cutmix_alpha=cutmix_alpha, switch_prob=switch_prob,
                       label_smoothing=label_smoothing, prob=prob)
        grouped = jax.vmap(lambda x, y, k: mixup_cutmix(x, y, k, **options))(
            images.reshape(count, group, *images.shape[1:]), labels.reshape(count, group),
            jax.random.split(key, count))
        return grouped[0].reshape(images.shape), grouped[1].reshape(images.shape[0], -1)
    k_params, k_box = jax.random.split(key)
    lam, use_cutmix = sample_mix_params(
        k_params,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        switch_prob=switch_prob,
        prob=prob,
    )
    return mix_batch(
        images,
        labels,
        lam,
        use_cutmix,
        k_box,
        num_classes=num_classes,
        label_smoothing=label_smoothing,
    )


def mix_batch(images, labels, lam, use_cutmix, box_key, *, num_classes, label_smoothing=0.1):
    """timm ``Mixup._mix_batch`` + ``mixup_target`` for given ``(lam, use_cutmix)``.

    The CutMix box is ``rand_bbox(box_key, lam, H, W)`` and ``lam`` is then corrected to
    ``1 - box area / (H W)``. Returns ``(images, targets)`` like `mixup_cutmix`.
    """
    _check_images(images)
    height, width = images.shape[1], images.shape[2]
    lam = jnp.asarray(lam, jnp.float32)
    flipped = images[::-1]
    box = rand_bbox(box_key, lam, height, width)
    inside = box_mask(box, height, width)
    yl, yh, xl, xh = box
    box_area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
    cut_lam = 1.0 - box_area / float(height * width)

    dtype = images.dtype
    pasted = jnp.where(inside[None, :, :, None], flipped, images)
    blended = images * lam.astype(dtype) + flipped * (1.0 - lam).astype(dtype)
    mixed = jnp.where(use_cutmix, pasted, blended)
    lam = jnp.where(use_cutmix, cut_lam, lam)
    # timm leaves the batch untouched when lam == 1 (not mixed); both branches already do that
    # for finite inputs, this also keeps non-finite pixels from leaking through 0 * x.
    mixed = jnp.where(lam == 1.0, images, mixed)
    targets = mixup_target(labels, num_classes, lam, label_smoothing, dtype)
    return mixed, targets


def soft_target_cross_entropy(logits, targets):
    """timm ``SoftTargetCrossEntropy``: mean over the batch of ``sum(-targets * log_softmax)``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(-targets * logp, axis=-1))


def label_smoothing_cross_entropy(logits, labels, smoothing=0.1):
    """timm ``LabelSmoothingCrossEntropy(smoothing)``: batch mean of
    ``(1 - smoothing) * nll + smoothing * mean(-log_softmax)``; plain cross-entropy at 0.

    Equal to `soft_target_cross_entropy` with ``smooth_one_hot(labels, K, smoothing)`` targets.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    smooth = -jnp.mean(logp, axis=-1)
    return jnp.mean((1.0 - smoothing) * nll + smoothing * smooth)
