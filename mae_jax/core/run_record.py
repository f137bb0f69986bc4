"""What a run ran with: `config.json` (the original config, never overwritten) and
`config_history.jsonl` (every change made on a resume, with the step it took effect at).

A resume compares the config it was given with the run's effective config (the original plus
the recorded changes). Changes that can alter the trained parameters or the reported metrics
are refused, listed one per line, unless the user says they are intended (`--config_change_ok`
on the command line, i.e. `config.config_change_ok = True`); changes that cannot (how often to
log, checkpoint or draw pictures, where the data lives) are accepted. Both kinds are recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import ml_collections

from mae_jax.core.config import ENTRY_POINTS
from mae_jax.core.errors import BadInputError
from mae_jax.core.workdir import set_aside

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
EVAL_CONFIG_FILE = "eval_config.json"  # an eval_only run's config
CHANGE_OK_FIELD = "config_change_ok"  # set by --config_change_ok; never compared
# Fields whose value cannot change the trained parameters or the evaluation numbers: cadences
# and retention (checks and saves happen between steps), pictures, TensorBoard, the profiled
# steps, data locations,
# the starting weights (read only at step 0), the mesh, attention kernel and evaluation batch
# (same maths; only the rounding of reductions differs, as between 1 and 4 devices).
HARMLESS_FIELDS = frozenset({
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "tensorboard",
    "visualize_every_steps", "num_visualize_images", "export_encoder", "eval_every_steps",
    "num_pictures", "eval_only", "init_from", "data.data_dir", "data.manual_dir",
    "data.download", "mesh.data", "mesh.fsdp", "mesh.cpu_devices", "model.attention_impl",
    "profile_steps", "eval_batch_size",
})

# Fields added after runs were recorded without them: the value that reproduces what those runs
# did (a resume of such a run compares against it). data.on_device: fine-tuning and the linear
# probe (and pretraining before the field) read the data through tf.data; profile_steps:
# no trace; mesh.cpu_devices: JAX's one CPU device.
LATER_FIELDS = {"data.on_device": "never", "profile_steps": "", "mesh.cpu_devices": 0,
                "data.crop_style": "torchvision", "mixup_batch": 0}  # until 2026-12-08
# Fields read only for a `generated:N` source: no change to them alters a run of other data
# (data.generated_classes defaulted to 10 until 2026-12-08, more than the 8 textures there are).
GENERATED_FIELDS = frozenset({"data.generated_classes", "data.generated_size"})


class ConfigChangedError(BadInputError, ValueError):
    """A resume with changed hyperparameters, without --config_change_ok."""


def flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """{"model.depth": 12, ...}: JSON values (tuples become lists), the change flag dropped."""
    if isinstance(config, ml_collections.ConfigDict):
        config = json.loads(config.to_json_best_effort())
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(config, "")
    flat.pop(CHANGE_OK_FIELD, None)
    return flat


def effective_config(workdir: str, at_step: int | None = None) -> dict[str, Any] | None:
    """The recorded config with the recorded changes of the run's history up to `at_step`
    applied (all of them when None), flat; None before a first run (and in a run of a version
    that kept no record). Raises ConfigChangedError when the record is unusable: config.json
    unreadable, or gone while its history is still there."""
    path = os.path.join(workdir, CONFIG_FILE)
    history = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        if os.path.exists(history):  # deleted: adopting this command's config would be silent
            raise ConfigChangedError(
                f"{workdir} holds checkpoints and {HISTORY_FILE} but no {CONFIG_FILE}: the "
                "run's config cannot be checked. Restore config.json; or, to make this "
                f"command's config the run's from now on, move {HISTORY_FILE} aside.")
        return None
    try:
        with open(path) as handle:
            flat = flat_config(json.load(handle))
    except ValueError as error:  # truncated by a crash or a full disk
        raise ConfigChangedError(
            f"{path} is not a readable config ({error}): the run's config cannot be checked. "
            f"Restore it; or, to make this command's config the run's from now on, move it "
            f"and {HISTORY_FILE} aside.") from None
    for entry in history_entries(workdir):
        if at_step is None or entry["step"] <= at_step:
            for key, (_, new) in entry["changes"].items():
                flat[key] = new
    return flat


def history_entries(workdir: str) -> list[dict[str, Any]]:
    """The entries of `config_history.jsonl` the run's state went through, in order. An entry
    made at a resume from step S ends the entries after S written before it: those came from
    checkpoints the run fell back behind (damaged ones set aside), so they never happened."""
    path = os.path.join(workdir, HISTORY_FILE)
    entries: list[dict[str, Any]] = []
    if not os.path.exists(path):
        return entries
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entry["step"], entry["changes"] = int(entry["step"]), dict(entry["changes"])
            except (ValueError, KeyError, TypeError):
                print(f"WARNING: skipping unreadable line {number} of {path}.")
                continue
            entries = [earlier for earlier in entries if earlier["step"] <= entry["step"]]
            entries.append(entry)
    return entries


_MISSING = "<absent>"


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
    """{field: [old value, new value]} for every field whose value differs."""
    return {
        key: [old.get(key, _MISSING), new.get(key, _MISSING)]
        for key in sorted(set(old) | set(new))
        if old.get(key, _MISSING) != new.get(key, _MISSING)
    }


# Fields the learning-rate schedule is computed from (besides the data's size).
SCHEDULE_FIELDS = frozenset({"total_steps", "num_epochs", "warmup_steps", "warmup_epochs",
                             "lr", "base_lr", "min_lr", "batch_size", "layer_decay"})


@dataclasses.dataclass(frozen=True)
class ConfigChanges:
    """The changes a resume makes to the run's config, checked but not yet recorded: the
    run records them (`write`) only when training starts, so a resume that fails before
    (the checkpoint does not fit, the data is missing) leaves the record as it was and the
    original command still resumes."""

    step: int | None = None
    changes: dict[str, list] = dataclasses.field(default_factory=dict)
    accepted: str = ""
    voids: list[int] = dataclasses.field(default_factory=list)  # later entries' steps

    def write(self, workdir: str) -> None:
        if not self.changes and not self.voids:
            return
        entry = {"step": int(self.step), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "changes": self.changes, "accepted": self.accepted}
        with open(os.path.join(workdir, HISTORY_FILE), "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.voids:
            print(f"Resuming from step {self.step}, before the config change(s) recorded at "
                  f"step(s) {', '.join(map(str, self.voids))}: those no longer apply.",
                  flush=True)
        if self.changes:
            print(f"Config changed at step {self.step}: "
                  + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in
                              self.changes.items())
                  + f" (recorded in {HISTORY_FILE}).", flush=True)
        schedule = sorted(set(self.changes) & SCHEDULE_FIELDS)
        if schedule:  # QA: a finished run extended by 40% went from 5e-5 back up to 1.4e-3
            print(f"Note: the learning-rate schedule is recomputed from {', '.join(schedule)}: "
                  f"from step {self.step} on the rate follows the new curve (it may jump, e.g. "
                  "rise again when a finished run is extended); metrics.jsonl logs it.",
                  flush=True)


def record_config(
    workdir: str, config: ml_collections.ConfigDict, *, resume_step: int | None,
    write: bool = True,
) -> ConfigChanges:
    """Checks the config of a run starting (resume_step None) or resuming at `resume_step`.

    A new run's config.json is written now. A resume's changes are returned, for the caller
    to `write` once training starts. Raises ConfigChangedError for changes that can alter the
    result unless `config.config_change_ok`. write: False on processes other than 0 (they
    check, process 0 writes).
    """
    current = flat_config(config)
    path = os.path.join(workdir, CONFIG_FILE)
    if resume_step is None:
        if write:
            _start_record(workdir, config, current)
            history = os.path.join(workdir, HISTORY_FILE)
            if os.path.exists(history):  # an earlier run's (its checkpoints gone or damaged)
                kept = set_aside(history)
                print(f"Starting from scratch: the earlier run's {HISTORY_FILE} is kept as "
                      f"{kept}.", flush=True)
        return ConfigChanges()
    # After a fall-back to an older checkpoint, what the history recorded after its step
    # did not happen: compare with the config at the step resumed from.
    recorded = effective_config(workdir, at_step=resume_step)
    if recorded is None:  # checkpoints from a version that kept no record: start one now
        if write:
            print(f"No config record in {workdir} (a run of an older version): this "
                  f"command's config is recorded as the run's ({CONFIG_FILE}).", flush=True)
            _start_record(workdir, config, current)
        return ConfigChanges()
    _check_same_task(workdir, recorded.get("task"), current.get("task"), resume_step)
    for key, value in LATER_FIELDS.items():
        if key in current and key not in recorded:
            recorded[key] = value
    changes = differences(recorded, current)
    if not any(str(c.get("data.source", "")).startswith("generated:") for c in (recorded, current)):
        changes = {k: v for k, v in changes.items() if k not in GENERATED_FIELDS}
    significant = {k: v for k, v in changes.items() if k not in HARMLESS_FIELDS}
    if significant and not config.get(CHANGE_OK_FIELD, False):
        listed = "\n  - ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in
                               significant.items())
        raise ConfigChangedError(
            f"This resume (from step {resume_step} in {workdir}) changes the run's "
            f"config:\n  - {listed}\nRe-run with the recorded values ({path}, then "
            f"{HISTORY_FILE}) to resume the same run, add --config_change_ok to continue "
            "with the changes (recorded in "
            f"{HISTORY_FILE} with the step), or give a new --workdir to start a new run."
        )
    voids = [entry["step"] for entry in history_entries(workdir) if entry["step"] > resume_step]
    return ConfigChanges(int(resume_step), changes,
                         "config_change_ok" if significant else "harmless fields only"
                         if changes else "", voids)


def _check_same_task(workdir: str, recorded: str | None, task: str | None, step: int) -> None:
    """Another entry point's run (a finetune.py workdir given to train.py) is one line, not
    the difference of every field; --config_change_ok cannot accept it."""
    if recorded and task and recorded != task:
        script = ENTRY_POINTS.get(recorded, f"the {recorded} entry point")
        raise ConfigChangedError(
            f"{workdir} holds a {recorded} run (task: {recorded} -> {task}; its checkpoint at "
            f"step {step} is {script}'s): give this {ENTRY_POINTS.get(task, task)} run its own "
            f"--workdir, or resume that run with {script}."
        )


def _start_record(workdir: str, config: ml_collections.ConfigDict, current: dict) -> None:
    """Writes config.json for a run starting from scratch. A config.json left by an earlier
    start that saved no checkpoint is kept as config.replaced-<time>.json if it differs."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as handle:
            try:
                same = flat_config(json.load(handle)) == current
            except ValueError:
                same = False
        if same:
            return
        kept = set_aside(path)
        print(f"Starting from scratch with another config; the previous {CONFIG_FILE} is "
              f"kept as {kept}.", flush=True)
    _write_config(path, config)


def record_eval_config(workdir: str, config: ml_collections.ConfigDict, *,
                       resume_step: int | None = None) -> None:
    """eval_only: `eval_config.json`, the config of the newest evaluation (its weights:
    `init_from`, or the workdir's checkpoint; eval_results.json has the step). The training
    record is left alone. A checkpoint of another entry point's run (`resume_step`) is refused
    first, nothing written (QA: a probe's eval_only wrote into a pretraining run, then failed
    with 315 arrays that "differ")."""
    if resume_step is not None and (recorded := effective_config(workdir, at_step=resume_step)):
        _check_same_task(workdir, recorded.get("task"), flat_config(config).get("task"),
                         resume_step)
    _write_config(os.path.join(workdir, EVAL_CONFIG_FILE), config)


def _write_config(path: str, config: ml_collections.ConfigDict) -> None:
    with open(path + ".tmp", "w") as handle:  # whole or not at all: a crash cannot truncate it
        handle.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)
