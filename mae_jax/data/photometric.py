"""mmseg's PhotoMetricDistortion on the accelerator, inside the jitted train step (no TensorFlow).

The host draws each example's parameters (`mae_jax.data.seg_transforms.photometric_params`, the
same draws as the host-side distortion) and ships them with the uint8 crop; this applies them to
the batch. Results equal `seg_transforms.photometric_distortion` bit for bit, hence OpenCV's
uint8 HSV round trips as mmseg runs them (tests/test_transform_parity.py checks the conversions
on every RGB colour and HSV triple against OpenCV, and whole batches against mmseg's steps).

Per example the parameters are a float32 row (PARAMS order):
  beta            brightness offset (0: off; x + 0 leaves uint8 values as they are)
  alpha_before    contrast factor applied before the HSV steps (1: off)
  saturation_on   1 / 0
  saturation      S factor
  hue_on          1 / 0
  hue_steps       H offset in OpenCV's 2-degree units
  alpha_after     contrast factor applied after the HSV steps (1: off)
  height, width   the crop inside the padded image: the padding (rows >= height or columns >=
                  width) keeps its value

Exactness on any backend: the float steps of OpenCV's HSV -> RGB that could be fused into
multiply-adds by a compiler (1 - s * h, computed fused by OpenCV's vector code; h's sector and
fraction; 1 - s) come from tables indexed by the uint8 H and S, computed here once in numpy;
what runs on device is integer arithmetic, selects, and float multiplies or adds of one kind.
Every branch is computed for every image and chosen with selects (static shapes, one program).
"""

import jax.numpy as jnp
import numpy as np

PARAMS = ("beta", "alpha_before", "saturation_on", "saturation", "hue_on", "hue_steps",
          "alpha_after", "height", "width")
NUM_PARAMS = len(PARAMS)

# OpenCV's uint8 RGB -> HSV (color_hsv: RGB2HSV_b): 12-bit fixed point with rounded tables.
HSV_SHIFT = 12
_DIVISORS = np.arange(1, 256, dtype=np.float64)
SDIV = np.concatenate([[0], np.rint((255 << HSV_SHIFT) / _DIVISORS)]).astype(np.int32)
HDIV = np.concatenate([[0], np.rint((180 << HSV_SHIFT) / (6.0 * _DIVISORS))]).astype(np.int32)


def _hsv_to_rgb_tables():
    """Per (H, S) factors of OpenCV's float32 HSV2RGB: sector [180] int32, and [180 * 256]
    float32 1 - s (indexed by S only, repeated), 1 - s * f and 1 - s * (1 - f) (each rounded
    once, as the fused multiply-subtract of OpenCV's vector code), f = fraction of H * 6 / 180."""
    h = np.arange(180, dtype=np.float32) * np.float32(6.0 / 180.0)
    sector = np.floor(h)
    fraction = (h - sector).astype(np.float32)
    s = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
    one_minus_s = np.broadcast_to((np.float32(1.0) - s)[None, :], (180, 256))
    s64, f64 = s.astype(np.float64)[None, :], fraction.astype(np.float64)[:, None]
    q = (1.0 - s64 * f64).astype(np.float32)
    t = (1.0 - s64 * (np.float32(1.0) - fraction).astype(np.float64)[:, None]).astype(np.float32)
    return (sector.astype(np.int32), np.ascontiguousarray(one_minus_s).reshape(-1),
            q.reshape(-1), t.reshape(-1))


_SECTOR, _ONE_MINUS_S, _ONE_MINUS_SF, _ONE_MINUS_S1F = _hsv_to_rgb_tables()


def neutral_params(height: int, width: int) -> list[float]:
    """A PARAMS row that leaves a height x width crop as it is (every step off)."""
    return [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, height, width]


def rgb_to_hsv(image):
    """cv2.cvtColor(image, COLOR_RGB2HSV) on uint8 [..., 3]: H 0..179, S and V 0..255 (int32)."""
    rgb = image.astype(jnp.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = jnp.maximum(jnp.maximum(r, g), b)
    diff = v - jnp.minimum(jnp.minimum(r, g), b)
    half = 1 << (HSV_SHIFT - 1)
    s = jnp.right_shift(diff * jnp.asarray(SDIV)[v] + half, HSV_SHIFT)
    h = jnp.where(v == r, g - b, jnp.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = jnp.right_shift(h * jnp.asarray(HDIV)[diff] + half, HSV_SHIFT)  # arithmetic: floor
    return jnp.where(h < 0, h + 180, h), s, v


def sector_rgb(sector, v, p, q, t, where):
    """OpenCV's HSV -> RGB sector table, (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v)
    (v,p,q) for sectors 0..5; `where` is jnp.where here, tf.where on the host
    (`seg_photometric`)."""
    r = where((sector == 0) | (sector == 5), v, where(sector == 1, q, where(sector == 4, t, p)))
    g = where((sector == 1) | (sector == 2), v, where(sector == 0, t, where(sector == 3, q, p)))
    b = where((sector == 3) | (sector == 4), v, where(sector == 2, t, where(sector == 5, q, p)))
    return r, g, b


def hsv_to_rgb(h, s, v):
    """cv2.cvtColor(hsv, COLOR_HSV2RGB) on uint8 values (int32 H 0..179, S, V 0..255), as
    OpenCV's vector code computes it: float32, times 255, truncated. Returns uint8 [..., 3]."""
    index = h * 256 + s
    sector = jnp.asarray(_SECTOR)[h]
    v = v.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
    p = v * jnp.asarray(_ONE_MINUS_S)[index]
    q = v * jnp.asarray(_ONE_MINUS_SF)[index]
    t = v * jnp.asarray(_ONE_MINUS_S1F)[index]
    rgb = jnp.stack(sector_rgb(sector, v, p, q, t, jnp.where), axis=-1) * jnp.float32(255.0)
    return jnp.clip(rgb, 0.0, 255.0).astype(jnp.uint8)  # the conversion truncates


def _to_uint8(values):
    """mmseg's convert(): clip to [0, 255], then astype(uint8) (truncates)."""
    return jnp.clip(values, 0.0, 255.0).astype(jnp.uint8)


def _per_image(values, ndim):
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def apply_photometric(images, params):
    """PhotoMetricDistortion of a batch: images uint8 [B, H, W, 3], params float32 [B, 9]
    (PARAMS) -> uint8 [B, H, W, 3]. Padding outside each example's height x width is kept."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if params.shape != (images.shape[0], NUM_PARAMS):
        raise ValueError(f"params must be [{images.shape[0]}, {NUM_PARAMS}] ({', '.join(PARAMS)}"
                         f"), got {tuple(params.shape)}")
    column = {name: _per_image(params[:, i], 4) for i, name in enumerate(PARAMS)}
    out = _to_uint8(images.astype(jnp.float32) + column["beta"])
    out = _to_uint8(out.astype(jnp.float32) * column["alpha_before"])
    h, s, v = rgb_to_hsv(out)
    saturated = _to_uint8(s.astype(jnp.float32) * column["saturation"][..., 0]).astype(jnp.int32)
    out = jnp.where(column["saturation_on"] > 0, hsv_to_rgb(h, saturated, v), out)
    h, s, v = rgb_to_hsv(out)
    hue = jnp.mod(h + column["hue_steps"][..., 0].astype(jnp.int32), 180)
    out = jnp.where(column["hue_on"] > 0, hsv_to_rgb(hue, s, v), out)
    out = _to_uint8(out.astype(jnp.float32) * column["alpha_after"])
    rows = jnp.arange(images.shape[1], dtype=jnp.float32)[None, :, None, None]
    cols = jnp.arange(images.shape[2], dtype=jnp.float32)[None, None, :, None]
    inside = (rows < column["height"]) & (cols < column["width"])
    return jnp.where(inside, out, images)
