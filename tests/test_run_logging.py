"""RunLogger: metrics.jsonl lines, resume appends, progress line, images, loss curve, TB."""

import json
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mae_jax.core import run_logging, tensorboard


def read_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_log_train_writes_json_lines_and_a_progress_line(tmp_path, capsys):
    logger = run_logging.RunLogger(tmp_path, total_steps=40, tensorboard=False, log_every=10,
                                   global_batch_size=32)
    for step in (10, 20):
        logger.log_train(step, {"loss": jnp.float32(0.8123), "lr": np.float32(1.2e-4),
                                "grad_norm": 1.5})
    lines = read_lines(tmp_path)
    assert [line["step"] for line in lines] == [10, 20]
    assert lines[0]["kind"] == "train"
    assert lines[0]["loss"] == pytest.approx(0.8123, rel=1e-6)
    assert lines[1]["lr"] == pytest.approx(1.2e-4, rel=1e-6)
    assert lines[1]["images_per_sec"] > 0 and lines[1]["grad_norm"] == 1.5
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("step 20/40 | loss 0.8123 | lr 1.2e-04 | ")
    assert " img/s | grad_norm 1.5 | ETA " in out[-1]
    assert logger.should_log(30) and logger.should_log(40) and not logger.should_log(31)
    with pytest.raises(ValueError, match="Only scalars"):
        logger.log_train(30, {"loss": np.ones(3)})


def test_input_wait_is_the_share_of_each_interval_spent_getting_batches(tmp_path, capsys,
                                                                       monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])  # the logger's creation, then each call
    # The logger's own clock only (time.perf_counter stays real for every other caller).
    fake_time = types.SimpleNamespace(perf_counter=lambda: next(clock))
    monkeypatch.setattr(run_logging, "time", fake_time)
    logger = run_logging.RunLogger(tmp_path, total_steps=40, tensorboard=False, log_every=10)
    for step, waited in ((10, 9.0), (20, 2.0), (30, 6.0), (40, 8.0)):
        logger.log_train(step, {"loss": 1.0}, input_seconds=waited)
    assert [r["input_wait"] for r in read_lines(tmp_path)] == [0.9, 0.2, 0.6, 0.8]
    out = capsys.readouterr().out.splitlines()
    assert " | input 60% | " in out[2]
    # Not after the first interval (buffers filling), once, at the first share over a quarter.
    assert [line for line in out if line.startswith("Input-bound")] == [
        "Input-bound: over steps 21-30 the loop waited for batches 60% of the time; "
        + run_logging.INPUT_BOUND_ADVICE
    ]


def test_with_several_processes_the_slowest_input_is_logged_and_named(tmp_path, capsys,
                                                                     monkeypatch):
    """loop.slowest_input picks the longest wait of the gathered ones (each process's own, in
    process order) and the logger records it with its process: the step is one collective
    program, so that process holds the others back. One process: its own wait, no process."""
    from mae_jax.core import loop

    assert loop.slowest_input(1.5) == (1.5, None, False)
    gathered = []

    def gather(mine):  # what process_allgather returns to every process: [processes, 2]
        gathered.append(mine)
        return np.array([mine, [7.0, 0.0], [3.0, 1.0]], np.float32)

    # Another process's broken input reaches this one at the same step (all stop together).
    waited, process, broken = loop.slowest_input(2.0, gather=gather)
    assert (waited, process, broken) == (7.0, 1, True)
    np.testing.assert_array_equal(gathered, [[2.0, 0.0]])
    clock = iter([0.0, 10.0, 20.0])
    fake_time = types.SimpleNamespace(perf_counter=lambda: next(clock))
    monkeypatch.setattr(run_logging, "time", fake_time)
    logger = run_logging.RunLogger(tmp_path, total_steps=20, tensorboard=False, log_every=10)
    logger.log_train(10, {"loss": 1.0}, input_seconds=1.0, input_process=0)
    logger.log_train(20, {"loss": 1.0}, input_seconds=waited, input_process=process)
    assert [(r["input_wait"], r["input_wait_process"]) for r in read_lines(tmp_path)] == [
        (0.1, 0), (0.7, 1)]
    out = capsys.readouterr().out.splitlines()
    assert " | input 70% (process 1) | " in out[1]
    assert out[2].startswith("Input-bound: over steps 11-20 the loop of process 1 waited for "
                             "batches 70% of the time; ")


def test_resumed_run_appends_and_readers_keep_the_latest_line_per_step(tmp_path):
    first = run_logging.RunLogger(tmp_path, total_steps=100, tensorboard=False)
    for step in (10, 20, 30):
        first.log_train(step, {"loss": 1.0 / step})
    # Preempted after a checkpoint at step 20: the resumed run logs step 30 again.
    resumed = run_logging.RunLogger(tmp_path, total_steps=100, tensorboard=False, start_step=20)
    resumed.log_train(30, {"loss": 0.5})
    resumed.log_eval(30, {"miou": 12.5})
    assert [(line["step"], line["kind"]) for line in read_lines(tmp_path)] == [
        (10, "train"), (20, "train"), (30, "train"), (20, "resume"), (30, "train"), (30, "eval")]
    train = run_logging.read_metrics(tmp_path)
    assert [r["step"] for r in train] == [10, 20, 30] and train[-1]["loss"] == 0.5
    assert run_logging.read_metrics(tmp_path, kind="eval") == [
        {"step": 30, "kind": "eval", "miou": 12.5}
    ]
    # Killed at step 50 (its lines for 40 and 50 written, no checkpoint after 30), resumed from
    # 30 with another log cadence: the killed run's 40 and 50 were redone, so the curve leaves
    # them out (they used to sit between the resumed run's 45 and 60, from another lr).
    first.log_train(40, {"loss": 9.0})
    first.log_eval(40, {"miou": 99.0})
    first.log_train(50, {"loss": 9.0})
    again = run_logging.RunLogger(tmp_path, total_steps=100, tensorboard=False, start_step=30)
    for step in (45, 60):
        again.log_train(step, {"loss": 0.25})
    assert [(r["step"], r["loss"]) for r in run_logging.read_metrics(tmp_path)] == [
        (10, 0.1), (20, 0.05), (30, 0.5), (45, 0.25), (60, 0.25)]
    assert [r["step"] for r in run_logging.read_metrics(tmp_path, kind="eval")] == [30]
    assert sum(1 for line in read_lines(tmp_path) if line["step"] == 40) == 2  # kept in the file
    path = resumed.save_loss_curve()
    assert os.path.getsize(path) > 1000
    assert Image.open(path).format == "PNG"


def test_log_images_writes_png_grids(tmp_path):
    logger = run_logging.RunLogger(tmp_path, total_steps=10, tensorboard=False)
    images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    (path,) = logger.log_images(3, {"mae/reconstruction": images})
    grid = np.asarray(Image.open(path))
    assert grid.shape == (16, 24, 3)  # 5 images -> 2 rows x 3 columns.
    np.testing.assert_array_equal(grid[8:16, 0:8], images[3])
    with pytest.raises(ValueError, match="uint8"):
        logger.log_images(3, {"bad": images.astype(np.float32)})


def test_only_the_main_process_writes(tmp_path, capsys):
    logger = run_logging.RunLogger(tmp_path / "run", total_steps=10, is_main=False)
    logger.log_train(1, {"loss": 1.0})
    logger.log_eval(1, {"miou": 1.0})
    assert logger.log_images(1, {"x": np.zeros((1, 4, 4, 3), np.uint8)}) == []
    assert logger.save_loss_curve() is None
    assert not os.path.exists(tmp_path / "run")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("backend", ["clu", "torch"])
def test_tensorboard_events_are_written(tmp_path, monkeypatch, backend):
    if backend == "torch":  # As on the GPU machine: no TensorFlow, so no clu writers.
        monkeypatch.setitem(sys.modules, "clu", None)
        monkeypatch.setitem(sys.modules, "clu.metric_writers", None)
    logger = run_logging.RunLogger(tmp_path, total_steps=10, tensorboard=True)
    expected = tensorboard._TorchSummaryWriter if backend == "torch" else object
    assert isinstance(logger._writer, expected)
    logger.log_train(1, {"loss": 1.0})
    logger.log_images(1, {"x": np.zeros((2, 4, 4, 3), np.uint8)})
    logger.close()
    files = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in files)


def test_missing_tensorflow_and_torch_warns_once_and_keeps_logging(tmp_path, monkeypatch, capsys):
    # A None entry in sys.modules makes the import raise ImportError, as on a machine without TF.
    for name in ("clu", "clu.metric_writers", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(tensorboard, "_warned_no_tensorboard", False)
    with pytest.warns(UserWarning, match="TensorBoard"):
        logger = run_logging.RunLogger(tmp_path, total_steps=10, tensorboard=True)
    run_logging.RunLogger(tmp_path, total_steps=10, tensorboard=True)  # No second warning.
    assert capsys.readouterr().out.count("WARNING") == 1
    logger.log_train(1, {"loss": 1.0})
    assert read_lines(tmp_path)[0]["loss"] == 1.0


def test_format_duration():
    assert run_logging.format_duration(3725) == "1h02m"
    assert run_logging.format_duration(65) == "1m05s"
    assert run_logging.format_duration(float("nan")) == "--"


def test_a_torn_last_line_is_skipped_with_a_warning_and_the_next_run_starts_a_new_line(
    tmp_path, capsys
):
    # What a crash (or a full disk) in the middle of a write leaves behind.
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 10, "kind": "train", "loss": 1.0}\n{"step": 20, "kind": "tra'
    )
    assert [r["step"] for r in run_logging.read_metrics(tmp_path)] == [10]
    resumed = run_logging.RunLogger(tmp_path, total_steps=40, tensorboard=False, start_step=10)
    resumed.log_train(20, {"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in run_logging.read_metrics(tmp_path)] == [
        (10, 1.0), (20, 0.5)
    ]
    path = resumed.save_loss_curve()  # the end of a run reads the file too
    assert Image.open(path).format == "PNG"
    # Said once, on stdout (QA: a print and a Python warning on every read of the file).
    out = capsys.readouterr()
    assert out.out.count("WARNING: Skipping unreadable line") == 1, out.out
    assert f"line 2 of {tmp_path / 'metrics.jsonl'}" in out.out and "line 2" not in out.err


def test_a_nan_or_inf_value_is_written_as_json_null(tmp_path):
    # Python's json writes a bare NaN, which strict readers (jq, JavaScript's JSON.parse) refuse.
    logger = run_logging.RunLogger(tmp_path, total_steps=10, tensorboard=False)
    logger.log_eval(1, {"loss": float("nan"), "top1": float("inf"), "top5": 50.0})
    logger.log_train(2, {"loss": 0.5})
    text = open(os.path.join(tmp_path, "metrics.jsonl")).read()
    assert "NaN" not in text and "Infinity" not in text
    lines = [json.loads(line, parse_constant=pytest.fail) for line in text.splitlines()]
    assert lines[0] == {"step": 1, "kind": "eval", "loss": None, "top1": None, "top5": 50.0}
    logger.log_train(3, {"loss": float("nan")})  # a train record too (the loop stops first)
    assert logger.save_loss_curve() is not None  # the null loss left out of the curve
    # eval_results.json (classification and segmentation) is strict JSON as well.
    path = os.path.join(tmp_path, "eval_results.json")
    run_logging.write_json(path, {"mIoU": float("nan"), "per_class": {"a": {"IoU": None}}})
    with open(path) as handle:
        assert json.load(handle, parse_constant=pytest.fail) == {
            "mIoU": None, "per_class": {"a": {"IoU": None}}}


def test_an_evaluation_of_another_step_split_or_unreadable_is_kept_by_eval_only(tmp_path,
                                                                                capsys):
    """eval_only in a run's workdir (review of the QA fix): the same evaluation is replaced; one
    of another step or split, or a file it cannot read (a torn copy of the run's own), is set
    aside, each under its own name even within one second; training runs replace it."""
    path = tmp_path / run_logging.RESULTS_FILE
    own = {"top1": 50.0, "step": 6, "split": "val"}

    def write(results, keep_other=True):
        run_logging.write_results(str(tmp_path), results, keep_other=keep_other)
        return sorted(p.name for p in tmp_path.glob("eval_results.replaced-*"))

    assert write(own) == [] and json.loads(path.read_text()) == own  # nothing there before
    assert write(own | {"top1": 51.0}) == []  # the same step and split: replaced
    kept = write(own | {"split": "train"})
    assert len(kept) == 1 and json.loads((tmp_path / kept[0]).read_text())["top1"] == 51.0
    assert "held the evaluation of step 6 (val split); kept as" in capsys.readouterr().out
    path.write_text('{"top1": 5')  # torn
    assert len(write(own)) == 2  # the second within the same second keeps its own name
    assert "held an evaluation it could not read; kept as" in capsys.readouterr().out
    assert len(write(own | {"step": 8}, keep_other=False)) == 2  # training: replaced
    assert json.loads(path.read_text())["step"] == 8
