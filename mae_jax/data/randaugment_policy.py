"""RandAugment's policy as timm 0.3.2 defines it, without TensorFlow: the op lists, the config
string and the magnitude range. `mae_jax.data.randaugment` (TensorFlow, the host path) and
`mae_jax.data.randaugment_draws` (numpy, the draws of the on-device input) both read it.
"""

import re

MAX_LEVEL = 10.0  # timm's _MAX_LEVEL: magnitudes live in [0, 10]

# timm's op lists (the order does not matter for uniform choice; it is the dispatch order here).
RAND_INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


# ---------------------------------------------------------------------------------------------
# Config string
# ---------------------------------------------------------------------------------------------


def parse_rand_augment(config: str) -> dict:
    """Parses a timm RandAugment string such as ``"rand-m9-mstd0.5-inc1"``.

    Returns keyword arguments for `rand_augment`: ``num_layers`` (``n``, default 2),
    ``magnitude`` (``m``, default 10), ``magnitude_std`` (``mstd``, default 0) and
    ``increasing`` (``inc``, default False). Raises ValueError for anything else: other
    policies, the op-weight section ``w`` (timm's non-uniform op choice, not implemented), sections
    without a value, unknown keys and malformed numbers.

    Difference from timm: timm evaluates ``bool("0")`` for ``inc0`` (True), so in timm any ``inc``
    section turns on the increasing ops; here ``inc0`` means off. The official ``inc1`` is the same.
    """
    if not isinstance(config, str) or not config:
        raise ValueError(f"RandAugment config must be a non-empty string, got {config!r}")
    sections = config.split("-")
    if sections[0] != "rand":
        raise ValueError(
            f"unsupported augmentation {config!r}: only timm RandAugment strings starting with "
            "'rand' (e.g. 'rand-m9-mstd0.5-inc1') are supported"
        )
    out = dict(num_layers=2, magnitude=int(MAX_LEVEL), magnitude_std=0.0, increasing=False)
    for section in sections[1:]:
        parts = re.split(r"(\d.*)", section)
        if len(parts) < 2:
            raise ValueError(f"RandAugment config {config!r}: section {section!r} has no value")
        key, val = parts[:2]
        try:
            if key == "m":
                out["magnitude"] = int(val)
            elif key == "n":
                out["num_layers"] = int(val)
            elif key == "mstd":
                out["magnitude_std"] = float(val)
            elif key == "inc":
                out["increasing"] = int(val) != 0
            elif key == "w":
                raise ValueError(
                    f"RandAugment config {config!r}: op weights ('w') are not supported"
                )
            else:
                raise ValueError(
                    f"RandAugment config {config!r}: unknown section {section!r} "
                    "(supported: m<int>, n<int>, mstd<float>, inc<0|1>)"
                )
        except ValueError as e:
            if "RandAugment config" in str(e):
                raise
            raise ValueError(f"RandAugment config {config!r}: bad value in {section!r}") from e
    return out


GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def op_names(increasing=True):
    """The op list `rand_augment` chooses from, in dispatch order (``op_index`` refers to it)."""
    return RAND_INCREASING_OPS if increasing else RAND_OPS
