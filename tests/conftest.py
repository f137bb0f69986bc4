"""Test setup: CPU only, several simulated devices, quiet TensorFlow."""

import contextlib
import os
import signal

# Must be set before jax is imported anywhere: tests build meshes of 1, 2 and 4 CPU devices.
_XLA_FLAGS_GIVEN = "XLA_FLAGS" in os.environ
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# train.py / segment.py started by tests do not restart themselves for glibc's huge pages
# (mae_jax.core.hostmem: ~0.3 s each, before the heavy imports); tests/test_hostmem.py and
# test_entry.py do.
os.environ.setdefault("MAE_JAX_MALLOC_HUGEPAGES", "0")


def _fast_compile_flags() -> str:
    """XLA flags for the default suite's CPU compiles, and for the processes its tests start
    (see pytest_configure). jaxlib 0.11 (the GPU machine's) has only the fusion emitters, and
    XLA aborts the process on a flag it does not know, so the emitter flag is for older ones."""
    import re
    from importlib.metadata import version

    flags = "--xla_backend_optimization_level=0"
    if tuple(map(int, re.match(r"(\d+)\.(\d+)", version("jaxlib")).groups())) < (0, 11):
        flags += " --xla_cpu_use_fusion_emitters=false"
    return flags


FAST_COMPILE = _fast_compile_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from mae_jax.core.run_logging import read_metrics  # noqa: E402
from mae_jax.pretrain import config as pretrain_config  # noqa: E402
from mae_jax.segmentation import config as segmentation_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """The default suite (`-m 'not slow'`, what CI runs) is bound by XLA compile time: its
    programs are tiny and run a few steps. LLVM -O0 cuts the CPU backend's compile times by
    40-65% (measured: the tiny segmenter's init 4.6 -> 1.6 s, its train step 8.5 -> 5.2 s; the
    suite ~100 s shorter on 2 cores) at the price of ~2x slower programs, so it is used there
    only; the slow suite (runs that learn) and a user's own XLA_FLAGS keep the default. The
    HLO programs XLA optimises are the same either way; only the machine code differs.
    Likewise XLA's older elemental emitter for fusions (`xla_cpu_use_fusion_emitters=false`,
    jaxlib < 0.11): the tiny MAE step compiled in 0.7-1.1 s instead of 1.3-1.9 s, the tiny
    segmenter's in 3.1-4.1 s instead of 5.1-7.4 s (3 fresh processes each, alternating,
    2026-12-07)."""
    from jax._src import xla_bridge

    on_cpu = os.environ["JAX_PLATFORMS"] == "cpu"  # not gpu_check.sh's tests on the GPU
    if not _XLA_FLAGS_GIVEN and on_cpu and config.option.markexpr == "not slow":
        assert not xla_bridge.backends_are_initialized(), "XLA_FLAGS set too late"
        os.environ["XLA_FLAGS"] += " " + FAST_COMPILE


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """An xdist worker's end: collect its garbage once, then freeze what is left.

    After a worker reports "finished" (in xdist's wrapper of this hook, after every plain
    implementation such as this one), execnet gives it 5 s to exit and then sends it SIGINT.
    pytest's own end-of-run check for unraisable exceptions runs five full collections, each
    ~1.1 s in a worker that has held jax, TensorFlow and torch (2-vCPU AMD EPYC, 2026-12-07,
    measured with a gc callback), so the SIGINT landed inside jax's gc callback and every CI
    run printed a `KeyboardInterrupt` "exception ignored in _xla_gc_callback", attributed to
    no test. Collecting here, before the report, keeps pytest's check (an exception raised by a
    leaked object's finaliser is reported the same way): up to five collections, as pytest's,
    until one finds nothing (a finaliser can leave new garbage); `gc.freeze` then leaves the
    later collections nothing to walk."""
    del session
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import gc

        for _ in range(5):
            if not gc.collect():
                break
        gc.freeze()


@contextlib.contextmanager
def sigterm_after_step(step: int):
    """Runs started inside get a real SIGTERM after `step`, as a pre-empted job does: the
    training loop is given one more hook, which sends it (every `step` steps; the first stops
    the run)."""
    from mae_jax.core import loop

    original_run_loop = loop.run_loop

    def run_loop_with_sigterm(**kwargs):
        kill = loop.Hook(step, lambda step, state: os.kill(os.getpid(), signal.SIGTERM), False)
        return original_run_loop(**(kwargs | {"hooks": (*kwargs["hooks"], kill)}))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "run_loop", run_loop_with_sigterm)
        yield


@contextlib.contextmanager
def sigterm_during_step(step: int):
    """Runs started inside get a real SIGTERM while step `step` trains (as its batch is
    taken): the stop is asked for before that step's hooks (evaluations, pictures) run."""
    from mae_jax.core import loop

    original_run_loop = loop.run_loop

    def run_loop_with_sigterm(**kwargs):
        def batches(source, first):
            for number, batch in enumerate(source, first + 1):
                if number == step:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        batches = batches(kwargs["batches"], kwargs["start_step"])
        return original_run_loop(**(kwargs | {"batches": batches}))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "run_loop", run_loop_with_sigterm)
        yield


def one_worker(module_name):
    """A test module's mark keeping its tests on one worker (pyproject's `--dist loadgroup`):
    module-scoped runs and compilation caches are per worker process, so they are made once."""
    return pytest.mark.xdist_group(module_name)


def set_fields(config, changes):
    """config with dotted-key changes applied: {"model.image_size": 16, "lr": 1e-3}."""
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def tiny_pretrain_config(**changes):
    """A 16x16 MAE (2 blocks of width 32, patch 4, 1-block decoder) on 32 generated images."""
    config = pretrain_config.defaults()
    config.model.update(
        variant="vit_tiny_patch16", image_size=16, patch_size=4, embed_dim=32, depth=2,
        num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
    )
    config.data.update(source="generated:32", generated_size=16, shuffle_buffer_size=64)
    config.update(
        batch_size=8, lr=1e-3, total_steps=6, warmup_steps=2, log_every_steps=2,
        checkpoint_every_steps=3, visualize_every_steps=3, num_visualize_images=2,
        export_encoder=False, tensorboard=False,
    )
    return set_fields(config, changes)


def tiny_finetune_config(**changes):
    """fine-tuning (every augmentation on) of a 16x16 ViT (2 blocks of width 32, patch 4) on a
    labelled folder given as data.source."""
    from mae_jax.classification.config import defaults

    config = defaults("finetune")
    config.model.update(variant="vit_tiny_patch16", image_size=16, patch_size=4, embed_dim=32,
                        depth=2, num_heads=2)
    config.data.update(eval_split="val", crop_scale=(0.5, 1.0), resize_ratio=1.0,
                       shuffle_buffer_size=64)
    config.update(batch_size=16, grad_accum_steps=1, lr=2e-3, total_steps=4, warmup_steps=1,
                  eval_batch_size=16, eval_every_epochs=0.0, log_every_steps=1,
                  checkpoint_every_steps=2, tensorboard=False, export_official=False)
    return set_fields(config, changes)


def tiny_segmentation_config(**changes):
    """A 16x16 ViT (2 blocks feeding the 4 levels twice) + 16-channel UPerNet, 4 classes."""
    config = segmentation_config.defaults()
    config.model.update(
        variant="vit_tiny_patch16", image_size=16, patch_size=4, embed_dim=32, depth=2,
        num_heads=2, out_indices=(0, 1, 0, 1), channels=16, aux_channels=16,
    )
    config.data.update(
        source="synthetic", num_classes=4, scene_size=24, num_examples=16, scale=(24, 24),
        eval_limit=2,
    )
    config.mesh.update(data=1, fsdp=1)
    config.update(
        batch_size=4, lr=1e-3, total_steps=6, warmup_steps=2, log_every_steps=2,
        checkpoint_every_steps=3, eval_every_steps=6, eval_window=16, eval_stride=8,
        num_pictures=2, tensorboard=False,
    )
    return set_fields(config, changes)


def load_config_file(name, arg=None):
    """configs/<name>.py's get_config(arg)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# What a command must not import before it has checked its command line.
HEAVY_LIBRARIES = frozenset({"jax", "jaxlib", "flax", "optax", "orbax", "tensorflow",
                             "tensorflow_datasets", "torch", "transformers", "numpy", "scipy",
                             "PIL", "cv2", "matplotlib", "safetensors"})


def run_listing_imports(args, **kwargs):
    """`python -X importtime *args` in the repository root; returns the finished process and
    the heavy libraries (HEAVY_LIBRARIES) it imported, from Python's own import listing (which
    must show absl: the listing itself is checked)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, **kwargs)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "absl" in imported, result.stderr[-2000:]
    return result, sorted(imported & HEAVY_LIBRARIES)


def losses_of(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


def params_of(workdir, step=None):
    """The trained parameters of a run directory, as nested dicts of numpy arrays."""
    from mae_jax.weights.load import load_model

    model = load_model(str(workdir), step=step)
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


@pytest.fixture(scope="module")
def shared_compilations(tmp_path_factory):
    """Tests of one module that compile the same tiny model again (resume, eval-only,
    init_from): a persistent compilation cache, private to the module, makes repeats file reads."""
    from jax.experimental.compilation_cache import compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {key: getattr(jax.config, key) for key in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    yield
    for key, value in before.items():
        jax.config.update(key, value)
    compilation_cache.reset_cache()
