"""ImageNet normalisation constants shared by the data pipeline, training and figures.

Kept free of TensorFlow so that visualisation and evaluation code can import it anywhere.
"""

import numpy as np

# Per-channel RGB statistics of ImageNet for images scaled to [0, 1] (torchvision / official MAE).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean as a uint8 colour, timm's `img_mean` fill (124, 116, 104): padding a uint8 image with
# it gives ~0 after normalisation (within rounding), as padding the normalised image with 0 does.
IMAGENET_MEAN_UINT8 = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)
# (x / 255 - mean) / std as one multiply-add per pixel.
_UINT8_SCALE = np.asarray([1 / (255 * s) for s in IMAGENET_STD], np.float32)
_UINT8_OFFSET = np.asarray([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)],
                           np.float32)


def _check_channels_last(images) -> None:
    if images.shape[-1] != 3:
        raise ValueError(
            f"expected channels-last RGB images [..., H, W, 3], got shape {tuple(images.shape)}; "
            "transpose NCHW arrays to NHWC first"
        )


def normalize(images01):
    """Maps RGB values in [0, 1] to ImageNet-normalised values.

    images01: [..., H, W, 3] numpy or jax array in [0, 1] -> same shape, float.
    """
    _check_channels_last(images01)
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    return (images01 - mean) / std


def normalize_uint8(images):
    """The input pipelines' uint8 pixels -> ImageNet-normalised float32, on device.

    images: [..., H, W, 3] uint8 (0-255) numpy or jax array, also inside jit -> same shape,
    float32 (x / 255 - mean) / std. The pipelines ship uint8 (4x fewer bytes to the device);
    the task libraries call this first thing in their jitted steps.
    """
    _check_channels_last(images)
    if images.dtype != np.uint8:
        raise ValueError(f"normalize_uint8 expects uint8 pixels (0-255), got {images.dtype}; "
                         "use `normalize` for images already scaled to [0, 1]")
    return images.astype(np.float32) * _UINT8_SCALE + _UINT8_OFFSET


def denormalize(images):
    """Inverse of `normalize`, clipped to [0, 1] so results can be shown as pictures.

    images: [..., H, W, 3] numpy or jax array (normalised) -> same shape, float in [0, 1].
    """
    _check_channels_last(images)
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    restored = images * std + mean
    # Works for numpy and jax arrays alike: both expose `.clip`.
    return restored.clip(0.0, 1.0)
