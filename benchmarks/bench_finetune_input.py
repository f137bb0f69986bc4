"""Fine-tuning input throughput per CPU core: ours (tf.data) vs the official timm transform.

    pip install --no-deps timm    # only its auto_augment.py / random_erasing.py are loaded
    python benchmarks/bench_finetune_input.py               # 3 rounds x 8 s, 1 and 2 cores

The same generated 500 x 375 JPEGs as `bench_input.py`. The recipe of the official
main_finetune.py (timm's `create_transform(is_training=True)`):

* official: PIL decode, RandomResizedCrop(224, scale 0.08-1, bicubic), flip, timm's
  RandAugment `rand-m9-mstd0.5-inc1` (translate_const 100, fill = the ImageNet mean), ToTensor,
  Normalize, RandomErasing(0.25, mode "pixel") on the tensor, batches of 64 stacked. timm's
  auto_augment.py and random_erasing.py are loaded by file path (they import only PIL, numpy
  and torch; timm's package imports torchvision, which does not load next to the CPU torch).
* ours, all on the host: `mae_jax.data.images.create_train_iterator(randaugment=...)`: the
  crop window decoded alone, one bicubic resize, flip, RandAugment in TensorFlow ops (pinned to
  PIL's / timm's by tests/test_randaugment.py) -> uint8 batches; normalising and random erasing
  run inside the train step on the accelerator, so they are not counted here.
* ours, RandAugment on the device (host part): the same with `device_resize_canvas=512`: the
  host decodes the crop window into the canvas and draws RandAugment's layers (op codes and
  arguments, `mae_jax.data.randaugment_program`); the resize, flip and the layers run on the
  accelerator (`mae_jax.data.randaugment_device`), timed apart:

    python benchmarks/bench_finetune_input.py --device_part   # no TensorFlow, no timm
    python benchmarks/bench_finetune_input.py --cifar   # 32 px PNGs, 224 px canvas (CIFAR)

Processes are pinned as in `bench_input.py` (whose helpers this script uses); rounds
alternate ours / official.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import types

import bench_input
import numpy as np
from bench_input import (
    _cpu_model,
    _measure,
    _pin,
    core_sets,
    crop_sampler,
    cycled,
    run_per_core,
    run_worker,
    write_images,
    write_report,
)

BATCH, SIZE, SCALE = 64, 224, (0.08, 1.0)
# --cifar (passed to the worker processes through the environment): 32 x 32 PNGs, as CIFAR's
# records, and configs/cifar100_finetune.py's 224 px canvas.
CIFAR = os.environ.get("BENCH_FINETUNE_CIFAR") == "1"
SOURCE = (32, 32) if CIFAR else (375, 500)  # generated images' height, width
CANVAS = 224 if CIFAR else 512  # device_resize_canvas of RandAugment on the device
POLICY = "rand-m9-mstd0.5-inc1"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _timm_module(name: str):
    """timm/data/<name>.py, loaded alone (no timm package import, so no torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The official transform needs timm's files: pip install --no-deps timm")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", name + ".py")
    module_spec = importlib.util.spec_from_file_location("_timm_" + name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def worker_official(folder: str, cores: list[int], seconds: float) -> dict:
    _pin(cores)
    import random

    import torch
    from PIL import Image

    torch.set_num_threads(1)
    auto_augment, erasing = _timm_module("auto_augment"), _timm_module("random_erasing")
    from PIL import ImageOps

    def posterize(image, bits):  # Pillow 12+ refuses 0 bits; the older Pillow gave black
        return image.point(lambda _: 0) if bits < 1 else ImageOps.posterize(image, bits)

    auto_augment.ImageOps = types.SimpleNamespace(**{**vars(ImageOps), "posterize": posterize})
    augment = auto_augment.rand_augment_transform(POLICY, {
        "translate_const": int(SIZE * 0.45), "img_mean": tuple(round(255 * m) for m in MEAN),
        "interpolation": Image.BICUBIC})
    erase = erasing.RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    rng = random.Random(cores[0])

    get_params = crop_sampler(rng, SCALE)  # torchvision RandomResizedCrop.get_params

    def transform(path):
        with open(path, "rb") as handle:
            image = Image.open(handle).convert("RGB")
        top, left, h, w = get_params(*image.size)
        image = image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.array(augment(image), np.uint8, copy=True)
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous().float().div(255)
        return erase(tensor.sub_(mean).div_(std))

    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    examples = cycled(paths, transform, BATCH)
    return _measure(lambda: torch.stack(examples()), seconds)


def worker_ours(folder: str, cores: list[int], seconds: float) -> dict:
    return bench_input.worker_ours(folder, cores, seconds, crop_scale=SCALE, randaugment=POLICY)


def worker_device(folder: str, cores: list[int], seconds: float) -> dict:
    """The host part of RandAugment on the devices: decode the crop window into the canvas,
    draw the layers (`create_train_iterator(device_resize_canvas=CANVAS, randaugment=...)`)."""
    return bench_input.worker_ours(folder, cores, seconds, canvas=CANVAS, crop_scale=SCALE,
                                   randaugment=POLICY)


def write_cifar_images(folder: str, count: int) -> None:
    """`bench_input.photo`s shrunk to 32 x 32 (bicubic), saved as PNGs like CIFAR's records."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        image = Image.fromarray(bench_input.photo(rng)).resize(SOURCE[::-1], Image.BICUBIC)
        image.save(os.path.join(folder, f"{index:05d}.png"))


def device_part_cost(seconds: float) -> dict:
    """The device part on JAX's default device (one pinned core on a CPU): ms per image of
    `make_canvas_fn` on BATCH canvases with and without RandAugment's two layers (programs
    drawn as the policy draws them: each layer applied with probability 0.5, op uniform)."""
    if bench_input.jax_platform() == "cpu":
        _pin(sorted(os.sched_getaffinity(0))[:1])
    import jax

    from mae_jax.core import sharding
    from mae_jax.data import device_resize
    from mae_jax.data.randaugment_device import CODE, STAGES

    # timm's 15 ops as device codes (no TensorFlow here): the 5 geometric ones are one code,
    # rotations (1 of 5) with the 16-tap warp, shears and translations with 4 taps.
    policy = ["affine"] * 5 + [op for stage, (ops, _) in STAGES.items()
                               if stage not in ("warp", "shift") for op in ops]
    rng = np.random.default_rng(0)
    side = np.sqrt(rng.uniform(*SCALE, BATCH) * SOURCE[0] * SOURCE[1])
    box = np.stack([np.zeros(BATCH), np.zeros(BATCH), np.minimum(side, SOURCE[0]),
                    np.minimum(side, SOURCE[1])], 1).astype(np.int32)
    codes = np.asarray([CODE[policy[i]] for i in rng.integers(0, 15, 2 * BATCH)])
    codes = np.where(rng.random(2 * BATCH) < 0.5, codes, CODE["identity"]).reshape(BATCH, 2)
    angle = np.radians(rng.uniform(-30, 30, (BATCH, 2)))
    matrix = np.stack([np.cos(angle), np.sin(angle), 30 * np.ones_like(angle), -np.sin(angle),
                       np.cos(angle), -30 * np.ones_like(angle)], -1)  # a rotation
    shear = np.zeros_like(matrix) + np.asarray([1, 0.2, 0, 0, 1, 0])  # ShearX
    matrix = np.where((rng.random((BATCH, 2)) < 0.2)[..., None], matrix, shear)
    args = np.where((codes == CODE["affine"])[..., None], matrix, 1.6).astype(np.float32)
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
    parts = sharding.global_batch_from_host({
        "canvas": rng.integers(0, 256, (BATCH, CANVAS, CANVAS, 3), dtype=np.uint8),
        "box": box, "flip": rng.random(BATCH) < 0.5, "ra_code": codes.astype(np.int32),
        "ra_args": args}, sharding.batch_sharding(mesh))
    keys = ("canvas", "box", "flip", "ra_code", "ra_args")
    times = {}
    for randaugment, count in ((False, 3), (True, 5)):
        function = device_resize.make_canvas_fn(mesh, image_size=SIZE, randaugment=randaugment)
        arguments = [parts[key] for key in keys[:count]]
        times[randaugment] = bench_input.seconds_per_call(lambda f=function, a=arguments: f(*a),
                                                          seconds / 2) / BATCH * 1e3
    return {"ms_per_image": times[True], "resize_ms_per_image": times[False],
            "canvas": CANVAS, "device": str(jax.devices()[0].device_kind)}


WORKERS = {"ours": worker_ours, "device": worker_device, "official": worker_official,
           "part": lambda folder, cores, seconds: device_part_cost(seconds)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_input.base_parser(__doc__.split("\n")[0], "resize + RandAugment; no timm",
                                     WORKERS, "--folder")
    parser.add_argument("--images", type=int, default=256, help="images to generate")
    parser.add_argument("--cifar", action="store_true",
                        help="32 x 32 PNGs and a 224 px canvas (configs/cifar100_finetune.py) "
                             "instead of 500 x 375 JPEGs and 512 px")
    return bench_input.check_args(parser, parser.parse_args(argv), BATCH)


def _describe(cost: dict) -> str:
    return (f"Device part (resize {CANVAS} px canvas -> {SIZE} px + flip + RandAugment's 2 "
            f"layers, `make_canvas_fn`) on {cost['device']}: {cost['ms_per_image']:.3f} ms per "
            f"image ({1e3 / cost['ms_per_image']:.0f} images/s); without RandAugment "
            f"{cost['resize_ms_per_image']:.3f} ms.")


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.cifar:  # for this process and the workers it starts
        global CIFAR, SOURCE, CANVAS
        os.environ["BENCH_FINETUNE_CIFAR"] = "1"
        CIFAR, SOURCE, CANVAS = True, (32, 32), 224
    done, report = bench_input.worker_or_device_part(args, WORKERS, device_part_cost, _describe)
    if done:
        return report
    _timm_module("auto_augment")  # fail before the rounds when timm's files are missing
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        write_cifar_images(folder, args.images) if CIFAR else write_images(folder, args.images)
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for label, cores in core_sets(args.max_cores):
                where = ("--folder", folder, cores, args.seconds)
                results = {"ours": run_worker(__file__, "ours", *where),
                           "ours_device": run_worker(__file__, "device", *where),
                           "official": run_per_core(__file__, "official", *where)}
                for key, r in results.items():
                    rows.setdefault(label, {}).setdefault(key, []).append(
                        r["images"] / r["wall_s"])
        cost = run_worker(__file__, "part", "--folder", folder, core_sets(1)[0][1],
                          args.seconds)
        load_after = os.getloadavg()
    what = "32x32 PNGs" if CIFAR else "500x375 JPEGs"
    print(f"\n{_cpu_model()}; fine-tuning input ({POLICY}, crop scale {SCALE[0]}-{SCALE[1]}), "
          f"{what}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} "
          f"after; median of {args.rounds} alternating rounds of {args.seconds:g} s. 'RandAugment "
          f"on device': the host part of device_resize_canvas={CANVAS} (decode the crop window "
          "into the canvas, draw the layers).\n")
    print("| cores | official (timm) img/s | ours, all on host img/s | ours / official | ours, "
          "RandAugment on device (host part) img/s | ours / official | rounds (host / device "
          "/ official) |\n|---|---|---|---|---|---|---|")
    summary = {}
    for label, columns in rows.items():
        ours, device, official = (float(np.median(columns[k]))
                                  for k in ("ours", "ours_device", "official"))
        summary[label] = {"ours_img_s": ours, "official_img_s": official,
                          "ratio": ours / official, "ours_device_img_s": device,
                          "ratio_device": device / official, "rounds": columns}
        print(f"| {label} | {official:.0f} | {ours:.0f} | {ours / official:.2f}x | {device:.0f} "
              f"| {device / official:.2f}x | " + ", ".join(
                  f"{o:.0f} / {d:.0f} / {f:.0f}" for o, d, f in zip(
                      columns["ours"], columns["ours_device"], columns["official"],
                      strict=True)) + " |")
    print("\n" + _describe(cost).replace(" on cpu", " on one core of this CPU"))
    report.update(settings=vars(args) | {"policy": POLICY, "crop_scale": SCALE,
                                         "canvas": CANVAS, "source": SOURCE},
                  load_average=[load_before, load_after], summary=summary, device_part=cost)
    return write_report(report, args.out_json)


if __name__ == "__main__":
    main()
