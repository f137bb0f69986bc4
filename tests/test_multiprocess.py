"""Two real processes (CPU backend, a local coordinator, gloo collectives, 2 simulated devices
each) running train.py the way README launches them, against one process over
the same 4 devices and the same global batches; checkpoints written by the two processes are
resumed by the two processes (past a damaged newest one) and by one process (which says that
the data order changes).

Each process reads its own shard of the data with its own shuffle (mae_jax.data.stream), so
"the same global batch" for the one-process reference is process 0's batch followed by
process 1's: the reference run gets exactly that stream. (segment.py's two-process
evaluation is pinned in test_seg_evaluation.py; its training shares this runtime and loop.)
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import (
    losses_of,
    params_of,
    tiny_finetune_config,
    tiny_pretrain_config,
    tiny_segmentation_config,
)

from mae_jax.core.run_logging import read_metrics
from mae_jax.data.generated import write_generated_images
from mae_jax.pretrain import lib as pretrain_lib
from mae_jax.segmentation import lib as segment_lib

pytestmark = pytest.mark.slow  # two processes each start JAX and compile: `pytest -m slow`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
TIMEOUT_S = 420

# tf.data input (each process its own shard); data.on_device="auto" would pick it on CPU too,
# after asking every device, other processes' included, for its memory (not allowed).
PRETRAIN = {"visualize_every_steps": 0, "total_steps": 4, "warmup_steps": 1,
            "checkpoint_every_steps": 2, "log_every_steps": 1, "data.on_device": "never"}
SEGMENT = {"total_steps": 2, "warmup_steps": 1, "checkpoint_every_steps": 2,
           "log_every_steps": 1, "eval_every_steps": 2, "num_pictures": 0, "mesh.data": -1}

CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import {factory}


def get_config(arg=None):
    return {factory}(**{changes!r})
"""


def write_config(path, factory, changes):
    path.write_text(CONFIG_FILE.format(tests=TESTS, factory=factory, changes=changes))
    return str(path)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(script, config_file, workdir, logs, statuses_wanted=(0, 0)):
    """Both processes of README's launch; returns their output (both must exit with
    `statuses_wanted`).

    The launches of one module share a compilation cache (`logs`/xla_cache): a resume reuses
    the programs its first run compiled."""
    port = free_port()
    processes = []
    for index in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(index),
               "JAX_COMPILATION_CACHE_DIR": str(logs / "xla_cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        name = f"{os.path.basename(script)}_{os.path.basename(workdir)}_{index}.log"
        log = open(logs / name, "w")  # noqa: SIM115
        command = [sys.executable, script, f"--config={config_file}", f"--workdir={workdir}",
                   "--multiprocess"]
        processes.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + TIMEOUT_S
    statuses = []
    for process, log in processes:
        try:
            statuses.append(process.wait(timeout=max(1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for other, _ in processes:
                other.send_signal(signal.SIGKILL)
            statuses.append("timeout")
        log.close()
    outputs = [open(log.name).read() for _, log in processes]
    assert statuses == list(statuses_wanted), "\n\n".join(output[-4000:] for output in outputs)
    return outputs


PROCESS_0_WORK = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[1]))
from mae_jax.core.processes import from_process_0
print("answer", from_process_0(lambda: 7, "answering"), flush=True)
def fail():
    raise OSError("run.lock is unreadable")
try:
    from_process_0(fail, "locking /runs/x")
except Exception as error:
    print(type(error).__name__, error, flush=True)
import errno
from mae_jax.core.processes import failing_together
for failing in (0, 1):  # a block every process enters, whose writes only process 0 does
    try:
        with failing_together(f"writing metrics.jsonl ({failing})"):
            if int(sys.argv[1]) == failing:
                raise OSError(errno.ENOSPC, "No space left on device")
    except Exception as error:
        print(type(error).__name__, error, getattr(error, "status", ""), flush=True)
with failing_together("writing nothing"):
    print("no failure", flush=True)
import os, signal
from mae_jax.core.entry import install_stop_handlers
install_stop_handlers()  # a stop signal outside the training loop: KeyboardInterrupt
try:
    with failing_together("writing the export"):
        if int(sys.argv[1]) == 1:  # this host alone is pre-empted
            os.kill(os.getpid(), signal.SIGTERM)
except (Exception, KeyboardInterrupt) as error:
    print(type(error).__name__, str(error)[:80], getattr(error, "status", ""), flush=True)
from mae_jax.core.processes import same_on_every_process
same_on_every_process(1281167, "the number of training images")
import numpy as np
from mae_jax.core.processes import sum_over_processes
counts = np.array([[3_000_000_000 + int(sys.argv[1]), 5]], np.int64)
print("summed", sum_over_processes(counts).tolist(), flush=True)
try:  # process 1's copy of the dataset lacks an image
    same_on_every_process(1281167 - int(sys.argv[1]), "the number of training images")
except Exception as error:
    print(type(error).__name__, error, flush=True)
from mae_jax.core.run import Run
from mae_jax.pretrain.config import defaults
with Run(defaults(), sys.argv[3] + "/shared"):
    print("one run, one workdir", flush=True)
changed = defaults()
changed.lr = 0.02 if sys.argv[1] == "1" else changed.lr  # an override given to one host
for config, workdir in ((changed, "/shared"), (defaults(), "/own" + sys.argv[1])):
    try:
        Run(config, sys.argv[3] + workdir)
    except Exception as error:
        print(type(error).__name__, str(error)[:300], flush=True)
"""


def test_what_process_0_does_alone_reaches_every_process_failures_included(tmp_path):
    """The workdir lock and the checkpoint check run on process 0 alone; the others waited for
    its answer in a broadcast, so an error there (not the one foreseen) left them waiting until
    JAX's heartbeat timeout killed them. Now every process gets the answer or the failure. And
    the training-image counts each process makes on its own are compared: every process stops
    when they differ."""
    script = tmp_path / "work.py"
    script.write_text(PROCESS_0_WORK)
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    processes = [subprocess.Popen([sys.executable, str(script), str(index), address,
                                   str(tmp_path)], env=env,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for index in range(2)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    for output in outputs:
        assert "answer 7" in output, output[-2000:]
    assert "OSError run.lock is unreadable" in outputs[0]
    assert ("ProcessFailedError Process 0 failed locking /runs/x (exit status 1); its log says "
            "why") in outputs[1]
    # A failure in a block every process enters reaches the others, with its exit status
    # (74: a full disk), whichever process it happened on.
    for failing in (0, 1):
        assert "OSError [Errno 28] No space left on device " in outputs[failing]
        assert (f"ProcessFailedError Process {failing} failed writing metrics.jsonl ({failing}) "
                "(exit status 74); its log says why. This process stops too instead of waiting "
                "for it. 74") in outputs[1 - failing], outputs[1 - failing][-2000:]
    assert all("no failure" in output for output in outputs)
    # A stop signal to one host outside the training loop (its own pre-emption) reaches the
    # others too (review: a KeyboardInterrupt skipped the exchange of statuses).
    assert "StopSignal SIGTERM outside the training loop" in outputs[1]
    assert ("ProcessFailedError Process 1 was stopped while writing the export (exit status "
            "130)") in outputs[0], outputs[0][-2000:]
    # Pixel counts past 2**31 (a class over a large validation set) summed exactly.
    assert all("summed [[6000000001, 10]]" in output for output in outputs)
    # Counts each process made on its own (its copy of the dataset) are compared.
    for output in outputs:
        assert ("BadDataError The processes disagree on the number of training images "
                "(process 0: 1281167, process 1: 1281166)") in output, output[-2000:]
    # QA: an override given to one host trained apart without a word (or hung at the first
    # step count that differed), and a workdir of its own on each host hung at the first
    # checkpoint. Both are refused on every process before any work.
    for index, output in enumerate(outputs):
        assert "one run, one workdir" in output
        assert "BadDataError The processes disagree on the config (a hash of it) (process 0: " \
            in output, output[-2000:]
        assert (f"WorkdirPathError Process(es) [1] do not see process 0's run.lock in --workdir "
                f"{tmp_path}/own{index}") in output, output[-2000:]


def two_process_stream(original):
    """The global batches of a 2-process run, in one process: process 0's then process 1's."""

    def create(**kwargs):
        streams = [original(**kwargs, process_index=i, process_count=2) for i in range(2)]
        while True:
            parts = [next(stream) for stream in streams]
            yield {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    return create


def assert_same_parameters(a, b, rtol=1e-4, atol=1e-6):
    jax.tree_util.tree_map_with_path(
        lambda path, x, y: np.testing.assert_allclose(
            without_zero_gradients(path, x), without_zero_gradients(path, y), rtol=rtol,
            atol=atol),
        a, b)


def without_zero_gradients(path, array):
    """Drops the parameters whose gradient is exactly zero in exact arithmetic: Adam turns
    their rounding noise, which depends on the reduction order, into +-lr steps (as in
    test_pretrain's device-count test). The attention key bias (softmax ignores a shift shared
    by all keys) and the neck's deconvolution biases (each feeds a BatchNorm, which removes
    any constant shift)."""
    names = [str(getattr(k, "key", getattr(k, "idx", ""))) for k in path]
    if names[-2:] == ["qkv", "bias"]:
        width = array.shape[0] // 3
        return np.concatenate([array[:width], array[2 * width:]])
    if "neck" in names and names[-1] == "bias" and "deconv" in names[-2]:
        return array[:0]
    return array


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    # Written once before any process starts (several processes writing one folder race).
    return write_generated_images(str(tmp_path_factory.mktemp("images")), count=32, size=16)


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory, images, shared_compilations):
    """(2-process workdir, 1-process workdir, log folder): train.py, 4 steps, checkpoints 2, 4."""
    root = tmp_path_factory.mktemp("pretrain")
    changes = {**PRETRAIN, "data.source": f"folder:{images}"}
    config_file = write_config(root / "config.py", "tiny_pretrain_config", changes)
    launch_two("train.py", config_file, root / "two", root)
    monkeypatch = pytest.MonkeyPatch()
    from mae_jax.data import images as image_data

    monkeypatch.setattr(image_data, "create_pretrain_iterator",
                        two_process_stream(image_data.create_pretrain_iterator))
    try:
        pretrain_lib.train_and_evaluate(tiny_pretrain_config(**changes), str(root / "one"),
                                        devices=jax.devices()[:4])
    finally:
        monkeypatch.undo()
    return root / "two", root / "one", root, config_file


def test_two_processes_train_like_one_process_over_the_same_global_batches(pretrain_runs):
    two, one, _, _ = pretrain_runs
    assert sorted(losses_of(two)) == [1, 2, 3, 4]
    assert losses_of(two) == pytest.approx(losses_of(one), rel=1e-5)
    # The input wait logged is the slowest process's (an all-gather at each log step), named.
    records = read_metrics(two)
    assert all(0 <= r["input_wait"] <= 1 and r["input_wait_process"] in (0, 1) for r in records)
    assert all("input_wait_process" not in r for r in read_metrics(one))
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]
    assert_same_parameters(params_of(two), params_of(one))


def test_two_processes_resume_their_checkpoints_past_a_damaged_one(pretrain_runs, tmp_path):
    two, _, logs, config_file = pretrain_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    data_file = max((os.path.join(r, n) for r, _, ns in os.walk(resumed / "checkpoints" / "4")
                     for n in ns), key=os.path.getsize)
    with open(data_file, "r+b") as handle:  # flipped bytes in the newest checkpoint
        handle.seek(100)
        handle.write(b"\xff\x00\xff")
    outputs = launch_two("train.py", config_file, resumed, logs)
    assert "is damaged" in outputs[0] and "Resuming from step 2." in outputs[1]
    assert any(name.startswith("4.damaged-") for name in os.listdir(resumed / "checkpoints"))
    assert losses_of(resumed) == losses_of(two)  # steps 3 and 4 again, the same values
    # The same processes run the same programs: bit for bit.
    jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(two))
    assert not any("process(es), this run has" in output for output in outputs)


FULL_DISK_AT_STEP_3 = """
import errno
from mae_jax.core import run_logging
append = run_logging.RunLogger._append
def full_disk_at_step_3(self, record):  # process 0 alone writes metrics.jsonl
    if record["step"] == 3:
        raise OSError(errno.ENOSPC, "No space left on device", self.metrics_path)
    append(self, record)
run_logging.RunLogger._append = full_disk_at_step_3
from mae_jax.core.entry import run
run("mae_jax.pretrain.lib", task="pretrain")
"""


def test_a_log_write_that_fails_on_process_0_stops_both_processes_with_its_status(
        pretrain_runs, tmp_path):
    """Process 0 alone writes metrics.jsonl. When that write failed (a full disk), process 0
    exited while process 1 went on into the next step's collective: on CPUs gloo then failed
    with "connection closed by peer" (exit status 1, naming nothing), on GPUs NCCL waited
    until JAX's heartbeat timeout. Now both stop at that step with process 0's status (74)
    and the checkpoint before it intact; process 0's error names the full disk in one line."""
    two, _, logs, config_file = pretrain_runs
    resumed = tmp_path / "full_disk"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")  # resumes from step 2
    runner = tmp_path / "train_full_disk.py"
    runner.write_text(FULL_DISK_AT_STEP_3)
    outputs = launch_two(str(runner), config_file, resumed, logs, statuses_wanted=(74, 74))
    metrics = resumed / "metrics.jsonl"
    assert ("ERROR: The disk is full: [Errno 28] No space left on device: "
            f"'{metrics}'. The checkpoints already written are intact") in outputs[0]
    assert ("ERROR: Process 0 failed writing the log of step 3 (exit status 74); its log says "
            "why.") in outputs[1], outputs[1][-3000:]
    assert "Traceback" not in outputs[0] + outputs[1]
    assert sorted(os.listdir(resumed / "checkpoints")) == ["2"]


SIGTERM_TO_PROCESS_1_IN_STEP_3 = """
import os, signal
import jax
from mae_jax.core import run
compile_step = run.compile_step
def compile_step_with_sigterm(*args, **kwargs):
    step, calls = compile_step(*args, **kwargs), []
    def counted(state, batch):
        calls.append(1)
        if len(calls) == 3 and jax.process_index() == 1:  # pre-empted: one host hears it
            os.kill(os.getpid(), signal.SIGTERM)
        return step(state, batch)
    return counted
run.compile_step = compile_step_with_sigterm
from mae_jax.core.entry import run
run("mae_jax.pretrain.lib", task="pretrain")
"""


def test_a_stop_signal_to_one_process_stops_both_within_a_few_steps(images, tmp_path):
    """The processes used to compare their stop flags only at log steps (every 50 by default:
    a minute for a large model, past a pre-emption's grace period). They now agree every
    STOP_CHECK_EVERY_STEPS (5) steps without waiting for the devices: a SIGTERM to process 1
    during step 3 is handed in at step 5 and read at step 10, where both save and stop, long
    before the log step at the end (12)."""
    changes = {**PRETRAIN, "data.source": f"folder:{images}", "total_steps": 12,
               "log_every_steps": 12, "checkpoint_every_steps": 12}
    config_file = write_config(tmp_path / "config.py", "tiny_pretrain_config", changes)
    runner = tmp_path / "train_sigterm.py"
    runner.write_text(SIGTERM_TO_PROCESS_1_IN_STEP_3)
    outputs = launch_two(str(runner), config_file, tmp_path / "run", tmp_path,
                         statuses_wanted=(75, 75))
    assert "Received SIGTERM" in outputs[1] and "Received SIGTERM" not in outputs[0]
    for output in outputs:
        assert "Stopped at step 10 on request" in output, output[-3000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["10"]


def test_one_process_resumes_the_two_processes_checkpoint_and_says_the_order_changes(
        pretrain_runs, images, tmp_path, capsys):
    """A multi-host job resumed on one host: the state carries on, but each process reads
    its own shard in its own order, so the data order after the resume cannot be the
    uninterrupted run's. The resume says so (the checkpoint records its process count)."""
    two, _, _, _ = pretrain_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    config = tiny_pretrain_config(**PRETRAIN, **{"data.source": f"folder:{images}"})
    result = pretrain_lib.train_and_evaluate(config, str(resumed), devices=jax.devices()[:4])
    out = capsys.readouterr().out
    assert result["step"] == 4 and "Resuming from step 2." in out
    assert "checkpoint of step 2 was written by 2 process(es), this run has 1" in out
    # Steps 3 and 4 again, on other examples than the two processes gave them.
    before, after = losses_of(two), losses_of(resumed)
    assert [after[s] for s in (1, 2)] == [before[s] for s in (1, 2)]
    assert all(np.isfinite(after[s]) and after[s] != before[s] for s in (3, 4))


def test_two_processes_fine_tune_on_the_devices_like_one_process(tmp_path, shared_compilations):
    """finetune.py with the training split on the devices (labels, crop, flip, RandAugment):
    each process's examples and draws (its ExampleSchedule, its RandAugment stream) form the
    global batch; one process whose iterator concatenates both processes' host parts trains
    to the same losses and parameters."""
    from mae_jax.classification import finetune
    from mae_jax.classification import lib as classification_lib
    from mae_jax.classification.synthetic import write_labelled_dataset
    from mae_jax.data.on_device import ExampleSchedule, OnDeviceIterator

    folder = write_labelled_dataset(str(tmp_path / "data"), num_train=64, num_val=16,
                                    num_classes=4, size=16)
    changes = {"data.source": f"folder:{folder}", "data.on_device": "always"}
    config_file = write_config(tmp_path / "config.py", "tiny_finetune_config", changes)
    outputs = launch_two("finetune.py", config_file, tmp_path / "two", tmp_path)
    assert all("Input on device: 64 images" in output for output in outputs)

    class BothProcesses(OnDeviceIterator):
        def __init__(self, images, **kwargs):
            super().__init__(images, **kwargs)
            self.schedules = [ExampleSchedule(
                len(images), global_batch_size=kwargs["global_batch_size"],
                seed=kwargs["seed"], process_index=p, process_count=2) for p in range(2)]

        def host_part(self, step, schedule=None):
            parts = [super(BothProcesses, self).host_part(step, s) for s in self.schedules]
            return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(classification_lib, "OnDeviceIterator", BothProcesses)
    try:
        finetune.train_and_evaluate(tiny_finetune_config(**changes), str(tmp_path / "one"),
                                    devices=jax.devices()[:4])
    finally:
        monkeypatch.undo()
    assert sorted(losses_of(tmp_path / "two")) == [1, 2, 3, 4]
    assert losses_of(tmp_path / "two") == pytest.approx(losses_of(tmp_path / "one"), rel=1e-5)
    assert_same_parameters(params_of(tmp_path / "two"), params_of(tmp_path / "one"))


def test_two_processes_run_segment_py_like_one_process(tmp_path, shared_compilations):
    """segment.py under README's launch: the same losses, parameters (BatchNorm statistics
    included) and evaluation as one process over the same 4 devices and global batches."""
    config_file = write_config(tmp_path / "config.py", "tiny_segmentation_config", SEGMENT)
    launch_two("segment.py", config_file, tmp_path / "two", tmp_path)
    from mae_jax.data import seg_input

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(seg_input, "create_seg_train_iterator",
                        two_process_stream(seg_input.create_seg_train_iterator))
    try:
        segment_lib.train_and_evaluate(
            tiny_segmentation_config(**SEGMENT), str(tmp_path / "one"), devices=jax.devices()[:4]
        )
    finally:
        monkeypatch.undo()
    assert losses_of(tmp_path / "two") == pytest.approx(losses_of(tmp_path / "one"), rel=1e-5)
    assert_same_parameters(params_of(tmp_path / "two"), params_of(tmp_path / "one"))
    (evaluated,) = read_metrics(str(tmp_path / "two"), kind="eval")
    (expected,) = read_metrics(str(tmp_path / "one"), kind="eval")
    assert evaluated["mIoU"] == pytest.approx(expected["mIoU"], rel=1e-5)
