"""Segmentation data sources and the classes each gives the model. No TensorFlow: configs,
the training library and benchmarks import this without the input pipeline."""

ADE20K_NUM_CLASSES = 150
# Synthetic scenes: enough variety for a demo (mae_jax.data.seg_input generates them).
SYNTHETIC_NUM_CLASSES = 8
SOURCES = ("ade20k", "synthetic")


def num_seg_classes(source: str, *, num_classes: int | None = None) -> int:
    """Classes the model predicts (after label reduction): 150 for ADE20K."""
    check_source(source, num_classes)
    if source == "ade20k":
        return ADE20K_NUM_CLASSES
    return SYNTHETIC_NUM_CLASSES if num_classes is None else num_classes


def check_source(source: str, num_classes: int | None) -> None:
    if source not in SOURCES:
        raise ValueError(f"Unknown segmentation source {source!r}; use one of {SOURCES}.")
    if source == "ade20k" and num_classes not in (None, ADE20K_NUM_CLASSES):
        raise ValueError(
            f"num_classes={num_classes} with source='ade20k': ADE20K has 150 classes; "
            "num_classes only configures source='synthetic'."
        )
