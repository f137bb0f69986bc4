"""Whether a TFDS dataset that is not prepared yet may be prepared by this process.

Not in a run of several processes (`--multiprocess`): every process would prepare it at once,
and into a shared `data_dir` they race on TFDS's final rename of its temporary folder (the
first one wins; the others fail while the rest wait for them in a collective). Such a run
stops on every process alike, before any work, asking for the dataset to be prepared first by
one process.
"""

from __future__ import annotations

from mae_jax.core.errors import DataNotFoundError


def several_processes() -> bool:
    """Whether JAX's multi-process runtime runs more than one process (never starts JAX)."""
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def refuse_to_prepare(name: str, where, *, download: bool = True, how_to: str = "") -> None:
    """Raises DataNotFoundError when dataset `name`, not prepared in `where`, must not be
    prepared here: downloads are off, or this is one of several processes. `how_to`: how to
    prepare it by other means."""
    if not download:
        raise DataNotFoundError(f"TFDS dataset {name!r} is not prepared in {where} and "
                                f"download=False. {how_to}")
    if several_processes():
        raise DataNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {where}, and this run has several "
            "processes: they would all prepare it at once (racing on TFDS's final rename in a "
            "shared data_dir). Prepare it first with one process (the same command on one "
            "host without --multiprocess, stopped once training starts, or as follows), in "
            f"every host's data_dir (once if it is shared), then launch the hosts. {how_to}")
