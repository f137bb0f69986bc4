"""Input pipeline throughput per CPU core: ours (tf.data) vs the official PyTorch transform.

    python benchmarks/bench_input.py                 # 3 rounds x 8 s each, prints a table
    python benchmarks/bench_input.py --seconds 20 --images 512
    python benchmarks/bench_input.py --probe         # the linear probe's crops, 384 px canvas

Both pipelines read the SAME JPEG files: generated photo-like images of ImageNet's typical
size (500 x 375), quality 90 (smooth colour gradients, soft blobs, hard-edged rectangles,
sinusoidal textures at three scales and Gaussian noise: about 90-100 KB a file, like ImageNet's
~110 KB average; real photographs cannot be downloaded here), written to a temporary folder.

* ours: `mae_jax.data.images.create_train_iterator` (MAE pretraining: RandomResizedCrop
  scale (0.2, 1) to 224, flip; JPEG window decoded alone; one resize) -> uint8 batches of 64.
  Normalisation happens on the accelerator inside the train step, so it is not counted here.
* ours, resize on device: the same with `device_resize_canvas=512` (the host decodes the crop
  window and pads it into a 512 x 512 canvas; the accelerator resizes and flips): the host's
  part is measured as above, the device's part separately (ms per image on one core of this
  CPU, and its FLOPs; on a GPU it is a pair of small batched matmuls).
* official: what `torchvision.transforms` does on PIL images in main_pretrain.py, written with
  PIL + torch since torchvision is not installable here (its PIL paths are short):
  `Image.open(f).convert("RGB")`, RandomResizedCrop.get_params with Python's random,
  `img.crop(box).resize((224, 224), BICUBIC)`, flip p=0.5, ToTensor (uint8 HWC -> float CHW
  / 255), Normalize (sub_ mean, div_ std), then a batch of 64 stacked as default_collate does.
  torch is used for ToTensor / Normalize / stack when installed (numpy otherwise).

Each measurement runs in its own process pinned to the given core(s) with
`os.sched_setaffinity`, TF inter-op threads = cores (intra-op 1, as our pipeline modules set it:
`mae_jax/data/tf_runtime.py`) and a private tf.data pool of that size,
torch.set_num_threads(1). Rounds alternate ours / official so that both see the same machine
load. Reported: images per second of wall time and images per CPU-second of the
process (the latter is less sensitive to other jobs on a shared machine). "2 cores": ours is
one process with 2 threads; official is 2 worker processes (DataLoader num_workers=2), summed.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

BATCH = 64
SIZE = 224
# The crop: MAE pretraining's (scale 0.2-1; a 512 px canvas holds every window of a 500 x 375
# image) or, with --probe, the linear probe's (scale 0.08-1, MAE's util/crop.py boxes: one
# draw clipped to the image; a 384 px canvas, 22% of the windows wider: resized on the host).
# Worker processes read the choice from the environment.
PROBE = os.environ.get("BENCH_INPUT_PROBE") == "1"
CROP_SCALE = (0.08, 1.0) if PROBE else (0.2, 1.0)
CANVAS = 384 if PROBE else 512  # device_resize_canvas


def photo(rng: np.random.Generator, height: int = 375, width: int = 500) -> np.ndarray:
    """A photo-like uint8 [height, width, 3] image (see the module docstring)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    base = rng.uniform(40, 200, 3)
    for channel in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        image[..., channel] = (base[channel] + 60 * np.cos(angle) * (cols / width - 0.5)
                               + 60 * np.sin(angle) * (rows / height - 0.5))
    for _ in range(8):  # soft blobs: objects and lighting
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(15, 120)
        blob = np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * radius ** 2))
        image += blob[..., None] * rng.uniform(-70, 70, 3)
    for _ in range(6):  # hard-edged shapes
        top, left = rng.integers(0, height), rng.integers(0, width)
        h, w = rng.integers(10, 150, 2)
        image[top:top + h, left:left + w] = (image[top:top + h, left:left + w] * 0.5
                                             + rng.uniform(0, 255, 3) * 0.5)
    for scale in (2.0, 5.0, 13.0):  # textures at three scales
        fx, fy = rng.normal(0, 1 / scale, (2, 4))
        for i in range(4):
            wave = np.sin(6 * fx[i] * cols + 6 * fy[i] * rows + rng.uniform(0, 6.3))
            image += (rng.uniform(4, 14) * wave)[..., None]
    image += rng.normal(0, 8, image.shape)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(folder: str, count: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = os.path.join(folder, f"{index:05d}.jpg")
        Image.fromarray(photo(rng)).save(path, quality=90)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- Workers


def _pin(cores: list[int]) -> None:
    os.sched_setaffinity(0, set(cores))


def _measure(next_batch, seconds: float) -> dict:
    for _ in range(3):  # warm-up: tracing, thread pools, page cache
        next_batch()
    images, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        images += len(next_batch())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images": images, "wall_s": wall, "cpu_s": cpu}


def worker_ours(folder: str, cores: list[int], seconds: float, canvas: int = 0,
                **options) -> dict:
    """`create_train_iterator` on `folder`'s JPEGs (`options`: its other arguments, e.g.
    randaugment) in this process pinned to `cores`; images of its batches per second."""
    _pin(cores)
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(len(cores))
    from mae_jax.data import images

    batches = images.create_train_iterator(
        source=f"folder:{folder}", image_size=SIZE, global_batch_size=BATCH, seed=0,
        process_index=0, process_count=1, threads=len(cores), device_resize_canvas=canvas,
        **{"crop_scale": CROP_SCALE, "crop_clipped": PROBE, **options})
    return _measure(lambda: next(batches)["canvas" if canvas else "image"], seconds)


def worker_device(folder: str, cores: list[int], seconds: float) -> dict:
    """The host part of `device_resize_canvas=CANVAS`: decode the window, pad to the canvas."""
    return worker_ours(folder, cores, seconds, canvas=CANVAS)


def device_resize_cost(seconds: float) -> dict:
    """The device part, on JAX's default device (one pinned core here; runs without
    TensorFlow, so also on the GPU machine): ms per image of `make_canvas_fn` on batches of
    BATCH canvases holding crop boxes of 500 x 375 images, and its matmul FLOPs per image."""
    if jax_platform() == "cpu":
        _pin(sorted(os.sched_getaffinity(0))[:1])
    import jax

    from mae_jax.core import sharding
    from mae_jax.data import device_resize

    rng = np.random.default_rng(0)
    area = rng.uniform(*CROP_SCALE, BATCH) * 500 * 375
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), BATCH))
    height = np.minimum(np.sqrt(area / ratio), 375).astype(np.int32)
    width = np.minimum(np.sqrt(area * ratio), 500).astype(np.int32)
    left = rng.integers(0, 16, BATCH).astype(np.int32)  # the window's MCU edge columns
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
    resize = device_resize.make_canvas_fn(mesh, image_size=SIZE)
    parts = sharding.global_batch_from_host({
        "canvas": rng.integers(0, 256, (BATCH, CANVAS, CANVAS, 3), dtype=np.uint8),
        "box": np.stack([np.zeros_like(left), left, height, width], axis=1),
        "flip": rng.random(BATCH) < 0.5}, sharding.batch_sharding(mesh))
    args = [parts[key] for key in ("canvas", "box", "flip")]
    per_image = seconds_per_call(lambda: resize(*args), seconds) / BATCH
    flops = 2 * 3 * SIZE * CANVAS * (CANVAS + SIZE)  # horizontal pass + vertical pass
    return {"ms_per_image": per_image * 1e3, "flops_per_image": flops,
            "device": str(jax.devices()[0].device_kind)}


def seconds_per_call(call, seconds: float, in_flight: int = 8) -> float:
    """Throughput of a jitted `call` (seconds a call): after one warm-up call, rounds of
    `in_flight` calls dispatched before waiting once, for about `seconds`. Waiting after every
    call would add a GPU's launch and synchronisation latency to each small call."""
    import jax

    jax.block_until_ready(call())
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        jax.block_until_ready([call() for _ in range(in_flight)])
        runs += in_flight
    return (time.perf_counter() - start) / runs


def jax_platform() -> str:
    return os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] or "cpu"


def worker_official(folder: str, cores: list[int], seconds: float) -> dict:
    _pin(cores)
    import random

    from PIL import Image

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        torch = None
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    rng = random.Random(cores[0])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    get_params = crop_sampler(rng, CROP_SCALE, clipped=PROBE)  # main_linprobe.py: util/crop.py

    def transform(path):
        with open(path, "rb") as handle:  # torchvision's pil_loader
            image = Image.open(handle).convert("RGB")
        top, left, h, w = get_params(*image.size)
        image = image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.array(image, np.uint8, copy=True)
        if torch is None:
            tensor = np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.float32) / 255
            return (tensor - np.array(mean, np.float32)[:, None, None]) / np.array(
                std, np.float32)[:, None, None]
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous().float().div(255)
        return tensor.sub_(torch.tensor(mean)[:, None, None]).div_(torch.tensor(std)[:, None,
                                                                                     None])

    examples = cycled(paths, transform, BATCH)

    def next_batch():
        return (torch.stack if torch is not None else np.stack)(examples())

    return _measure(next_batch, seconds)


def crop_sampler(rng, scale, clipped=False):
    """torchvision's RandomResizedCrop.get_params (ratio 3/4-4/3) drawing from Python's `rng`:
    (width, height) -> (top, left, h, w); the whole image after 10 misses. clipped: MAE's
    util/crop.py (the linear probe's): one draw, its width and height clipped to the image."""
    import math

    def get_params(width, height):
        for _ in range(1 if clipped else 10):
            target = width * height * rng.uniform(*scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if clipped:
                w, h = min(w, width), min(h, height)
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        return 0, 0, height, width

    return get_params


def cycled(items: list, transform, batch: int):
    """A function returning the next `batch` transformed items, cycling through `items`."""
    position = [0]

    def examples() -> list:
        out = [transform(items[(position[0] + i) % len(items)]) for i in range(batch)]
        position[0] += batch
        return out

    return examples


# -------------------------------------------------------------- Orchestration


def start_worker(script: str, kind: str, data_flag: str, data: str, cores: list[int],
                 seconds: float) -> subprocess.Popen:
    """`script --worker kind` in a process of its own, pinned by it to `cores`, our repository
    importable and TensorFlow quiet; `data_flag data` names its files (e.g. --folder DIR)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, script, "--worker", kind, data_flag, data,
                             "--cores", ",".join(map(str, cores)), "--seconds", str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def worker_result(process: subprocess.Popen) -> dict:
    """The JSON line a worker printed last; its stderr's tail when it failed."""
    out, err = process.communicate()
    if process.returncode:
        raise RuntimeError(f"benchmark worker {process.args[3]!r} failed (exit "
                           f"{process.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_worker(script, kind, data_flag, data, cores, seconds) -> dict:
    """One worker process on `cores`, waited for."""
    return worker_result(start_worker(script, kind, data_flag, data, cores, seconds))


def run_per_core(script, kind, data_flag, data, cores, seconds) -> dict:
    """One worker process per core, run concurrently (DataLoader workers); summed."""
    return summed([worker_result(p) for p in [
        start_worker(script, kind, data_flag, data, [core], seconds) for core in cores]])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def base_parser(description: str, device_help: str, workers, data_flag: str):
    """The options both input benchmarks take (each adds its --images), plus the hidden ones
    of their worker processes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_cores", type=int, default=2, choices=(1, 2),
                        help="rows for 1 core, and for 2 cores when 2 (and available)")
    parser.add_argument("--device_part", action="store_true",
                        help=f"only the device part ({device_help}; no TensorFlow needed) on "
                             "JAX's default device: JAX_PLATFORMS=cuda for a GPU")
    parser.add_argument("--out_json", default="", help="also write the report here")
    parser.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    parser.add_argument(data_flag, help=argparse.SUPPRESS)
    parser.add_argument("--cores", default="0", help=argparse.SUPPRESS)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, batch: int
               ) -> argparse.Namespace:
    """Errors for values the run cannot use; `batch`: the images a batch takes."""
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be > 0 and --rounds >= 1")
    if args.images < batch:
        parser.error(f"--images {args.images}: the pipelines batch {batch} images; write at "
                     f"least that many")
    return args


def core_sets(max_cores: int) -> list[tuple[str, list[int]]]:
    """("1 core", [first core]) and, when max_cores is 2 and two are available, ("2 cores",
    [first two])."""
    available = sorted(os.sched_getaffinity(0))
    sets = [("1 core", available[:1])]
    if max_cores > 1 and len(available) > 1:
        sets.append(("2 cores", available[:2]))
    return sets


def write_report(report: dict, path: str) -> dict:
    if path:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=2)
        print("Wrote", path)
    return report


def summed(results: list[dict]) -> dict:
    """Worker processes run side by side (DataLoader workers): images and CPU time add up."""
    return {"images": sum(r["images"] for r in results),
            "wall_s": max(r["wall_s"] for r in results),
            "cpu_s": sum(r["cpu_s"] for r in results)}


def summarize_rounds(rows: dict, keys: tuple[str, str, str]) -> dict:
    """rows: {cores label: [(A, B, official) measurements, one per round]}; keys: names of A,
    B, official. {label: {key: {"img_s", "img_per_cpu_s" (medians over rounds), "ratio",
    "ratio_cpu" (over official's), "rounds_img_s"}}}."""
    summary = {}
    for label, runs in rows.items():
        columns = {}
        for key, kind in zip(keys, zip(*runs, strict=True), strict=True):
            columns[key] = {
                "img_s": statistics.median(r["images"] / r["wall_s"] for r in kind),
                "img_per_cpu_s": statistics.median(r["images"] / r["cpu_s"] for r in kind),
                "rounds_img_s": [r["images"] / r["wall_s"] for r in kind]}
        official = columns[keys[2]]
        for column in columns.values():
            column["ratio"] = column["img_s"] / official["img_s"]
            column["ratio_cpu"] = column["img_per_cpu_s"] / official["img_per_cpu_s"]
        summary[label] = columns
    return summary


def print_table(summary: dict, keys: tuple[str, str, str], names: tuple[str, str, str],
                digits: int) -> None:
    """`summarize_rounds`'s summary as a markdown table; names: the columns' titles. Medians
    of img/s (wall and CPU), ratios over official, every round."""
    print(f"| cores | {names[2]} | {names[0]} | ratio | {names[1]} | ratio |")
    print("|---|---|---|---|---|---|")
    for label, columns in summary.items():
        official = columns[keys[2]]
        cells = [f"{official['img_s']:.{digits}f} ({official['img_per_cpu_s']:.{digits}f})"]
        for key in keys[:2]:
            c = columns[key]
            cells += [f"{c['img_s']:.{digits}f} ({c['img_per_cpu_s']:.{digits}f})",
                      f"{c['ratio']:.2f}x ({c['ratio_cpu']:.2f}x)"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nAll rounds (img/s wall, {names[2]} / {names[0]} / {names[1]}): " + "; ".join(
        f"{label}: " + ", ".join("/".join(f"{columns[k]['rounds_img_s'][i]:.{digits}f}"
                                          for k in (keys[2], *keys[:2]))
                                 for i in range(len(columns[keys[2]]["rounds_img_s"])))
        for label, columns in summary.items()))


KEYS = ("ours_host_resize", "ours_device_resize", "official")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n")[0], "the resize and flip", [*WORKERS, "resize"],
                         "--folder")
    parser.add_argument("--images", type=int, default=256, help="JPEG files to generate")
    parser.add_argument("--probe", action="store_true",
                        help="the linear probe's crops (scale 0.08-1) and a 384 px canvas "
                             "instead of pretraining's (0.2-1, 512 px)")
    return check_args(parser, parser.parse_args(argv), BATCH)


def worker_or_device_part(args, workers: dict, device_cost, describe):
    """What both input benchmarks do before their rounds. In a worker process: run its
    measurement (`workers[args.worker](data, cores, seconds)`), print it as a JSON line and
    return (True, None). With --device_part: time the device part alone (`device_cost(seconds)`,
    printed by `describe`) and return (True, its report). Else (False, {"machine": ...})."""
    if args.worker:
        cores = [int(c) for c in args.cores.split(",")]
        data = args.folder if hasattr(args, "folder") else args.root
        print(json.dumps(workers[args.worker](data, cores, args.seconds)))
        return True, None
    report = {"machine": {"cpu": _cpu_model(), "cpus_visible": os.cpu_count(),
                          "python": platform.python_version(),
                          "load_average_before": os.getloadavg()}}
    if not args.device_part:
        return False, report
    cost = device_cost(args.seconds)
    print(describe(cost))
    return True, write_report(report | {"device_part": cost}, args.out_json)


def main(argv: list[str] | None = None) -> dict | None:
    """Runs the benchmark; returns {"machine", "settings", "summary" (`summarize_rounds`),
    "device_part"} (--device_part: {"machine", "device_part"}), also written to --out_json."""
    args = parse_args(argv)
    if args.probe:  # for this process and the workers it starts
        global PROBE, CROP_SCALE, CANVAS
        os.environ["BENCH_INPUT_PROBE"] = "1"
        PROBE, CROP_SCALE, CANVAS = True, (0.08, 1.0), 384
    done, report = worker_or_device_part(
        args, {**WORKERS, "resize": lambda data, cores, seconds: device_resize_cost(seconds)},
        device_resize_cost,
        lambda cost: f"Device part of device_resize_canvas={CANVAS} on {cost['device']}: "
                     f"{cost['ms_per_image']:.4f} ms per image "
                     f"({1e3 / cost['ms_per_image']:.0f} img/s), "
                     f"{cost['flops_per_image'] / 1e6:.0f} MFLOP per image.")
    if done:
        return report
    machine = report["machine"]
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(folder, args.images)
        kilobytes = np.mean([os.path.getsize(p) for p in paths]) / 1000
        load_before = os.getloadavg()
        rows = {}
        for _ in range(args.rounds):
            for label, cores in core_sets(args.max_cores):
                where = ("--folder", folder, cores, args.seconds)
                rows.setdefault(label, []).append((
                    run_worker(__file__, "ours", *where), run_worker(__file__, "device", *where),
                    run_per_core(__file__, "official", *where)))
        resize_cost = run_worker(__file__, "resize", "--folder", folder, core_sets(1)[0][1],
                                 args.seconds)
        load_after = os.getloadavg()

    machine.update(load_average_before=load_before, load_average_after=load_after)
    print(f"\nMachine: {_cpu_model()}, {os.cpu_count()} CPUs visible; Python "
          f"{platform.python_version()}. {args.images} JPEGs 500x375 q90, mean "
          f"{kilobytes:.0f} KB. Load average before {load_before[0]:.2f} / after "
          f"{load_after[0]:.2f} (1 min). Median of {args.rounds} alternating rounds of "
          f"{args.seconds:g} s. Crop scale {CROP_SCALE[0]:g}-{CROP_SCALE[1]:g}.\n")
    print(f"img/s of wall time (img per CPU-second in brackets); ratio = / official. 'resize "
          f"on device': the host part of device_resize_canvas={CANVAS} (decode the crop window, "
          "pad it into the canvas).\n")
    summary = summarize_rounds(rows, KEYS)
    print_table(summary, KEYS, ("ours, resize on host", "ours, resize on device (host part)",
                                "official transform"), digits=0)
    print(f"\nDevice part (resize {CANVAS} px canvas -> {SIZE} px + flip, `make_canvas_fn`): "
          f"{resize_cost['ms_per_image']:.2f} ms per image on one core of this CPU "
          f"(synthetic canvases); "
          f"{resize_cost['flops_per_image'] / 1e6:.0f} MFLOP per image (float32 matmuls).")
    report = {"machine": machine, "settings": vars(args) | {
        "kilobytes_per_jpeg": kilobytes, "crop_scale": CROP_SCALE, "canvas": CANVAS},
              "summary": summary, "device_part": resize_cost}
    return write_report(report, args.out_json)


WORKERS = {"ours": worker_ours, "device": worker_device, "official": worker_official}

if __name__ == "__main__":
    main()
