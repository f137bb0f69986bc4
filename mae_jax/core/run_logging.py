"""Run logging: metrics.jsonl, a progress line, TensorBoard, image grids and a loss-curve PNG.

Only the main process writes. `metrics.jsonl` is appended to, never truncated, so a resumed run
continues the same file; readers (`read_metrics`, `save_loss_curve`) keep the last line per step,
i.e. the resumed run's values for steps logged twice. TensorBoard goes through clu's writer,
which imports TensorFlow, so it is imported lazily; without TF the logger falls back to
torch.utils.tensorboard, and without that it warns once and carries on without TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from mae_jax.core.tensorboard import create_tensorboard_writer
from mae_jax.core.workdir import set_aside

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "eval_results.json"  # the newest evaluation (classification, segmentation)
_SAID: set[tuple[str, int, str]] = set()  # (path, number, text): lines read_metrics warned of
# What a run writes into its workdir as it goes: a fresh start sets an earlier run's aside.
RUN_OUTPUTS = (METRICS_FILE, RESULTS_FILE, "images", "tensorboard", "loss_curve.png")
# Waiting for batches more than this share of the wall time: the run says it is input-bound.
INPUT_BOUND = 0.25
INPUT_BOUND_ADVICE = (
    "the input, not the step, sets the speed. To feed the accelerators faster: "
    "data.on_device=always (a training split of images of one size that fits in device "
    "memory), data.device_resize_canvas=512 (image files: the host decodes only the crop "
    "window, the devices resize), data.device_photometric=True (segmentation), or more CPU "
    "cores for the host (README, 'Is the input keeping up?')."
)


def _to_python(value: Any) -> Any:
    """JSON-friendly scalar: device arrays and numpy scalars become floats/ints."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"Only scalars can be logged, got an array of shape {array.shape}.")
    return array.reshape(()).item()


def strict_json(record: Mapping[str, Any]) -> dict[str, Any]:
    """NaN / inf values as null: JSON has no NaN, and strict readers (jq, JavaScript) refuse it."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def write_json(path: str, data: Mapping[str, Any]) -> None:
    """`path` replaced atomically by `data` as strict JSON (`strict_json`), e.g. eval_results."""
    with open(path + ".tmp", "w") as handle:
        json.dump(strict_json(data), handle, indent=2, allow_nan=False)
    os.replace(path + ".tmp", path)


def write_results(workdir: str, results: Mapping[str, Any], *, keep_other: bool) -> None:
    """`workdir/eval_results.json` := `results`; keep_other (eval_only): another step's or split's
    evaluation there, or one unreadable, is set aside first (QA: it replaced a run's own)."""
    path = os.path.join(workdir, RESULTS_FILE)
    if keep_other and os.path.exists(path):
        try:
            with open(path) as handle:
                earlier = json.load(handle)
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, dict) or any(earlier.get(k) != results.get(k)
                                                for k in ("step", "split")):
            what = (f"the evaluation of step {earlier.get('step')}" + (
                f" ({earlier['split']} split)" if earlier.get("split") else "")
                if isinstance(earlier, dict) else "an evaluation it could not read")
            print(f"Note: {path} held {what}; kept as {set_aside(path)}.", flush=True)
    write_json(path, results)


def format_duration(seconds: float) -> str:
    """'1h02m' for an hour or more, '12m05s' below, '--' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def image_path(workdir: str | os.PathLike, name: str, step: int) -> str:
    """Where `RunLogger.log_images` writes picture `name` of `step`."""
    return os.path.join(workdir, "images", f"{name.replace('/', '_')}_{step:07d}.png")


def read_metrics(workdir: str | os.PathLike, *, kind: str = "train") -> list[dict[str, Any]]:
    """Lines of `workdir/metrics.jsonl` of one kind, sorted by step, last line per step wins.

    A resume from step S writes a line of kind "resume": the lines before it past step S came
    from a run that stopped before its next checkpoint (killed), whose steps after S were
    redone, so they are left out (kept in the file). A line that is not a JSON record with a
    step (e.g. torn by a crash or a full disk) is skipped with a warning (once) naming it.
    """
    path = os.path.join(workdir, METRICS_FILE)
    by_step: dict[int, dict[str, Any]] = {}
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    step = int(record["step"])
                except (ValueError, KeyError, TypeError):
                    if (path, number, line.rstrip("\n")) not in _SAID:  # once, every read
                        _SAID.add((path, number, line.rstrip("\n")))
                        print(f"WARNING: Skipping unreadable line {number} of {path}: "
                              f"{line[:80]!r}", flush=True)
                    continue
                if record.get("kind") == "resume":  # the steps after it were redone
                    by_step = {s: r for s, r in by_step.items() if s <= step}
                elif record.get("kind", "train") == kind:
                    by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]


def _end_with_newline(path: str) -> None:
    """A line torn by a crash gets its newline, so the next record starts a line of its own."""
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def tile_images(images: np.ndarray) -> np.ndarray:
    """images: [N, H, W, C] uint8 -> one [rows * H, cols * W, C] grid, cols = ceil(sqrt(N))."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    padded = np.concatenate([images, np.zeros((rows * cols - n, h, w, c), images.dtype)])
    return padded.reshape(rows, cols, h, w, c).swapaxes(1, 2).reshape(rows * h, cols * w, c)


class RunLogger:
    """Writes training/eval scalars and images for one run in `workdir`.

    global_batch_size: images per optimizer step, for images/s; start_step: the step the run
    (re)starts from, the baseline for throughput and ETA, which come from the wall time and step
    count between consecutive `log_train` calls.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        is_main: bool = True,
        tensorboard: bool = True,
        log_every: int = 100,
        global_batch_size: int | None = None,
        start_step: int = 0,
    ):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}.")
        self.workdir = os.fspath(workdir)
        self.total_steps = total_steps
        self.is_main = is_main
        self.log_every = log_every
        self.global_batch_size = global_batch_size
        self.metrics_path = os.path.join(self.workdir, METRICS_FILE)
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._intervals = 0  # log_train calls since the (re)start
        self._said_input_bound = False
        self._writer = None
        if is_main:
            os.makedirs(self.workdir, exist_ok=True)
            _end_with_newline(self.metrics_path)
            if start_step > 0:  # readers drop the lines past it written before (read_metrics)
                self._append({"step": int(start_step), "kind": "resume"})
            if tensorboard:
                self._writer = create_tensorboard_writer(os.path.join(self.workdir, "tensorboard"))

    def should_log(self, step: int) -> bool:
        """True every `log_every` steps and at the last step."""
        return step % self.log_every == 0 or step == self.total_steps

    def _append(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:  # Append: a resumed run continues the file.
            f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")

    def log_train(
        self,
        step: int,
        scalars: Mapping[str, Any],
        *,
        input_seconds: float | None = None,
        input_process: int | None = None,
    ) -> dict[str, Any]:
        """Records one line (step, loss, lr, images_per_sec, ...) and prints a progress line.

        input_seconds: the time the loop spent getting batches since the previous call; logged
        as `input_wait`, its share of the wall time. The first time that share exceeds
        `INPUT_BOUND` (not counting the first interval after a (re)start, which fills the input
        pipeline's buffers), the run says it is input-bound and how to feed it faster.
        input_process: with several processes, the one whose wait `input_seconds` is (the
        longest, `loop.slowest_input`); logged as `input_wait_process` and named in the lines.
        """
        now = time.perf_counter()
        steps_done = step - self._last_step
        seconds = now - self._last_time
        self._last_step, self._last_time = step, now
        self._intervals += 1
        record: dict[str, Any] = {"step": int(step), "kind": "train"}
        record.update({name: _to_python(value) for name, value in scalars.items()})
        if steps_done > 0 and seconds > 0:
            record.setdefault("steps_per_sec", steps_done / seconds)
            if self.global_batch_size:
                record.setdefault("images_per_sec", steps_done * self.global_batch_size / seconds)
            if input_seconds is not None:
                record["input_wait"] = min(1.0, max(0.0, input_seconds / seconds))
                if input_process is not None:
                    record["input_wait_process"] = int(input_process)
            eta = (self.total_steps - step) * seconds / steps_done
        else:
            eta = float("nan")
        if not self.is_main:
            return record
        self._append(record)
        print(self._progress_line(record, eta), flush=True)
        wait = record.get("input_wait", 0.0)
        if wait > INPUT_BOUND and self._intervals > 1 and not self._said_input_bound:
            self._said_input_bound = True
            where = ("" if "input_wait_process" not in record
                     else f" of process {record['input_wait_process']}")
            print(f"Input-bound: over steps {step - steps_done + 1}-{step} the loop{where} "
                  f"waited for batches {wait:.0%} of the time; {INPUT_BOUND_ADVICE}", flush=True)
        if self._writer is not None:  # a process index is no curve
            scalars = self._numeric(record, prefix="train/")
            scalars.pop("train/input_wait_process", None)
            self._writer.write_scalars(step, scalars)
        return record

    def log_eval(self, step: int, scalars: Mapping[str, Any]) -> dict[str, Any]:
        """Records evaluation results (e.g. mIoU) at `step`, as a line of kind "eval"."""
        record = {"step": int(step), "kind": "eval"}
        record.update({name: _to_python(value) for name, value in scalars.items()})
        if self.is_main:
            self._append(record)
            values = " | ".join(f"{k} {v:.4g}" for k, v in self._numeric(record).items())
            print(f"eval step {step} | {values}", flush=True)
            if self._writer is not None:
                self._writer.write_scalars(step, self._numeric(record, prefix="eval/"))
        return record

    def log_images(self, step: int, images: Mapping[str, Any]) -> list[str]:
        """images: {name: uint8 [N, H, W, C] or [H, W, C]} -> TensorBoard and PNG grids.

        PNGs go to `workdir/images/<name>_<step>.png`; returns their paths.
        """
        if not self.is_main:
            return []
        from PIL import Image

        arrays = {}
        for name, value in images.items():
            array = np.asarray(value)
            array = array[None] if array.ndim == 3 else array
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"Image {name!r} must be uint8 [N, H, W, C] with C in (1, 3, 4), got "
                    f"{array.dtype} {array.shape}; convert with np.clip(x * 255, 0, 255)."
                )
            arrays[name] = array
        directory = os.path.join(self.workdir, "images")
        os.makedirs(directory, exist_ok=True)
        paths = []
        for name, array in arrays.items():
            grid = tile_images(array)
            path = image_path(self.workdir, name, step)
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
            paths.append(path)
        if self._writer is not None:
            self._writer.write_images(step, arrays)
        return paths

    def save_loss_curve(self, path: str | os.PathLike | None = None) -> str | None:
        """Plots training loss (and lr, if logged) against step from metrics.jsonl to a PNG."""
        if not self.is_main:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = os.fspath(path or os.path.join(self.workdir, "loss_curve.png"))
        records = [r for r in read_metrics(self.workdir) if r.get("loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        lr_records = [r for r in records if "lr" in r]
        if lr_records:
            lr_axis = ax.twinx()
            lr_axis.plot([r["step"] for r in lr_records], [r["lr"] for r in lr_records],
                         color="tab:orange", alpha=0.6, label="lr")
            lr_axis.set_ylabel("learning rate")
        ax.set_title(f"training loss ({len(records)} points)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _progress_line(self, record: Mapping[str, Any], eta: float) -> str:
        parts = [f"step {record['step']}/{self.total_steps}"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.1e}")
        if "images_per_sec" in record:
            parts.append(f"{record['images_per_sec']:.1f} img/s")
        if "input_wait" in record:
            process = record.get("input_wait_process")
            parts.append(f"input {record['input_wait']:.0%}"
                         + ("" if process is None else f" (process {process})"))
        shown = {"step", "kind", "loss", "lr", "images_per_sec", "steps_per_sec", "input_wait",
                 "input_wait_process"}
        parts += [f"{k} {v:.4g}" for k, v in self._numeric(record).items() if k not in shown]
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    @staticmethod
    def _numeric(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
        skip = {"step", "kind"}
        return {
            prefix + k: float(v)
            for k, v in record.items()
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)
        }
