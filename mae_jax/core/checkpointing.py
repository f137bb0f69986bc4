"""Checkpoints: periodic async training checkpoints, one-off pytree exports, preemption.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a save
killed half-way leaves the previous checkpoint intact and is never picked up by `latest_step`.
Training state restores straight into the shardings of an abstract target (ShapeDtypeStructs
with `.sharding`), so a restored array never passes through one device.

    checkpointer = Checkpointer(workdir, save_every_steps=1000, keep=3)
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(abstract_state=abstract)
    with PreemptionGuard() as guard:
        for step in ...:
            ...
            checkpointer.save(step, state, metadata={"step": step})
            if guard.requested:
                checkpointer.save(step, state, metadata=..., force=True)
                break
    checkpointer.close()
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

STATE_ITEM = "state"
METADATA_ITEM = "metadata"


class Checkpointer:
    """Periodic, async, atomic training checkpoints in `workdir/checkpoints/<step>/`.

    Each step directory holds the state pytree and a JSON metadata item (config, data position,
    rng seed, ...: anything `json.dumps` accepts).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        save_every_steps: int = 1000,
        keep: int | None = 3,
        async_save: bool = True,
    ):
        if save_every_steps < 1:
            raise ValueError(f"save_every_steps must be >= 1, got {save_every_steps}.")
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.save_every_steps = save_every_steps
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=(STATE_ITEM, METADATA_ITEM), options=options
        )

    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves when `step` is a multiple of save_every_steps (or `force`); returns whether it did.

        The write continues in the background: `state` may be donated to the next step, orbax
        has already copied it off the devices when this returns.
        """
        # The interval is checked here, not by orbax, whose policy also saves the first step.
        if not force and int(step) % self.save_every_steps:
            return False
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                METADATA_ITEM: ocp.args.JsonSave(dict(metadata or {})),
            }
        )
        return self._manager.save(int(step), args=args, force=force)

    def latest_step(self) -> int | None:
        """Newest complete checkpoint step, or None; unfinished (tmp) saves are ignored."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore(
        self, step: int | None = None, *, abstract_state: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        """Returns (state, metadata) of `step` (default: the latest).

        abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` (see
        `sharding.abstract_with_shardings`), same structure as the saved state; arrays are
        read straight into those shardings. None restores with the saved structure/shardings.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"No finished checkpoint in {self.directory}; start from scratch or point "
                    "workdir at a run that saved one."
                )
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                METADATA_ITEM: ocp.args.JsonRestore(),
            }
        )
        restored = self._manager.restore(int(step), args=args)
        return restored[STATE_ITEM], dict(restored[METADATA_ITEM] or {})

    def restore_model_arrays(self, step: int | None = None) -> dict[str, Any]:
        """{"params": ..., "rest": ...} of a training checkpoint as nested dicts of numpy arrays,
        read without the optimizer state and without knowing the model (for loading weights)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No finished checkpoint in {self.directory}.")
        path = os.path.join(self.directory, str(int(step)), STATE_ITEM)
        with ocp.PyTreeCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path).item_metadata.tree
            wanted = {name: metadata[name] for name in ("params", "rest") if name in metadata}
            return checkpointer.restore(path, args=_numpy_restore(wanted, partial=True))

    def wait(self) -> None:
        """Blocks until background saves have finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_pytree(path: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
    """Writes one pytree (e.g. a pretrained encoder for segment.py) to `path` and waits.

    An `nnx.State` is stored as its pure nested dict (no Variable `.value` level), so the export
    reads back as {'blocks': {0: {'attn': ...}}} without flax. force: overwrite `path`.
    """
    if isinstance(tree, nnx.State):
        tree = tree.to_pure_dict()
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(os.path.abspath(path), tree, force=force)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()


def read_pytree(path: str | os.PathLike) -> dict[str, Any]:
    """A pytree written by `save_pytree`, as nested dicts of numpy arrays (no target needed)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No pytree checkpoint at {path}; check the path.")
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata.tree
        return checkpointer.restore(path, args=_numpy_restore(metadata))


def _numpy_restore(metadata: Any, *, partial: bool = False) -> ocp.args.PyTreeRestore:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return ocp.args.PyTreeRestore(item=metadata, restore_args=restore_args,
                                  partial_restore=partial)


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the training loop checks, so it can save and exit.

    A second SIGINT raises KeyboardInterrupt as usual (an impatient Ctrl-C still stops the run).
    Handlers are installed only from the main thread and restored on exit. On several hosts,
    signals may arrive at different steps: check `requested_anywhere()` (one tiny all-gather) at
    log steps so that all processes stop at the same step.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested = False
        self.signal_received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_received = signum
        print(f"Received {signal.Signals(signum).name}: saving a checkpoint and stopping.")

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested_anywhere(self) -> bool:
        """True when any process got a stop signal (same answer on every process)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(int(self.requested))
        return bool(max(flags.reshape(-1)))
