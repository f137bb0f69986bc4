"""The command line of train.py, segment.py, linprobe.py and finetune.py (absl flags +
ml_collections configs).

Exit status (for schedulers and scripts):
    0   completed
    1   unexpected error (a bug?): the traceback says where
    2   bad input: config, command line, data, a workdir in use, checkpoints that do not fit
        the config or are all damaged, a step that does not fit the devices' memory; fix it
        and re-run
    3   diverged: NaN/inf loss, gradients or parameters; no bad state was saved
    74  a checkpoint or log could not be written (e.g. disk full); free space, re-run to resume
    75  pre-empted (SIGTERM / Ctrl-C): a checkpoint was saved; re-run the same command to resume
    130 interrupted by a second Ctrl-C, or by SIGTERM / Ctrl-C outside the training loop
        (start-up, eval_only, the export): nothing more was saved
"""

from __future__ import annotations

import importlib
import logging as std_logging
import os
import signal
import sys
import threading
import traceback
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mae_jax.core import command_line, hostmem  # noqa: E402
from mae_jax.core.errors import (  # noqa: E402
    EXIT_BAD_INPUT,
    EXIT_COMPLETED,
    EXIT_DIVERGED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_WRITE_FAILED,
    BadInputError,
    ProcessFailedError,
    device_memory_error,
    lost_peer,
)
from mae_jax.core.statuses import diverged, exit_status  # noqa: E402

EXIT_MEANINGS = {
    EXIT_FAILED: "unexpected error",
    EXIT_BAD_INPUT: "bad input; fix it and re-run",
    EXIT_DIVERGED: "diverged; checkpoints hold only states that passed the finiteness check",
    EXIT_WRITE_FAILED: "a checkpoint or log could not be written; fix the cause and re-run to "
                       "resume",
    EXIT_PREEMPTED: "pre-empted after saving; re-run the same command to resume",
    EXIT_INTERRUPTED: "interrupted",
}
COORDINATOR_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
flags.DEFINE_bool("multiprocess", False, "Initialise JAX's multi-process runtime (multi-host): "
                  "from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID when set, "
                  "else detected (SLURM, Open MPI, TPU pods).")
flags.DEFINE_bool("config_change_ok", False, "Resume even though hyperparameters changed; the "
                  "changes are recorded in <workdir>/config_history.jsonl with the step.")


def default_workdir(config_flag: str) -> str:
    """runs/<config name>[_<config argument>]: 'configs/cifar100_tiny.py:decoder_depth=4' ->
    'runs/cifar100_tiny_decoder_depth=4', so ablations never share a run directory."""
    path, _, argument = config_flag.partition(".py:")
    name = os.path.splitext(os.path.basename(path))[0]
    if argument:
        name += "_" + argument.replace(",", "_").replace("/", "-")
    return os.path.join("runs", name)


def initialize_distributed(environ=os.environ) -> dict:
    """jax.distributed.initialize for --multiprocess; returns the arguments it was given.

    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID
    when set (jax's own initialize() reads only the first); otherwise JAX detects SLURM,
    Open MPI, TPU pods or Kubernetes. On the CPU backend collectives go through gloo.
    """
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's own pre-emption service (on by default) installs a C++ SIGTERM handler that only
    # sets a flag for multihost_utils.reached_preemption_sync_point, which we do not use: it
    # replaced our stop handlers, so a SIGTERM during start-up (restore, data, compilation:
    # minutes at scale) was swallowed and the job ran on until SIGKILL. Our own (all processes
    # agree at log steps, core.preemption) stay in charge.
    jax.config.update("jax_enable_preemption_service", False)
    given = {name: environ[name] for name in COORDINATOR_VARIABLES if environ.get(name)}
    from mae_jax.core.config import ConfigError  # no JAX

    kwargs = {}
    if given:
        missing = [name for name in COORDINATOR_VARIABLES if name not in given]
        if missing:
            raise ConfigError(f"--multiprocess: set {', '.join(missing)} too (got "
                              f"{', '.join(given)}), or none of them to auto-detect.")
        try:
            kwargs = {"coordinator_address": given["JAX_COORDINATOR_ADDRESS"],
                      "num_processes": int(given["JAX_NUM_PROCESSES"]),
                      "process_id": int(given["JAX_PROCESS_ID"])}
        except ValueError:
            raise ConfigError("--multiprocess: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                              f"integers, got {given}.") from None
        print(f"Process {kwargs['process_id']} of {kwargs['num_processes']}: joining the "
              f"coordinator at {kwargs['coordinator_address']} (JAX waits up to 5 minutes for "
              "every process).", flush=True)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as error:  # nothing given, and no cluster JAX knows
        if kwargs or "should be defined" not in str(error):
            raise
        raise ConfigError(f"--multiprocess found no cluster to join ({error}): set "
                          f"{', '.join(COORDINATOR_VARIABLES)} (README: several hosts), or "
                          "run without --multiprocess.") from None
    return kwargs


def explanation(error: BaseException) -> str | None:
    """The message of an error that is the whole story (no traceback), else None."""
    from mae_jax.core import checkpoint_integrity as integrity

    if diverged(error) or isinstance(error, (integrity.CheckpointWriteError, BadInputError,
                                              KeyboardInterrupt, ProcessFailedError)):
        return str(error) or "interrupted (Ctrl-C)"
    peer = lost_peer(error)
    if peer and not isinstance(error, BadInputError):
        return (f"Lost contact with another process of this run ({peer}): it stopped, failed "
                "or was killed, and its log says why. Checkpoints already written are intact: "
                "launch every process again with the same command to resume.")
    if integrity.is_out_of_space(error):  # metrics.jsonl, eval_results.json, an export
        return (f"The disk is full: {error}. The checkpoints already written are intact: "
                "free space, then re-run the same command to resume.")
    return None


class _FirstOrbaxErrorOnly(std_logging.Filter):
    """A failed background write (e.g. a full disk) is logged by several of orbax's threads,
    each with a full traceback, before the run reports it: keep the first, as one line."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno < std_logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if self.seen:
            return False
        self.seen = True
        record.exc_info, record.exc_text = None, None
        return True


def config_from_flags():
    """--config with --config_change_ok folded in (as `config.config_change_ok`, which
    `mae_jax.core.run_record` reads and never compares)."""
    config = FLAGS.config
    if FLAGS.config_change_ok:
        with config.unlocked():
            config.config_change_ok = True
    return config


def _parse_flags(argv):
    """absl's parser; a bad flag, config file or override is exit status 2, in one message."""
    return command_line.parse_flags(FLAGS, argv, configs=("config",))


class StopSignal(KeyboardInterrupt):
    """A stop signal (`signum`) outside the training loop."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def stop_outside_the_loop(signum: int, frame) -> None:
    """SIGTERM / Ctrl-C where the training loop's guard is not listening (start-up, eval_only,
    the export): stop at once, saying so (SIGTERM would otherwise kill silently)."""
    del frame
    raise StopSignal(signum, (
        f"{signal.Signals(signum).name} outside the training loop (start-up, an eval_only "
        "evaluation, the export): stopped at once. Checkpoints already written are intact: "
        "re-run the same command to resume."))


def _send_swallowed_stops_again(unraisable) -> bool:
    """A StopSignal raised inside a finaliser (e.g. a TensorFlow object's __del__ run by the
    garbage collector) is ignored by Python: "Exception ignored in ...", then the run went on
    as if no signal had come (QA: a SIGTERM during the export ended in exit status 0 after
    printing "stopped at once"). The signal is sent again 50 ms later, to land in the run's
    own code. Returns whether `unraisable` was such a stop."""
    error = unraisable.exc_value
    if not isinstance(error, StopSignal):
        return False
    print(f"{signal.Signals(error.signum).name} came while Python was finalising an object: "
          "it is acted on now.", file=sys.stderr, flush=True)
    again = threading.Timer(0.05, os.kill, (os.getpid(), error.signum))
    again.daemon = True  # a run that is ending ends
    again.start()
    return True


def install_stop_handlers() -> None:
    """`stop_outside_the_loop` for SIGTERM and SIGINT; the training loop's `PreemptionGuard`
    replaces it while it runs, then puts it back. Stops swallowed by finalisers come again
    (`_send_swallowed_stops_again`)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_outside_the_loop)
    previous = sys.unraisablehook
    if not getattr(previous, "_sends_stops_again", False):
        def hook(unraisable) -> None:
            if not _send_swallowed_stops_again(unraisable):
                previous(unraisable)

        hook._sends_stops_again = True
        sys.unraisablehook = hook


def run(library: str, task: str) -> None:
    """Parses flags and calls `<library>.train_and_evaluate(config, workdir)`; exits with one
    of the statuses in this module's docstring. A CPU run first restarts itself once with
    glibc's huge-page tunable (`mae_jax.core.hostmem`). A config for another `task` (another
    script), and every config value wrong whatever the devices, are refused before the library
    and JAX load (`core.config.check_early`)."""
    try:
        hostmem.reexec_with_hugepages()
    except ValueError as error:  # a bad MAE_JAX_MALLOC_HUGEPAGES
        sys.stderr.write(f"Bad environment: {error}\n")
        sys.exit(EXIT_BAD_INPUT)
    install_stop_handlers()

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
        std_logging.getLogger("absl").addFilter(_FirstOrbaxErrorOnly())
        if FLAGS.config is None:
            sys.stderr.write("Bad command line: --config is required, e.g. "
                             "--config=configs/demo.py.\n")
            return EXIT_BAD_INPUT
        config = config_from_flags()
        workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
        try:
            from mae_jax.core import config as core_config

            core_config.check_early(config, task)
            core_config.apply_cpu_devices(config)  # before JAX starts its backends
            if FLAGS.multiprocess:
                initialize_distributed()
            result = importlib.import_module(library).train_and_evaluate(config, workdir)
        except SystemExit:
            raise
        except BaseException as error:  # noqa: BLE001 - every failure gets its exit status
            # A step that does not fit the devices: what to change, not XLA's buffer dump.
            error = device_memory_error(error, config) or error
            status = exit_status(error)
            message = explanation(error)
            if message:
                print(f"\nERROR: {message}", file=sys.stderr)
            else:
                traceback.print_exc()
            print(f"Exit status {status}: {EXIT_MEANINGS[status]}.", file=sys.stderr)
            # After an error, tf.data's worker threads can deadlock interpreter shutdown (their
            # destructors wait on Python): leave now. Checkpoints are already closed.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        from mae_jax.core import preemption

        if preemption.stopped_on_request() is not None:
            print(f"Stopped early: {brief(result)}\nExit status {EXIT_PREEMPTED}: "
                  f"{EXIT_MEANINGS[EXIT_PREEMPTED]}.")
            return EXIT_PREEMPTED
        print(f"Done: {brief(result)}")
        return EXIT_COMPLETED

    app.run(main, flags_parser=_parse_flags)


def brief(result: Any) -> Any:
    """A run's result for its last line: a nested table (segmentation's 150 per-class
    results, ~9 KB on one line) becomes its size; the files and the log hold it whole."""
    if not isinstance(result, dict):
        return result
    return {key: f"<{len(value)} entries>" if isinstance(value, dict) and len(value) > 8
            else value for key, value in result.items()}
