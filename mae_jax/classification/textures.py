"""The classes and splits of `generated:N` labelled data (`mae_jax.classification.synthetic`
draws the images), without numpy: configs check them before anything heavy loads."""

TEXTURES = ("vertical_stripes", "horizontal_stripes", "checkerboard", "diagonal_checkerboard",
            "dots", "rings", "grid", "crosshatch")
TRAIN_SPLIT, VAL_SPLIT = "train", "val"
