"""TensorFlow's process-wide settings for the input pipelines, made when a pipeline module is
imported (before TensorFlow runs its first op; later they cannot change, and are left as they
are).

* TensorFlow stays off the accelerators: JAX owns them.
* Each TensorFlow kernel runs on one thread (intra-op parallelism 1). Our pipelines spread
  their work over the cores one block of examples per thread (tf.data's parallel maps);
  kernels that also split themselves over the cores (the bicubic resize, the XLA-compiled
  RandAugment ops) then only add hand-offs between threads. Measured on two cores (2026-12-03,
  `benchmarks/bench_input.py` and `bench_finetune_input.py`; benchmarks/README.md): the JPEG
  pretraining input ~600 -> ~720 images/s, the fine-tuning input ~380 -> ~470.
"""

import logging

import tensorflow as tf

logger = logging.getLogger(__name__)

INTRA_OP_THREADS = 1


def configure() -> None:
    """Hide the GPUs from TensorFlow and run its kernels single-threaded (see the module's
    docstring); a no-op once TensorFlow has started, e.g. when it ran ops elsewhere first."""
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_intra_op_parallelism_threads(INTRA_OP_THREADS)
    except RuntimeError:  # TensorFlow already initialised: keep what it has
        logger.debug("TensorFlow already started: intra-op threads stay at %d",
                     tf.config.threading.get_intra_op_parallelism_threads())


configure()
