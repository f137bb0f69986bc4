"""Checkpoints: periodic async training checkpoints and one-off pytree exports.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a save
killed half-way leaves the previous checkpoint intact and is never picked up by `latest_step`.
Each checkpoint also carries checksums of its files, written before that rename
(`checkpoint_integrity`): `newest_intact_step` skips (and, for the run that owns the
directory, moves aside) a checkpoint damaged later, falling back to the one before. Training
state restores straight into the shardings of an abstract target (ShapeDtypeStructs with
`.sharding`), so a restored array never passes through one device.

    checkpointer = Checkpointer(workdir, save_every_steps=1000, keep=3)
    step = checkpointer.newest_intact_step(move_damaged=True)
    if step is not None:
        state, meta = checkpointer.restore(step, abstract_state=abstract)
    for step in ...:
        ...
        checkpointer.save(step, state, metadata={"step": step})  # every save_every_steps
    checkpointer.close()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mae_jax.core import checkpoint_integrity as integrity
from mae_jax.core.checkpoint_integrity import CheckpointWriteError, is_out_of_space  # noqa: F401
from mae_jax.core.errors import BadInputError
from mae_jax.core.processes import from_process_0

STATE_ITEM = "state"
METADATA_ITEM = "metadata"


class _NoItemMetadataWarning(logging.Filter):
    """orbax warns on every restore that `<step>/state/_CHECKPOINT_METADATA` does not exist:
    item folders never hold one (the step folder does, and `checkpoint_integrity` checks it
    with the other files). Only that warning is dropped; one about a step folder stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not str(record.msg).startswith(
                "Metadata file does not exist"):
            return True
        path = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
        return os.path.basename(os.path.dirname(path)) not in (STATE_ITEM, METADATA_ITEM)


logging.getLogger("absl").addFilter(_NoItemMetadataWarning())


class DamagedCheckpointsError(BadInputError, ValueError):
    """Every checkpoint of the run failed its checksums (each was moved aside)."""


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
        if keep is not None and keep < 1:
            raise ValueError(
                f"keep must be >= 1 (or None: keep all), got {keep}: keeping 0 would delete "
                "every checkpoint, the last one included."
            )
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.save_every_steps = save_every_steps
        integrity.silence_closed_loop_callbacks()
        self.saving_step: int | None = None
        self._unchecked_step: int | None = None  # committed, checksums still to write
        self._async = async_save
        async_options = None
        if async_save:
            try:  # runs in orbax's save thread once every process has written its files,
                # before the commit rename
                async_options = ocp.AsyncOptions(post_finalization_callback=self._write_checksums)
            except TypeError:  # an orbax without it: checksums right after the commit
                pass
        self._checksums_in_commit = async_options is not None
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,
            # Orbax deletes old checkpoints only after a newer one is committed, with its
            # checksums: the newest checkpoint is never deleted.
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            async_options=async_options,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=(STATE_ITEM, METADATA_ITEM), options=options
        )

    def _write_checksums(self) -> None:
        if self.saving_step is None:
            return
        step_dir = integrity.uncommitted_dir(self.directory, self.saving_step)
        if step_dir is None:  # another orbax layout: the checkpoint stays usable, unverified
            print(f"WARNING: no directory for checkpoint {self.saving_step} in "
                  f"{self.directory}; it is saved without checksums.", flush=True)
            return
        integrity.write_checksums(step_dir)

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
        has already copied it off the devices when this returns. A failed earlier write (e.g.
        a full disk) raises CheckpointWriteError here or in `wait`.
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
        # Orbax waits for the previous save anyway; waiting first keeps `saving_step` that
        # save's step until its checksums are written.
        self.wait()
        self.saving_step = int(step)
        with integrity.WriteErrors(self):
            saved = self._manager.save(int(step), args=args, force=force)
        if saved and not self._checksums_in_commit:
            self._unchecked_step = int(step)
            if not self._async:
                self._checksum_committed()
        return saved

    def _checksum_committed(self) -> None:
        step, self._unchecked_step = self._unchecked_step, None
        if step is None or jax.process_index() != 0:
            return
        step_dir = os.path.join(self.directory, str(step))
        if os.path.isdir(step_dir):
            integrity.write_checksums(step_dir)

    def latest_step(self) -> int | None:
        """Newest complete checkpoint step, or None; unfinished (tmp) saves are ignored."""
        self._manager.reload()
        return self._manager.latest_step()

    def newest_intact_step(self, *, move_damaged: bool = False) -> int | None:
        """Newest committed checkpoint whose files match their checksums, or None.

        Each damaged newer checkpoint is reported by path and skipped. move_damaged (for the
        run that owns this directory): rename each to `<step>.damaged-<time>`, kept for
        inspection, and raise DamagedCheckpointsError when no intact one is left; process 0
        alone reads and renames, every process gets its answer. Checkpoints without checksums
        (older versions) are used unverified.
        """
        if not move_damaged:
            return self._check_steps(move_damaged=False)[0]
        checked = {"moved": []}

        def check() -> int:  # process 0: -2 every one damaged, -1 none, else the step
            found, checked["moved"] = self._check_steps(move_damaged=True)
            return -2 if checked["moved"] and found is None else (-1 if found is None else found)

        answer = from_process_0(check, f"checking the checkpoints in {self.directory}")
        if jax.process_count() > 1:
            self._manager.reload()
        found = None if answer < 0 else answer
        moved = checked["moved"] or (["(see process 0's log)"] if answer == -2 else [])
        if found is None and moved:
            raise DamagedCheckpointsError(
                f"Every checkpoint in {self.directory} is damaged; each was moved aside "
                f"({', '.join(moved)}), nothing was deleted. Re-run the same command to start "
                "from scratch in this workdir, or copy an intact checkpoint back."
            )
        return found

    def _check_steps(self, *, move_damaged: bool) -> tuple[int | None, list[str]]:
        """(newest intact step or None, paths the damaged ones were moved to)."""
        moved = []
        for step in reversed(self.all_steps()):
            step_dir = os.path.join(self.directory, str(step))
            if not integrity.has_checksums(step_dir):
                print(f"Checkpoint {step_dir} has no checksums (an older version wrote it): "
                      "using it unverified.", flush=True)
                return step, moved
            damage = integrity.find_damage(step_dir)
            if damage is None:
                return step, moved
            note = "."
            if move_damaged:
                moved.append(integrity.move_aside(step_dir))
                self._manager.reload()
                note = f"; kept as {moved[-1]}."
            print(f"WARNING: checkpoint {step_dir} is damaged ({damage}): skipped, falling "
                  f"back to the one before{note}", flush=True)
        return None, moved

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore(
        self, step: int | None = None, *, abstract_state: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        """Returns (state, metadata) of `step` (default: the newest intact one).

        abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` (see
        `sharding.abstract_with_shardings`), same structure as the saved state; arrays are
        read straight into those shardings. None restores with the saved structure/shardings.
        """
        if step is None:
            step = self.newest_intact_step()
            if step is None:
                raise FileNotFoundError(
                    f"No finished, intact checkpoint in {self.directory}; start from scratch "
                    "or point workdir at a run that saved one."
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
        read without the optimizer state and without knowing the model (for loading weights).
        step: default the newest intact checkpoint (damaged ones are reported, not moved)."""
        step = self.newest_intact_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No finished, intact checkpoint in {self.directory}.")
        path = os.path.join(self.directory, str(int(step)), STATE_ITEM)
        with ocp.PyTreeCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path).item_metadata.tree
            wanted = {name: metadata[name] for name in ("params", "rest") if name in metadata}
            return checkpointer.restore(path, args=_numpy_restore(wanted, partial=True))

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{"params/encoder/cls_token/value": shape, ...} of the state saved at `step`, read
        from its metadata only (to compare with a config before restoring anything)."""
        path = os.path.join(self.directory, str(int(step)), STATE_ITEM)
        with ocp.PyTreeCheckpointer() as checkpointer:
            return leaf_shapes(checkpointer.metadata(path).item_metadata.tree)

    def check(self) -> None:
        """Raises CheckpointWriteError if a background save has failed, without waiting for one
        in progress (microseconds): a run learns of a failed write at its next log step, not
        at its next checkpoint."""
        if not self._manager.is_saving_in_progress():  # nothing to wait for: raises a
            with integrity.WriteErrors(self):  # finished save's error, if any
                self._manager.wait_until_finished()

    def wait(self) -> None:
        """Blocks until background saves have finished; raises CheckpointWriteError if one
        failed (once: the manager forgets the error after raising it)."""
        with integrity.WriteErrors(self):
            self._manager.wait_until_finished()
        self._checksum_committed()

    def close(self) -> None:
        """Finishes pending saves and releases the manager (even when a save failed)."""
        try:
            self.wait()
        finally:
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


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"a/b/0/value": shape} for every array-like leaf (arrays, ShapeDtypeStructs, orbax
    metadata), with one spelling of paths for dataclass fields, dict keys and list indices."""

    def name(key) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return {"/".join(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _numpy_restore(metadata: Any, *, partial: bool = False) -> ocp.args.PyTreeRestore:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return ocp.args.PyTreeRestore(item=metadata, restore_args=restore_args,
                                  partial_restore=partial)
