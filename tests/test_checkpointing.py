"""Checkpointer save/restore with sharded arrays, keep-K, unfinished saves, exports, preemption."""

import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from mae_jax.core import checkpointing, preemption, sharding


class Wide(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([nnx.Linear(64, 256, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(256, rngs=rngs)


def make_train_state(key):
    params = nnx.state(Wide(rngs=nnx.Rngs(params=key)), nnx.Param)
    return {"params": params, "opt_state": optax.adamw(1e-3).init(params), "step": jnp.int32(0)}


@pytest.fixture(scope="module")
def sharded_state():
    mesh = sharding.create_mesh(data=1, fsdp=2, devices=jax.devices()[:2])
    state, shardings = sharding.create_sharded(make_train_state, mesh, jax.random.key(0))
    abstract = sharding.abstract_with_shardings(
        jax.eval_shape(make_train_state, jax.random.key(0)), shardings
    )
    return state, abstract


def assert_trees_equal(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), a, b)


def test_roundtrip_restores_values_metadata_and_shardings(tmp_path, sharded_state):
    state, abstract = sharded_state
    kernel = state["params"]["blocks"][0]["kernel"].value
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp")
    with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as checkpointer:
        metadata = {"config": {"lr": 1e-3}, "data_position": 1234, "seed": 7}
        assert checkpointer.save(5, state, metadata=metadata)
        checkpointer.wait()
        restored, restored_metadata = checkpointer.restore(abstract_state=abstract)
    assert restored_metadata == metadata
    assert_trees_equal(restored, state)
    restored_kernel = restored["params"]["blocks"][0]["kernel"].value
    assert restored_kernel.sharding == kernel.sharding
    assert {s.data.shape for s in restored_kernel.addressable_shards} == {(64, 128)}
    mu = restored["opt_state"][0].mu["blocks"][1]["kernel"].value
    assert mu.sharding.spec == PartitionSpec(None, "fsdp")


def test_a_resume_logs_no_warning_about_item_folders_metadata(tmp_path, sharded_state):
    """orbax warns on every restore that `<step>/state/_CHECKPOINT_METADATA` does not exist
    (item folders never have one); that warning is dropped, the same about a step folder is
    kept."""
    state, abstract = sharded_state
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    absl_logger = logging.getLogger("absl")
    absl_logger.addHandler(handler)
    try:
        with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as checkpointer:
            assert checkpointer.save(5, state, metadata={"step": 5})
            checkpointer.wait()
            step = checkpointer.newest_intact_step(move_damaged=True)
            checkpointer.saved_shapes(step)
            checkpointer.restore(step, abstract_state=abstract)
    finally:
        absl_logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "Metadata file does not exist" in
                r.getMessage()]
    step_folder = logging.LogRecord(
        "absl", logging.WARNING, "checkpoint.py", 1, "Metadata file does not exist: %s",
        (str(tmp_path / "checkpoints" / "5" / "_CHECKPOINT_METADATA"),), None)
    assert absl_logger.filter(step_folder)


def test_saves_every_n_steps_keeps_last_k_and_reports_latest(tmp_path, sharded_state):
    state, _ = sharded_state
    checkpointer = checkpointing.Checkpointer(tmp_path, save_every_steps=2, keep=2)
    assert checkpointer.latest_step() is None
    saved = [checkpointer.save(step, state, metadata={"step": step}) for step in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert checkpointer.save(7, state, metadata={"step": 7}, force=True)  # e.g. end of training
    checkpointer.close()
    reopened = checkpointing.Checkpointer(tmp_path, save_every_steps=2, keep=2)
    assert reopened.all_steps() == [6, 7]
    assert reopened.latest_step() == 7
    _, metadata = reopened.restore(6)
    assert metadata == {"step": 6}
    reopened.close()


def test_unfinished_save_is_ignored_on_restore(tmp_path, sharded_state):
    state, abstract = sharded_state
    checkpointer = checkpointing.Checkpointer(tmp_path, save_every_steps=1)
    checkpointer.save(3, state, metadata={"step": 3})
    checkpointer.close()
    # What a save killed mid-write leaves behind: orbax's tmp directory, never renamed.
    unfinished = os.path.join(checkpointer.directory, "4.orbax-checkpoint-tmp-1700000000")
    os.makedirs(os.path.join(unfinished, "state"))
    with open(os.path.join(unfinished, "state", "garbage"), "w") as f:
        f.write("half written")
    reopened = checkpointing.Checkpointer(tmp_path, save_every_steps=1)
    assert reopened.latest_step() == 3
    restored, metadata = reopened.restore(abstract_state=abstract)
    assert metadata == {"step": 3}
    assert_trees_equal(restored["params"], state["params"])
    reopened.close()


def test_restore_without_checkpoint_names_the_directory(tmp_path):
    checkpointer = checkpointing.Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="No finished, intact checkpoint"):
        checkpointer.restore()
    checkpointer.close()


def test_pytree_export_reads_back_without_a_target(tmp_path, sharded_state):
    state, _ = sharded_state
    path = tmp_path / "encoder"
    checkpointing.save_pytree(path, state["params"])
    plain = checkpointing.read_pytree(path)  # No flax, no target structure needed.
    np.testing.assert_array_equal(plain["blocks"]["0"]["kernel"],
                                  state["params"]["blocks"][0]["kernel"].value)
    with pytest.raises(FileNotFoundError, match="check the path"):
        checkpointing.read_pytree(tmp_path / "missing")


def test_preemption_guard_turns_sigterm_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_received == signal.SIGTERM
        assert guard.requested_anywhere()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_processes_agree_on_a_stop_every_few_steps_from_answers_already_computed():
    """The agreement of several processes (here the devices of one, over a 2 x 2 data x fsdp
    mesh; tests/test_multiprocess.py runs it over two processes): a flag handed in at a check
    step is the answer at the next one, so a stop comes within 2 * every steps, at the same
    step on every process, and the host never waits for the step just queued."""
    from mae_jax.core import sharding as sharding_lib

    mesh = sharding_lib.create_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    agreement = preemption.StopAgreement(mesh, every=5)
    requested = {step: step >= 7 for step in range(1, 21)}  # the signal came during step 7
    stops = [step for step in range(1, 21) if agreement.check(step, requested[step])]
    assert stops == [15, 20]  # handed in at 10, read at 15
