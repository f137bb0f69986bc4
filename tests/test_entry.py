"""The shared command line of train.py and segment.py: workdirs, --multiprocess, exit status."""

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import ml_collections
import pytest
from conftest import FAST_COMPILE, load_config_file, run_listing_imports, set_fields

from mae_jax.core import command_line, entry, hostmem
from mae_jax.core import config as core_config
from mae_jax.core.checkpoint_integrity import CheckpointWriteError
from mae_jax.core.checkpointing import DamagedCheckpointsError
from mae_jax.core.config import ConfigError
from mae_jax.core.entry import default_workdir
from mae_jax.core.errors import (
    BadDataError,
    CheckpointMismatchError,
    DataNotFoundError,
    DataUnavailableError,
    ProcessFailedError,
    WeightsError,
)
from mae_jax.core.loop import NonFiniteLossError
from mae_jax.core.preemption import PreemptionGuard
from mae_jax.core.run_record import ConfigChangedError
from mae_jax.core.workdir import WorkdirLockedError, WorkdirPathError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_arguments_get_their_own_default_workdir():
    assert default_workdir("configs/cifar100_tiny.py") == "runs/cifar100_tiny"
    assert (
        default_workdir("configs/cifar100_tiny.py:decoder_depth=4,decoder_width=256")
        == "runs/cifar100_tiny_decoder_depth=4_decoder_width=256"
    )


def test_train_py_requires_a_config():
    """Also the restart for glibc's huge pages (mae_jax.core.hostmem), where this machine has
    them: once, same exit status."""
    env = {k: v for k, v in os.environ.items()
           if k not in (hostmem.SWITCH, "GLIBC_TUNABLES")}
    result = subprocess.run(
        [sys.executable, "train.py"], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=env,
    )
    assert result.returncode == entry.EXIT_BAD_INPUT
    assert "--config" in result.stderr
    restarts = result.stderr.count("mae_jax: restarting with GLIBC_TUNABLES")
    assert restarts == (hostmem.hugepage_environ(env) is not None), result.stderr


def test_a_bad_huge_page_switch_is_bad_input():
    env = {**os.environ, hostmem.SWITCH: "yes"}
    result = subprocess.run([sys.executable, "train.py", "--config=configs/demo.py"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == entry.EXIT_BAD_INPUT
    assert "MAE_JAX_MALLOC_HUGEPAGES='yes': use 0 (off) or 1" in result.stderr


@pytest.mark.parametrize(
    "error,status",
    [
        (NonFiniteLossError("nan"), 3),
        (CheckpointWriteError(errno.ENOSPC, "disk full"), 74),
        (ValueError("RESOURCE_EXHAUSTED: Error writing local file"), 74),  # orbax's full disk
        (OSError(errno.ENOSPC, "No space left on device"), 74),
        (ValueError("Invalid config:\n  - batch_size must be >= 1"), 2),
        (ConfigError("warmup (50 steps) must be shorter than training (30 steps)"), 2),
        (FileNotFoundError("no such data"), 2),
        (ConfigChangedError("lr changed"), 2),
        (WorkdirLockedError("in use"), 2),
        (DamagedCheckpointsError("all damaged"), 2),
        (DataNotFoundError("image folder '/x' does not exist"), 2),
        (BadDataError("no images in folder '/x'"), 2),
        (DataUnavailableError("could not download/prepare TFDS dataset 'cifar100'"), 2),
        (CheckpointMismatchError("the checkpoint does not fit this config"), 2),
        (WeightsError("the source encoder has 12 trained weight(s) the target has no place for"),
         2),
        (WorkdirPathError("--workdir /x is a file, not a directory"), 2),
        (RuntimeError("a bug"), 1),
        (KeyboardInterrupt(), 130),
        # Another process's failure: its status (mae_jax.core.processes).
        (ProcessFailedError("Process 0 failed writing metrics.jsonl", 74), 74),
        (ProcessFailedError("Process 1 failed writing config.json", 2), 2),
        # Another process gone outside the blocks that share failures (QA: gloo's ValueError
        # was exit status 2, "bad input", which tells a scheduler not to retry).
        (ValueError("UNKNOWN: Gloo AllGather failed: [gloo/transport/tcp/pair.cc:534] Read "
                    "error [127.0.0.1]:5000: Connection reset by peer"), 1),
        (RuntimeError("Unable to initialize backend 'cpu': UNAVAILABLE: recvmsg:Connection "
                      "reset by peer"), 1),
    ],
)
def test_each_kind_of_failure_has_its_exit_status(error, status):
    assert entry.exit_status(error) == status
    assert status in entry.EXIT_MEANINGS
    # Bad input that names its fix is printed without a traceback; a bug keeps it.
    explained = (ConfigError, DataNotFoundError, BadDataError, DataUnavailableError,
                 CheckpointMismatchError, WeightsError, WorkdirPathError, ConfigChangedError,
                 WorkdirLockedError, DamagedCheckpointsError, NonFiniteLossError,
                 CheckpointWriteError, KeyboardInterrupt, ProcessFailedError)
    message = entry.explanation(error)
    # A full disk outside a checkpoint (metrics.jsonl, eval_results.json) is one line too,
    # and so is another process gone.
    gone = "by peer" in str(error)
    assert (message is not None) == (isinstance(error, explained) or status == 74 or gone)
    if gone:
        assert message.startswith("Lost contact with another process of this run (") and (
            "launch every process again with the same command to resume") in message
    if status == 74 and not isinstance(error, (CheckpointWriteError, ProcessFailedError)):
        assert message.startswith("The disk is full: ") and "free space" in message


def test_a_step_that_does_not_fit_the_devices_memory_is_bad_input_naming_the_fixes():
    """XLA's out-of-memory error is RESOURCE_EXHAUSTED, as TensorStore's full disk is: it used
    to be reported as a checkpoint that could not be written (74, "free space"). It is now bad
    input (2) naming what to change, without XLA's buffer dump. The first error is XLA's own,
    raised here by a 1 PiB allocation on the CPU (beyond any address space, so nothing is
    allocated); the others are XLA's GPU and TPU wordings, as reported in jax-ml/jax#13428,
    google-deepmind/jax_privacy#10 and pytorch/xla#3470."""
    from mae_jax.core import checkpoint_integrity
    from mae_jax.core.errors import DeviceMemoryError, device_memory_error

    with pytest.raises(jax.errors.JaxRuntimeError) as real:
        jax.jit(lambda: jax.numpy.zeros((2**25, 2**25), jax.numpy.uint8))().block_until_ready()
    gpu_buffers = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                               "6291456 bytes.\nBufferAssignment OOM Debugging.\n...")
    gpu_allocator = RuntimeError("RESOURCE_EXHAUSTED: Failed to allocate request for 2.99GiB "
                                 "(3206250496B) on device ordinal 0")
    tpu = RuntimeError("RESOURCE_EXHAUSTED: Attempting to reserve 6.48G at the bottom of "
                       "memory. That was not possible. There are 6.78G free.")
    for error in (real.value, gpu_buffers, gpu_allocator, tpu):
        assert not checkpoint_integrity.is_out_of_space(error)
        explained = device_memory_error(error, {"batch_size": 8, "grad_accum_steps": 1})
        assert isinstance(explained, DeviceMemoryError)
        assert entry.exit_status(explained) == entry.EXIT_BAD_INPUT
        assert entry.explanation(explained)
        message = str(explained)
        assert message.startswith("The devices ran out of memory (RESOURCE_EXHAUSTED: ")
        assert "BufferAssignment" not in message
        for fix in ("grad_accum_steps=K", "model.dtype=bfloat16", "mesh.fsdp=K",
                    "XLA_PYTHON_CLIENT_MEM_FRACTION", "Checkpoints already written are intact"):
            assert fix in message
    segmentation = str(device_memory_error(gpu_buffers, {"batch_size": 16}))
    assert "grad_accum_steps" not in segmentation and "eval_batch_size" not in segmentation
    assert "(--config_change_ok for batch_size or model.dtype;" in segmentation
    finetuning = str(device_memory_error(gpu_buffers, {"batch_size": 8, "grad_accum_steps": 1,
                                                        "eval_batch_size": 8}))
    assert "eval_batch_size, for an evaluation" in finetuning
    assert "(--config_change_ok for batch_size, grad_accum_steps or model.dtype;" in finetuning
    # The step's error can surface where a checkpoint save reads the state (async dispatch):
    # it is no failed write (review: every error of a save was "Could not write checkpoint",
    # exit 74, with no traceback), so it goes on, noted with the checkpoint, and is found.
    saving = types.SimpleNamespace(saving_step=4, directory="/run/checkpoints",
                                   latest_step=lambda: 2)
    with pytest.raises(type(gpu_allocator)) as passed_on:
        with checkpoint_integrity.WriteErrors(saving):
            raise gpu_allocator
    assert "(while saving checkpoint 4 in /run/checkpoints)" in passed_on.value.__notes__
    message = str(device_memory_error(passed_on.value, {}))
    assert message.startswith("The devices ran out of memory (RESOURCE_EXHAUSTED: Failed to "
                              "allocate request for 2.99GiB (3206250496B) on device ordinal 0)")
    # A bug met while saving (metadata JSON cannot hold) keeps its type, hence its traceback
    # and exit status 1; the storage failing (an OSError, TensorStore's I/O errors) is a
    # failed write, exit status 74, with "Fix the cause" unless the disk is full.
    with pytest.raises(TypeError, match="not JSON serializable"):
        with checkpoint_integrity.WriteErrors(saving):
            raise TypeError("Object of type int64 is not JSON serializable")
    for storage in (PermissionError(errno.EACCES, "Permission denied", "/run/checkpoints/4"),
                    ValueError('PERMISSION_DENIED: Error opening file "/run/checkpoints/4"'),
                    ValueError('Error writing local file "/run/x": [OS error: Input/output '
                               'error]')):
        with pytest.raises(CheckpointWriteError) as wrapped:
            with checkpoint_integrity.WriteErrors(saving):
                raise storage
        assert "Could not write checkpoint 4" in str(wrapped.value)
        assert "Fix the cause" in str(wrapped.value) and "free space" not in str(wrapped.value)
        assert entry.exit_status(wrapped.value) == entry.EXIT_WRITE_FAILED
    # Another process gone while the processes meet to commit a save is no failed write
    # (review: JAX's UNAVAILABLE / DEADLINE_EXCEEDED read as the storage failing).
    for gone in (RuntimeError("UNAVAILABLE: The following tasks are unhealthy (stopped sending "
                              "heartbeats): 1"),
                 ValueError("DEADLINE_EXCEEDED: Barrier timed out. Id: orbax_save_4")):
        with pytest.raises(type(gone)) as passed_on:
            with checkpoint_integrity.WriteErrors(saving):
                raise gone
        assert entry.exit_status(passed_on.value) == entry.EXIT_FAILED
        assert entry.explanation(passed_on.value).startswith("Lost contact with another process")
    # Ctrl-C while unwinding from it stays an interruption; a full disk met while unwinding
    # from it stays a full disk.
    try:
        try:
            raise gpu_allocator
        except RuntimeError:
            raise KeyboardInterrupt from None
    except KeyboardInterrupt as interrupt:
        interrupted = interrupt
    assert device_memory_error(interrupted, {}) is None
    try:
        try:
            raise gpu_allocator
        except RuntimeError:
            raise OSError(errno.ENOSPC, "No space left on device")  # noqa: B904
    except OSError as full:
        assert checkpoint_integrity.is_out_of_space(full)
    # bfloat16 is suggested only to a run that is not in it already.
    assert "model.dtype=bfloat16;" not in str(device_memory_error(
        gpu_buffers, {"batch_size": 8, "model": {"dtype": "bfloat16"}}))
    # A full disk (orbax's RESOURCE_EXHAUSTED) stays a failed write, and other errors are left.
    disk = ValueError("RESOURCE_EXHAUSTED: Error writing local file")
    assert device_memory_error(disk, {}) is None
    assert entry.exit_status(disk) == entry.EXIT_WRITE_FAILED
    assert device_memory_error(RuntimeError("a bug"), {}) is None


def test_command_line_mistakes_are_one_message_naming_the_fix(tmp_path):
    """What absl and ml_collections raise for a missing config file, a misspelt field and a
    config argument of the wrong type, unwrapped: exit 2, no traceback. And what they let
    through: a stray argument (absl's usage text, exit 1), an empty --workdir (an unset
    variable: the run went to runs/<config> of the current directory, resuming whatever was
    there) and a config file whose get_config() returns nothing ("--config is required")."""
    env = {**os.environ, hostmem.SWITCH: "0"}
    empty = tmp_path / "empty.py"
    empty.write_text("def get_config(arg=None):\n    pass\n")
    expected = {
        "extra_positional": "Bad command line: unexpected arguments ['extra_positional']: "
                            "every setting is a flag",
        "--workdir=": "Bad command line: --workdir is empty (an unset variable?)",
        f"--config={empty}": f"Bad command line: --config={empty}: its get_config() returned "
                             "None",
        "--config=configs/nope.py": "Bad command line: cannot load the --config file: [Errno 2] "
                                    "No such file or directory: 'configs/nope.py'",
        "--config.batch_sise=32": "Bad command line: --config.batch_sise: the config has no "
                                  "field 'batch_sise'. Did you mean \"batch_size\"",
        # QA: a missing parent field was ml_collections' traceback.
        "--config.train.steps=5": "Bad command line: --config.train.steps: the config has no "
                                  "field 'train'. The fields are those its config file sets.",
        "--config=configs/cifar100_tiny.py:decoder_depth=x": "Config argument "
                                                            "decoder_depth='x': expected an "
                                                            "integer, e.g. decoder_depth=4.",
    }
    # --help is what was asked for: status 0 (absl's own parser exits 1).
    helped = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env=env)
    assert helped.returncode == 0 and "Exit status: 0 completed" in helped.stdout, helped.stderr
    for flag, message in expected.items():
        config = [] if flag.startswith("--config=") else ["--config=configs/demo.py"]
        result = subprocess.run([sys.executable, "train.py", *config, flag], capture_output=True,
                                text=True, timeout=120, cwd=ROOT, env=env)
        assert result.returncode == entry.EXIT_BAD_INPUT, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_command_line_mistakes_are_found_before_jax_tensorflow_or_torch_load():
    """A misspelt field with every configs/*.py, a config for another script and a config value
    that no device count makes right: `import mae_jax`, the entry module and the config files
    load none of the heavy libraries (mae_jax/__init__.py imports its public names on first
    use), so the CPU restart for huge pages (`mae_jax.core.hostmem`) and a mistaken command
    line cost ~0.3 s, not the ~3.5 s of importing JAX, Flax and Orbax first (each time, on 2
    vCPUs)."""
    configs = sorted(name for name in os.listdir(os.path.join(ROOT, "configs"))
                     if name.endswith(".py"))
    assert len(configs) >= 11
    for name in configs:
        result, heavy = run_listing_imports(
            ["train.py", f"--config=configs/{name}", "--config.batch_sise=3"])
        assert result.returncode == entry.EXIT_BAD_INPUT, (name, result.stderr[-2000:])
        assert "the config has no field 'batch_sise'" in result.stderr, name
        assert heavy == [], name
    # A config for another script: refused as early (train.py's task is "pretrain").
    result, heavy = run_listing_imports(["train.py", "--config=configs/seg_demo.py"])
    assert result.returncode == entry.EXIT_BAD_INPUT, result.stderr[-2000:]
    assert "ERROR: This config is for task 'segment', not 'pretrain' (train.py): run it with " \
        "`python segment.py`." in result.stderr and "Traceback" not in result.stderr
    assert heavy == []
    # A value wrong whatever the devices, one per task's check_config (core.config.check_early);
    # those that need the device count (batch_size vs devices) wait for JAX.
    for args, message in [
        (["train.py", "--config=configs/demo.py", "--config.keep_checkpoints=0"],
         "keep_checkpoints must be >= 1, got 0"),
        (["segment.py", "--config=configs/seg_demo.py", "--config.warmup_steps=100000"],
         "warmup_steps 100000 must be < total_steps 500"),
        (["finetune.py", "--config=configs/finetune_demo.py", "--config.mixup=-1"],
         "mixup -1.0 and cutmix 1.0 must be >= 0"),
        (["linprobe.py", "--config=configs/probe_demo.py", "--config.eval_batch_size=0"],
         "eval_batch_size 0 must be >= 1"),
        (["train.py", "--config=configs/demo.py", "--config.mesh.fsdp=0"],
         "mesh.data=-1 x mesh.fsdp=0: each must be >= 1 or -1"),
        # QA: a traceback once JAX had started.
        (["train.py", "--config=configs/demo.py", "--config.data.source=generated:0"],
         "data.source 'generated:0': use generated:N with N >= 1 images"),
        (["finetune.py", "--config=configs/finetune_demo.py", "--config.data.source=imagenet"],
         "data.source 'imagenet' is not tfds:NAME, folder:PATH or generated:N"),
        # A negative lr was taken for "not set" and base_lr used instead.
        (["train.py", "--config=configs/demo.py", "--config.lr=-1"],
         "lr -1.0 must be >= 0 (0: not set)"),
    ]:
        result, heavy = run_listing_imports(args)
        assert result.returncode == entry.EXIT_BAD_INPUT, (args, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert heavy == [], args


@pytest.mark.parametrize("name", ["demo", "seg_demo", "probe_demo", "finetune_demo"])
def test_the_early_check_leaves_what_needs_the_device_count_to_the_library(name):
    """core.config.check_early (before JAX: no device count) passes batch sizes that only
    some device counts refuse; the task's own check_config, with the count, refuses them. A
    value no device count makes right is refused by both."""
    config = load_config_file(name)
    task = config.task
    uneven = {"batch_size": 6}
    messages = ["batch_size 6 must be a multiple of the 4 devices"]
    if task == "pretrain":  # the k-NN monitor's batch too
        uneven.update({"knn.every_steps": 1, "knn.batch_size": 6})
        messages.append("knn.batch_size 6 must be a multiple of the 4 devices")
    elif task in ("linprobe", "finetune"):  # and the evaluation's
        uneven["eval_batch_size"] = 6
        messages.append("eval_batch_size 6 must be a multiple of the 4 devices")
    uneven = set_fields(config.copy_and_resolve_references(), uneven)
    core_config.check_early(uneven, task)
    with pytest.raises(ConfigError) as refused:
        core_config.check_task_config(uneven, task, num_devices=4, num_processes=1)
    for message in messages:
        assert message in str(refused.value), (message, str(refused.value))
    wrong = set_fields(config.copy_and_resolve_references(), {"log_every_steps": 0})
    for check in (lambda: core_config.check_early(wrong, task),
                  lambda: core_config.check_task_config(wrong, task, num_devices=1,
                                                        num_processes=1)):
        with pytest.raises(ConfigError, match="log_every_steps must be >= 1, got 0"):
            check()


def test_every_spelling_of_help_counts_as_asking_for_it():
    # absl prints the help for each of these and exits 1; the entry points then exit 0.
    for flag in ("--help", "-help", "--help=true", "-?", "--helpshort", "--helpfull",
                 "--helpxml"):
        assert command_line.asked_for_help(["train.py", "--config=c.py", flag]), flag
    for argv in (["train.py", "--config=help.py"], ["train.py", "--helper=1"], ["help"]):
        assert not command_line.asked_for_help(argv), argv


def test_multiprocess_reads_the_coordinator_from_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    before = jax.config.jax_cpu_collectives_implementation
    try:
        entry.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                                      "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
        entry.initialize_distributed({})  # SLURM / Open MPI / ...: jax detects them
        with pytest.raises(ValueError, match="set JAX_PROCESS_ID too"):
            entry.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                                          "JAX_NUM_PROCESSES": "2"})
        # No variable and no cluster JAX knows: one message naming the variables (QA: JAX's
        # bare "coordinator_address should be defined").
        def no_cluster(**kwargs):
            raise ValueError("coordinator_address should be defined.")

        monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
        with pytest.raises(ValueError, match=r"--multiprocess found no cluster to join "
                           r"\(coordinator_address should be defined.\): set "
                           "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID") as error:
            entry.initialize_distributed({})
        assert entry.explanation(error.value) is not None  # one line, no traceback
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
    assert calls == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}, {}
    ]


CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_pretrain_config


def get_config(arg=None):
    return tiny_pretrain_config(total_steps=100_000, warmup_steps=1, log_every_steps=1,
                                checkpoint_every_steps=100_000, visualize_every_steps=0)
"""


def test_sigterm_saves_and_exits_75_and_a_changed_resume_exits_2(tmp_path):
    config = tmp_path / "long.py"
    config.write_text(CONFIG_FILE.format(tests=os.path.join(ROOT, "tests")))
    workdir = tmp_path / "run"
    command = [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}"]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (workdir / "metrics.jsonl").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no training step within 300 s"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)  # e.g. a pre-empted job
    output, _ = process.communicate(timeout=120)
    assert process.returncode == entry.EXIT_PREEMPTED, output[-3000:]
    assert "re-run the same command to resume" in output
    steps = [name for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
    assert len(steps) == 1 and int(steps[0]) < 100_000

    changed = subprocess.run(command + ["--config.lr=0.5"], cwd=ROOT, env=env, text=True,
                             capture_output=True, timeout=300)
    assert changed.returncode == entry.EXIT_BAD_INPUT
    assert "lr: 0.001 -> 0.5" in changed.stderr and "--config_change_ok" in changed.stderr
    assert "Traceback" not in changed.stderr  # the message is the whole story


def test_a_stop_signal_outside_the_training_loop_is_a_message_not_a_silent_kill(capsys):
    """SIGTERM during start-up (or eval_only, the export) used to kill the process
    with status 143 and no word; now it is an interruption (130) that says where it came."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        entry.install_stop_handlers()
        for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            with pytest.raises(KeyboardInterrupt, match=f"{name} outside the training loop.*"
                               "re-run the same command") as error:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler runs at the next bytecode
            assert entry.exit_status(error.value) == entry.EXIT_INTERRUPTED
        # One raised in a finaliser, where Python ignores it (QA: a TensorFlow object's
        # __del__ during the export; the run then finished, exit status 0), comes again
        # in the run's own code.
        class Finalised:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs in here
                    pass

        with pytest.raises(KeyboardInterrupt, match="SIGTERM outside the training loop"):
            Finalised()  # collected at once
            time.sleep(5)
        assert "SIGTERM came while Python was finalising an object: it is acted on now." in (
            capsys.readouterr().err)
        # Inside the loop a second Ctrl-C stops at once, with a message (was an empty line).
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
            assert guard.requested
            with pytest.raises(KeyboardInterrupt, match="a second Ctrl-C: stopped at once"):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        assert signal.getsignal(signal.SIGTERM) is entry.stop_outside_the_loop  # put back
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_sigterm_during_a_multiprocess_start_up_stops_the_run(tmp_path):
    """`--multiprocess` starts jax.distributed, whose pre-emption service installed a C++
    SIGTERM handler over ours: a SIGTERM during start-up (restore, data, compilation) was
    swallowed and the job trained on until SIGKILL (seen: still running 60 s after it). One
    process of README's launch, SIGTERM once its mesh is printed: exit 130 with the message."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, hostmem.SWITCH: "0", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
    process = subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={tmp_path}",
         "--multiprocess", "--config.total_steps=100000"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            if line.startswith("Mesh:"):
                process.send_signal(signal.SIGTERM)
                break
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    # (Were the loop already running, its guard would save and stop: 75. Either way it stops.)
    assert process.returncode in (entry.EXIT_INTERRUPTED, entry.EXIT_PREEMPTED), output[-3000:]
    assert ("SIGTERM outside the training loop" in output
            if process.returncode == entry.EXIT_INTERRUPTED else "Received SIGTERM" in output)


def test_segment_py_bad_input_exits_2(tmp_path):
    results = []
    for override in ("--config.keep_checkpoints=0", "--config.no_such_field=1"):
        result = subprocess.run(
            [sys.executable, "segment.py", "--config=configs/seg_demo.py",
             f"--workdir={tmp_path}", override],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )
        assert result.returncode == entry.EXIT_BAD_INPUT, result.stderr[-2000:]
        results.append(result.stderr)
    # A config check's message is the whole story (ConfigError): no traceback.
    assert "ERROR: Invalid config:\n  - keep_checkpoints must be >= 1, got 0\n" in results[0]
    assert "Traceback" not in results[0]
    assert ("--config.no_such_field: the config has no field 'no_such_field'. The fields are "
            "those its config file sets." in results[1])


def test_config_change_ok_reaches_the_config():
    try:
        entry.FLAGS(["train.py", "--config=configs/demo.py", "--config_change_ok"])
        config = entry.config_from_flags()  # the config is locked: the flag unlocks it once
        assert config.config_change_ok is True and config.is_locked
    finally:
        entry.FLAGS.unparse_flags()


def test_mesh_cpu_devices_splits_the_cpu_before_jax_starts(tmp_path):
    """`config.mesh.cpu_devices=N` reaches JAX's CPU backend (the batch check counts N devices);
    with XLA_FLAGS also setting the count, or a bad value, it is one clear error (exit 2)."""
    def cpu_devices(count):
        return ml_collections.ConfigDict({"mesh": {"cpu_devices": count}})

    for bad in (-1, True, "2"):
        with pytest.raises(ConfigError, match="mesh.cpu_devices"):
            core_config.apply_cpu_devices(cpu_devices(bad))
    assert core_config.apply_cpu_devices(cpu_devices(0)) == 0  # JAX's default: nothing set

    command = [sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={tmp_path}",
               "--config.mesh.cpu_devices=3", "--config.batch_size=16"]
    plain = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    split = subprocess.run(command, cwd=ROOT, env=plain, capture_output=True, text=True,
                           timeout=300)
    assert split.returncode == entry.EXIT_BAD_INPUT, split.stderr[-2000:]
    assert "batch_size 16 must be a multiple of the 3 devices" in split.stderr

    counted = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    both = subprocess.run(command, cwd=ROOT, env=counted, capture_output=True, text=True,
                          timeout=300)
    assert both.returncode == entry.EXIT_BAD_INPUT, both.stderr[-2000:]
    assert "both set the CPU device count" in both.stderr and "Traceback" not in both.stderr


def test_a_workdir_that_is_a_file_is_refused_by_name(tmp_path):
    from mae_jax.core.workdir import ensure_workdir

    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(WorkdirPathError, match="is a file, not a directory"):
        ensure_workdir(str(path))
    assert path.read_text() == "mine"
    # A directory that cannot be made (here under /sys, which no one may write): the same one
    # line as one that cannot be written, not makedirs' traceback.
    with pytest.raises(WorkdirPathError, match="Cannot write to workdir /sys/mae_jax_run"):
        ensure_workdir("/sys/mae_jax_run")


def test_the_last_line_gives_a_large_table_as_its_size():
    """QA: segmentation's Done line carried the 150 per-class results, ~9 KB on one line."""
    per_class = {f"class_{i}": {"IoU": 1.0, "Acc": 1.0} for i in range(150)}
    result = {"mIoU": 48.1, "step": 10, "per_class": per_class, "export": {"pth": "a.pth"}}
    assert entry.brief(result) == {"mIoU": 48.1, "step": 10, "per_class": "<150 entries>",
                                   "export": {"pth": "a.pth"}}
    assert entry.brief(5) == 5


def test_a_tuple_field_given_twice_is_refused_a_scalar_takes_the_last():
    """ml_collections joins a tuple field's values when the override comes twice (QA:
    --config.data.scale=(64,32) --config.data.scale=(80,40) gave (64, 32, 80, 40))."""
    config = load_config_file("seg_demo")
    config.data.scale = (64, 32, 80, 40)  # what ml_collections made of the two
    argv = ["segment.py", "--config=configs/seg_demo.py", "--config.data.scale=(64,32)",
            "--config.data.scale=(80,40)", "--config.lr=1", "--config.lr=2"]
    with pytest.raises(command_line.CommandLineError, match=r"--config.data.scale is given 2 "
                       r"times: .* \(here \(64, 32, 80, 40\)\)"):
        command_line._refuse_repeated_tuples(config, "config", argv)
    command_line._refuse_repeated_tuples(config, "config", argv[:3] + argv[4:])  # lr: scalar
