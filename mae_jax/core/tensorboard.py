"""TensorBoard writers for `run_logging.RunLogger`: clu's (which imports TensorFlow), else
torch.utils.tensorboard's (the GPU machine has no TensorFlow), else none with one warning."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

_warned_no_tensorboard = False


class _TorchSummaryWriter:
    """The subset of clu's MetricWriter API used here, over torch.utils.tensorboard (no TF)."""

    def __init__(self, logdir: str):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for name, value in images.items():
            self._writer.add_images(name, value, step, dataformats="NHWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def create_tensorboard_writer(logdir: str) -> Any | None:
    """clu SummaryWriter (TF), else torch's, else None with one warning."""
    try:
        from clu import metric_writers  # Imports TensorFlow.

        return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))
    except ImportError:
        pass
    try:
        return _TorchSummaryWriter(logdir)
    except ImportError:
        global _warned_no_tensorboard
        if not _warned_no_tensorboard:
            _warned_no_tensorboard = True
            message = (
                "Neither TensorFlow (for clu) nor torch.utils.tensorboard is installed: logging "
                "to metrics.jsonl only. Install tensorflow or tensorboard to get TensorBoard."
            )
            print(f"WARNING: {message}", flush=True)
            warnings.warn(message, stacklevel=2)
        return None
