"""Segmentation input throughput per CPU core: ours (tf.data) vs the official mmseg pipeline.

    python benchmarks/bench_seg_input.py            # 3 rounds x 8 s each, prints a table
    python benchmarks/bench_seg_input.py --seconds 20 --images 128

Both pipelines read the SAME files: an ADE20K release written in its real format
(ADEChallengeData2016/images/training/*.jpg + annotations/training/*.png) of generated
photo-like JPEGs (quality 90) at ADE20K's common sizes (683x512, 512x683, 512x512, 640x480,
1024x768) and PNG label maps of ~16 regions with raw classes 0..150. Ours reads the TFDS records
`mae_jax.data.ade20k.prepare_ade20k` makes of it; the official pipeline reads the files.

* ours: `mae_jax.data.seg_input.create_seg_train_iterator(source="ade20k",
  device_photometric=True)`, what segment.py runs -> uint8 image [16, 512, 512, 3] + uint8
  label batches + the photometric distortion's parameters. The distortion and the
  normalisation happen on the accelerator inside the train step: not counted in the host's
  images/s, measured apart (the "device part": ms per image on one core of this CPU; on a
  GPU with `--device_part`).
* ours, all on host: the same with device_photometric=False (the distortion on the host).
* official: the train pipeline of the MAE / BEiT ADE20K config (mmseg 0.x), written with
  OpenCV + numpy + PIL exactly as mmcv runs it (mmcv / mmseg do not install here):
  LoadImageFromFile (cv2.imdecode, BGR), LoadAnnotations (PIL, reduce_zero_label),
  Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0)) (cv2.resize INTER_LINEAR / NEAREST),
  RandomCrop(512, cat_max_ratio=0.75) (np.unique counts, up to 10 tries), RandomFlip(0.5),
  PhotoMetricDistortion (float32 convert, cv2 HSV round trips), Normalize (cv2, to RGB), Pad to
  512 (cv2.copyMakeBorder), DefaultFormatBundle (CHW torch tensors), then a batch of 16 stacked
  as the collate function does.

Processes are pinned to cores as in `bench_input.py` (whose helpers this script uses); rounds
alternate ours / official. "2 cores": ours is one process with 2 threads; official is 2 worker
processes (DataLoader num_workers=2), summed.
"""

import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from bench_input import (
    _cpu_model,
    _measure,
    _pin,
    base_parser,
    check_args,
    core_sets,
    cycled,
    photo,
    print_table,
    run_per_core,
    run_worker,
    seconds_per_call,
    summarize_rounds,
    worker_or_device_part,
    write_report,
)

BATCH = 16
CROP = 512
SCALE = (2048, 512)
RATIO_RANGE = (0.5, 2.0)
SIZES = [(512, 683), (683, 512), (512, 512), (480, 640), (768, 1024)]  # (height, width)


def label_map(rng: np.random.Generator, height: int, width: int, regions: int = 16) -> np.ndarray:
    """Raw ADE20K-style labels: the Voronoi cells of `regions` random points, each one class
    in 0..150 (0 = "other", ignored after reduction). uint8 [height, width]."""
    points = rng.uniform((0, 0), (height, width), (regions, 2))
    classes = rng.integers(0, 151, regions).astype(np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    nearest = np.argmin((rows[..., None] - points[:, 0]) ** 2 + (cols[..., None] - points[:, 1])
                        ** 2, axis=-1)
    return classes[nearest]


def write_release(root: str, count: int) -> str:
    """ADEChallengeData2016/{images,annotations}/training/ with `count` pairs; returns it."""
    from PIL import Image

    release = os.path.join(root, "ADEChallengeData2016")
    for kind in ("images", "annotations"):
        for folder in ("training", "validation"):
            os.makedirs(os.path.join(release, kind, folder))
    rng = np.random.default_rng(0)
    # The builder wants both splits: a few validation pairs, never read here.
    pairs = [("training", f"ADE_train_{i + 1:08d}", i) for i in range(count)]
    pairs += [("validation", f"ADE_val_{i + 1:08d}", i) for i in range(2)]
    for folder, stem, index in pairs:
        height, width = SIZES[index % len(SIZES)]
        Image.fromarray(photo(rng, height, width)).save(
            os.path.join(release, "images", folder, f"{stem}.jpg"), quality=90)
        Image.fromarray(label_map(rng, height, width), mode="L").save(
            os.path.join(release, "annotations", folder, f"{stem}.png"))
    return release


# ---------------------------------------------------------------- Workers


def worker_ours(root: str, cores: list[int], seconds: float, device_photometric=True) -> dict:
    _pin(cores)
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(len(cores))
    from mae_jax.data import seg_input

    batches = seg_input.create_seg_train_iterator(
        source="ade20k", data_dir=os.path.join(root, "tfds"), global_batch_size=BATCH,
        crop_size=CROP, seed=0, process_index=0, process_count=1, threads=len(cores),
        device_photometric=device_photometric)
    return _measure(lambda: next(batches)["image"], seconds)


def worker_host(root: str, cores: list[int], seconds: float) -> dict:
    """Ours with the photometric distortion on the host too."""
    return worker_ours(root, cores, seconds, device_photometric=False)


def worker_official(root: str, cores: list[int], seconds: float) -> dict:
    _pin(cores)
    import cv2
    import torch
    from PIL import Image

    cv2.setNumThreads(0)  # mmcv's DataLoader workers run OpenCV single-threaded
    torch.set_num_threads(1)
    release = os.path.join(root, "ADEChallengeData2016")
    stems = sorted(name[:-4] for name in os.listdir(os.path.join(release, "images", "training")))
    rng = np.random.RandomState(cores[0])
    mean = np.array([123.675, 116.28, 103.53], np.float64).reshape(1, -1)
    stdinv = 1 / np.array([58.395, 57.12, 57.375], np.float64).reshape(1, -1)

    def convert(img, alpha=1.0, beta=0.0):  # PhotoMetricDistortion.convert
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def saturation(img):
        if rng.randint(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 1] = convert(img[:, :, 1], alpha=rng.uniform(0.5, 1.5))
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img

    def hue(img):
        if rng.randint(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 0] = (img[:, :, 0].astype(int) + rng.randint(-18, 18)) % 180
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img

    def contrast(img):
        return convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.randint(2) else img

    def crop_box(shape):
        top = rng.randint(0, max(shape[0] - CROP, 0) + 1)
        left = rng.randint(0, max(shape[1] - CROP, 0) + 1)
        return top, min(top + CROP, shape[0]), left, min(left + CROP, shape[1])

    def transform(stem):
        with open(os.path.join(release, "images", "training", f"{stem}.jpg"), "rb") as handle:
            img = cv2.imdecode(np.frombuffer(handle.read(), np.uint8), cv2.IMREAD_COLOR)
        with open(os.path.join(release, "annotations", "training", f"{stem}.png"), "rb") as f:
            seg = np.array(Image.open(f))
        seg = seg.copy()  # reduce_zero_label
        seg[seg == 0] = 255
        seg = seg - 1
        seg[seg == 254] = 255
        ratio = rng.random_sample() * (RATIO_RANGE[1] - RATIO_RANGE[0]) + RATIO_RANGE[0]
        long_edge, short_edge = int(SCALE[0] * ratio), int(SCALE[1] * ratio)
        h, w = img.shape[:2]
        factor = min(long_edge / max(h, w), short_edge / min(h, w))  # mmcv.imrescale
        size = (int(w * factor + 0.5), int(h * factor + 0.5))
        img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
        seg = cv2.resize(seg, size, interpolation=cv2.INTER_NEAREST)
        box = crop_box(img.shape)
        for _ in range(10):  # RandomCrop with cat_max_ratio
            labels, counts = np.unique(seg[box[0]:box[1], box[2]:box[3]], return_counts=True)
            counts = counts[labels != 255]
            if len(counts) > 1 and np.max(counts) / np.sum(counts) < 0.75:
                break
            box = crop_box(img.shape)
        img, seg = img[box[0]:box[1], box[2]:box[3]], seg[box[0]:box[1], box[2]:box[3]]
        if rng.rand() < 0.5:  # RandomFlip
            img, seg = np.flip(img, axis=1), np.flip(seg, axis=1)
        if rng.randint(2):  # PhotoMetricDistortion: brightness
            img = convert(img, beta=rng.uniform(-32, 32))
        mode = rng.randint(2)
        img = contrast(img) if mode == 1 else img
        img = hue(saturation(img))
        img = contrast(img) if mode == 0 else img
        img = np.ascontiguousarray(img).astype(np.float32)  # Normalize (mmcv.imnormalize)
        cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
        cv2.subtract(img, mean, img)
        cv2.multiply(img, stdinv, img)
        pad_h, pad_w = CROP - img.shape[0], CROP - img.shape[1]  # Pad
        img = cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=0)
        seg = cv2.copyMakeBorder(np.ascontiguousarray(seg), 0, pad_h, 0, pad_w,
                                 cv2.BORDER_CONSTANT, value=255)
        return (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                torch.from_numpy(seg[None].astype(np.int64)))

    examples = cycled(stems, transform, BATCH)

    def next_batch():
        images, labels = zip(*examples(), strict=True)
        torch.stack(labels)
        return torch.stack(images)

    return _measure(next_batch, seconds)


def device_photometric_cost(seconds: float) -> dict:
    """The device part: ms per image of `apply_photometric` (every distortion on) + the
    normalisation, jitted, on batches of BATCH 512 x 512 crops, on JAX's default device (one
    pinned core here; no TensorFlow, so also on the GPU machine)."""
    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("", "cpu"):
        _pin(sorted(os.sched_getaffinity(0))[:1])
    import jax
    import jax.numpy as jnp

    from mae_jax.data.constants import normalize_uint8
    from mae_jax.data.photometric import apply_photometric

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (BATCH, CROP, CROP, 3), dtype=np.uint8))
    params = jnp.asarray(np.concatenate([
        rng.uniform(0.5, 1.5, (BATCH, 7)), np.full((BATCH, 2), CROP)], axis=1), jnp.float32)
    step = jax.jit(lambda images, params: normalize_uint8(apply_photometric(images, params)))
    return {"ms_per_image": seconds_per_call(lambda: step(images, params), seconds) / BATCH * 1e3,
            "device": str(jax.devices()[0].device_kind)}


WORKERS = {"ours": worker_ours, "host": worker_host, "official": worker_official}


# -------------------------------------------------------------- Orchestration


KEYS = ("ours", "ours_all_on_host", "official")


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__.split("\n")[0], "photometric distortion + normalisation",
                         [*WORKERS, "device"], "--root")
    parser.add_argument("--images", type=int, default=64, help="image / label pairs to write")
    return check_args(parser, parser.parse_args(argv), BATCH)


def main(argv: list[str] | None = None) -> dict | None:
    """Runs the benchmark; returns {"machine", "settings", "summary" (`summarize_rounds`),
    "device_part"} (--device_part: {"machine", "device_part"}), also written to --out_json."""
    args = parse_args(argv)
    done, report = worker_or_device_part(
        args, {**WORKERS, "device": lambda data, cores, seconds: device_photometric_cost(
            seconds)}, device_photometric_cost,
        lambda cost: f"Device part of the segmentation input on {cost['device']}: photometric "
                     f"distortion + normalisation of {CROP} x {CROP} crops, batches of "
                     f"{BATCH}: {cost['ms_per_image']:.3f} ms per image.")
    if done:
        return report
    machine = report["machine"]
    with tempfile.TemporaryDirectory() as root:
        release = write_release(root, args.images)
        kilobytes = np.mean([os.path.getsize(os.path.join(release, "images", "training", n))
                             for n in os.listdir(os.path.join(release, "images", "training"))])
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from mae_jax.data import ade20k; "
                        "ade20k.prepare_ade20k(data_dir=sys.argv[1], manual_dir=sys.argv[2])",
                        os.path.join(root, "tfds"), root], check=True, capture_output=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        prepare_s = time.perf_counter() - started
        load_before = os.getloadavg()
        rows = {}
        for _ in range(args.rounds):
            for label, cores in core_sets(args.max_cores):
                where = ("--root", root, cores, args.seconds)
                rows.setdefault(label, []).append((
                    run_worker(__file__, "ours", *where), run_worker(__file__, "host", *where),
                    run_per_core(__file__, "official", *where)))
        device = run_worker(__file__, "device", "--root", root, [0], args.seconds)
        load_after = os.getloadavg()

    machine.update(load_average_before=load_before, load_average_after=load_after)
    print(f"\nMachine: {_cpu_model()}, {os.cpu_count()} CPUs visible; Python "
          f"{platform.python_version()}. {args.images} ADE20K-format pairs (JPEG q90, mean "
          f"{kilobytes / 1000:.0f} KB; sizes {', '.join(f'{w}x{h}' for h, w in SIZES)}); TFDS "
          f"records prepared in {prepare_s:.1f} s. Load average before {load_before[0]:.2f} / "
          f"after {load_after[0]:.2f} (1 min). Median of {args.rounds} alternating rounds of "
          f"{args.seconds:g} s.\n")
    print(f"ADE20K train pipeline -> {CROP}x{CROP} crops, batches of {BATCH}. img/s of wall time "
          "(img per CPU-second in brackets); ratio = / official. 'ours': segment.py's pipeline "
          "(data.device_photometric: the photometric distortion runs in the train step, cost "
          "below); 'ours, all on host': the distortion on the host too.\n")
    summary = summarize_rounds(rows, KEYS)
    print_table(summary, KEYS, ("ours", "ours, all on host", "official (mmseg 0.x, OpenCV)"),
                digits=1)
    print(f"\nDevice part (photometric distortion + normalisation, jitted, batches of {BATCH}): "
          f"{device['ms_per_image']:.2f} ms per image on one core of this CPU.")
    report = {"machine": machine, "settings": vars(args) | {"prepare_s": prepare_s},
              "summary": summary, "device_part": device}
    return write_report(report, args.out_json)


if __name__ == "__main__":
    main()
