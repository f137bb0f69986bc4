"""TensorFlow's process-wide settings for the input pipelines, made when a pipeline module is
imported (before TensorFlow runs its first op; later they cannot change, and are left as they
are).

* TensorFlow stays off the accelerators: JAX owns them.
* Each TensorFlow kernel runs on one thread (intra-op parallelism 1). Our pipelines spread
  their work over the cores one block of examples per thread (tf.data's parallel maps);
  kernels that also split themselves over the cores (the bicubic resize, the XLA-compiled
  RandAugment ops) then only add hand-offs between threads. Measured on two cores (2026-12-03,
  `benchmarks/bench_input.py` and `bench_finetune_input.py`; benchmarks/README.md): the JPEG
  pretraining input with the host resize 571-607 -> 665-722 images/s, the fine-tuning input
  358-384 -> 447-480.

No pipeline module runs a TensorFlow op when imported, so importing this one from any of them
comes before TensorFlow starts.

And `no_tfds_scratch`, around the creation of TFDS builders: it removes the empty folders
TFDS leaves behind.
"""

import contextlib
import glob
import logging
import os
import tempfile

import tensorflow as tf

logger = logging.getLogger(__name__)

INTRA_OP_THREADS = 1


def configure() -> None:
    """Hide the GPUs from TensorFlow and run its kernels single-threaded (see the module's
    docstring); a no-op once TensorFlow has started, e.g. when it ran ops elsewhere first."""
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_intra_op_parallelism_threads(INTRA_OP_THREADS)
    except RuntimeError:  # TensorFlow started with other settings: they cannot change now
        logger.warning(
            "TensorFlow started before mae_jax's input pipeline was imported, with other "
            "settings: it may use the GPUs (JAX needs their memory) and its kernels run on %d "
            "threads (1 is fastest for the pipelines). Import mae_jax.data.tf_runtime before "
            "running TensorFlow ops.", tf.config.threading.get_intra_op_parallelism_threads())


configure()


@contextlib.contextmanager
def no_tfds_scratch():
    """Removes the empty ``tmp*tfds`` folders that appear in the temporary directory meanwhile.

    TFDS (4.9) calls ``tempfile.mkdtemp("tfds")`` each time a builder is created for a dataset
    not prepared yet (`DatasetInfo.initialize_from_bucket`, for metadata it would copy from GCS,
    which is off by default) and never removes the folder: /tmp gathered one for every run and
    test that looked for a missing dataset. Only empty folders go (`os.rmdir`); one another
    process made in the same moment, empty, may go with them.
    """
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    try:
        yield
    finally:
        for path in set(glob.glob(pattern)) - before:
            with contextlib.suppress(OSError):  # not empty, or gone already
                os.rmdir(path)
