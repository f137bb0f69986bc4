"""The evaluation over fixed canvases: the per-image path's metrics and pictures, a compile count
that does not grow with the number of image sizes, and the same result on 1 and 4 devices."""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FAST_COMPILE, one_worker, tiny_segmentation_config
from flax import nnx

from mae_jax.core import sharding as sharding_lib
from mae_jax.core.state import TrainState
from mae_jax.data.ade20k_meta import colorize
from mae_jax.models.segmenter import MAESegmenter
from mae_jax.segmentation.evaluation import Evaluator
from mae_jax.segmentation.metrics import SegMetrics
from mae_jax.segmentation.sliding_window import slide_inference

pytestmark = one_worker(__name__)


CLASSES = 4
# Test scale (40, 24): a 24x40 canvas; window 16 (the model's input), stride 11.
CONFIG = tiny_segmentation_config(**{"data.scale": (40, 24), "eval_stride": 11})  # its model:
# (test-scale size, original label size): smaller than the window, non-multiples of the stride,
# portrait, labels larger, smaller and equal.
CASES = [((24, 40), (30, 50)), ((12, 30), (11, 29)), ((20, 33), (20, 33)), ((40, 24), (37, 22)),
         ((9, 13), (18, 26)), ((33, 17), (60, 31)), ((30, 12), (45, 18)), ((24, 24), (24, 24))]
MORE_CASES = [((23, 39), (23, 39)), ((11, 31), (14, 40)), ((21, 34), (10, 17)),
              ((39, 23), (52, 31)), ((22, 22), (44, 44)), ((8, 14), (8, 14)), ((17, 35), (35, 70))]

COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None
)


def make_examples(cases, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    examples = []
    for (height, width), label_size in cases:
        if dtype == np.uint8:
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        else:
            image = rng.normal(size=(height, width, 3)).astype(np.float32)
        label = rng.integers(0, CLASSES, label_size).astype(np.int32)
        label[rng.random(label_size) < 0.1] = 255
        examples.append({"image": image, "label": label})
    return examples


def build_segmenter():
    """(graphdef, state) of the tiny segmenter at init (UPerNet heads untrained)."""
    model = MAESegmenter(variant="vit_tiny_patch16", image_size=16, patch_size=4, embed_dim=32,
                         depth=2, num_heads=2, out_indices=(0, 1, 0, 1), channels=16,
                         aux_channels=16, num_classes=CLASSES, rngs=nnx.Rngs(0))
    return nnx.graphdef(model), TrainState.create(model, optax.set_to_zero(), rng_seed=0)


@pytest.fixture(scope="module")
def segmenter():
    return build_segmenter()


def make_evaluator(graphdef, num_devices=1, fsdp=1, **layout):
    mesh = sharding_lib.create_mesh(data=-1, fsdp=fsdp, devices=jax.devices()[:num_devices])
    return Evaluator(CONFIG, graphdef, mesh, CLASSES, "", None, **layout)


@pytest.fixture(scope="module")
def per_image(segmenter):
    """The previous evaluation: `slide_inference` per image, argmax, host metrics."""
    graphdef, state = segmenter
    forward = jax.jit(lambda windows: nnx.merge(graphdef, state.params, state.rest)(
        windows, train=False)[0].astype(jnp.float32))
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])

    def evaluate(examples):
        metrics, predictions = SegMetrics(CLASSES), []
        for example in examples:
            image = example["image"]
            if image.dtype == np.uint8:  # mmseg's normalisation, written out (REFERENCE.md)
                image = ((image - mean) / std).astype(np.float32)
            logits = slide_inference(forward, image, num_classes=CLASSES, window=16, stride=11,
                                     output_size=example["label"].shape, pad_windows_to=8)
            predictions.append(np.asarray(jnp.argmax(logits, axis=-1)))
            metrics.update(predictions[-1], example["label"])
        return metrics.areas, predictions

    return evaluate


@pytest.fixture(scope="module")
def evaluated(segmenter):
    """An evaluator of 3 images per call, tiles of 8 and 5 tiles per call (several score calls
    per stitch call), its first evaluation and the compilations that evaluation triggered."""
    graphdef, state = segmenter
    evaluator = make_evaluator(graphdef, images_per_call=3, tile=8, tiles_per_call=5)
    examples = make_examples(CASES)
    before = len(COMPILES)
    metrics, pictures = evaluator.evaluate(state, examples, num_pictures=len(CASES))
    return evaluator, examples, metrics, pictures, len(COMPILES) - before


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_evaluation_equals_the_per_image_path_and_host_metrics(segmenter, evaluated, per_image,
                                                               dtype):
    evaluator, examples, metrics, pictures, _ = evaluated
    if dtype == np.uint8:  # normalised on the device
        examples = make_examples(CASES, seed=1, dtype=np.uint8)
        metrics, pictures = evaluator.evaluate(segmenter[1], examples, num_pictures=len(CASES))
    want_areas, predictions = per_image(examples)
    np.testing.assert_array_equal(metrics.areas, want_areas)
    assert metrics.areas[3].sum() == sum((e["label"] != 255).sum() for e in examples)
    # Pictures: image | prediction | ground truth at the label size, original orientation.
    palette = np.random.default_rng(1).integers(0, 255, (CLASSES, 3)).astype(np.uint8)
    assert len(pictures) == len(CASES)
    for picture, example, prediction in zip(pictures, examples, predictions, strict=True):
        height, width = example["label"].shape
        assert picture.shape == (height, 3 * width, 3)
        np.testing.assert_array_equal(picture[:, width:2 * width], colorize(prediction, palette))
        np.testing.assert_array_equal(picture[:, 2 * width:], colorize(example["label"], palette))


def test_evaluation_compiles_a_bounded_number_of_times_over_many_sizes(segmenter, evaluated):
    evaluator, _, _, _, first = evaluated
    # The stitch and score programs and the zero areas, for 8 sizes in 6 stitch calls.
    assert 1 <= first <= 3
    before = len(COMPILES)
    evaluator.evaluate(segmenter[1], make_examples(MORE_CASES, seed=2))  # 7 new sizes
    evaluator.evaluate(segmenter[1], make_examples(MORE_CASES[:2], seed=3))  # a partial call
    assert len(COMPILES) == before


def test_four_devices_give_the_metrics_and_pictures_of_one_device(segmenter, evaluated):
    _, examples, metrics, pictures, _ = evaluated
    graphdef, state = segmenter
    # A 2 x 2 mesh: every device evaluates its own images; the parameters are split over
    # "fsdp" (min_size 16 splits even this tiny model) and gathered for the evaluation.
    evaluator = make_evaluator(graphdef, num_devices=4, fsdp=2, images_per_call=1)
    state = jax.device_put(state, sharding_lib.state_shardings(state, evaluator.mesh,
                                                               min_size=16))
    got, got_pictures = evaluator.evaluate(state, examples, num_pictures=len(CASES))
    np.testing.assert_array_equal(got.areas, metrics.areas)
    for picture, want in zip(got_pictures, pictures, strict=True):
        np.testing.assert_array_equal(picture, want)


# Each process: 2 CPU devices, gloo collectives, its own share of CASES (6 and 2 examples, one
# image per call: process 1 runs dummy calls while process 0 finishes), areas saved to a file.
WORKER = """
import os, sys
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id)
import numpy as np
import test_seg_evaluation as t
from mae_jax.core import sharding as sharding_lib
graphdef, state = t.build_segmenter()
evaluator = t.make_evaluator(graphdef, num_devices=4, images_per_call=1, tile=8,
                             tiles_per_call=5)
state = jax.device_put(state, sharding_lib.replicated(evaluator.mesh))
examples = t.make_examples(t.CASES)
share = examples[:6] if process_id == 0 else examples[6:]
metrics, pictures = evaluator.evaluate(state, share, num_pictures=2)
np.save(os.path.join(out, f"areas_{process_id}.npy"), metrics.areas)
assert len(pictures) == (2 if process_id == 0 else 0), len(pictures)

def unreadable_after_one(share):  # process 1's file server fails after its first example
    yield share[0]
    raise OSError("Input/output error: validation/ADE_val_00000007.jpg")

try:
    evaluator.evaluate(state, share if process_id == 0 else unreadable_after_one(share))
except Exception as error:
    print("failed:", type(error).__name__, error, getattr(error, "status", ""), flush=True)
"""


def test_two_processes_sum_their_shares_into_the_one_process_metrics(evaluated, tmp_path):
    _, _, metrics, _, _ = evaluated
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    # Unoptimised XLA code compiles faster; this test checks results, not speed.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}",
               PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)]))
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(port), str(tmp_path)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for i in range(2)]
    outputs = []
    for worker in workers:
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output[-3000:]
        outputs.append(output)
    # An error on one process mid-evaluation (reading its share) reaches the other, which used
    # to wait for it in the next collective until JAX's heartbeat timeout.
    assert ("failed: OSError Input/output error: validation/ADE_val_00000007.jpg"
            in outputs[1]), outputs[1][-3000:]
    assert ("failed: ProcessFailedError Process 1 failed evaluating its share of the validation "
            "set (exit status 1)") in outputs[0], outputs[0][-3000:]
    for process_id in range(2):  # every process holds the sum over both
        np.testing.assert_array_equal(np.load(tmp_path / f"areas_{process_id}.npy"),
                                      metrics.areas)
