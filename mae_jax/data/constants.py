"""ImageNet normalisation constants shared by the data pipeline, training and figures.

Kept free of TensorFlow so that visualisation and evaluation code can import it anywhere.
"""

import numpy as np

# Per-channel RGB statistics of ImageNet for images scaled to [0, 1] (torchvision / official MAE).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
