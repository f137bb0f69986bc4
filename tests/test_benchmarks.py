"""benchmarks/bench_train_step.py and bench_seg_train_step.py: the steps train.py and
segment.py run, timed on tiny models; both frameworks report sane rows; FLOP counts and MFU."""

import gzip
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import FAST_COMPILE, tiny_segmentation_config
from flax import nnx

import mae_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_train_step.py")
TINY = ["--image_size", "32", "--patch_size", "8", "--embed_dim", "32", "--depth", "1",
        "--num_heads", "2", "--decoder_depth", "1", "--decoder_width", "32",
        "--batch_size", "4", "--steps", "2", "--repeats", "2", "--warmup", "1"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_devices_errors_name_the_fix_before_jax_starts(monkeypatch):
    """--cpu_devices: a negative count is a usage error, and a device count also set in
    XLA_FLAGS exits with the conflict and its fix (no traceback) before any step is built."""
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--cpu_devices", "-1"])
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    with pytest.raises(SystemExit, match="--cpu_devices: .*drop --xla_force_host_platform_dev"):
        bench.main(["--cpu_devices", "2", "--frameworks", "jax"])


def test_mfu_counts_the_matmul_flops_xla_counts_and_the_known_peak():
    """The MFU numerator (3 x forward matmul FLOPs, written out in the script) against XLA's own
    FLOP count of our MAE ViT-B/16 forward at 224 px (lowered abstractly, nothing runs): XLA
    also counts norms, softmax and elementwise ops, so ours is a little below it."""
    bench = load_bench()
    dims = bench.model_dims(bench.build_config(bench.parse_args(["--model", "vit_base_patch16"])))
    ours = bench.forward_matmul_flops(dims, 224, encoder_tokens=49)  # 75% of 196 masked
    graphdef, state = nnx.split(nnx.eval_shape(lambda: mae_jax.create_mae("vit_base_patch16")))
    forward = jax.jit(lambda state, images, noise: nnx.merge(graphdef, state)(images, noise=noise))
    xla = forward.lower(state, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
                        jax.ShapeDtypeStruct((1, 196), jnp.float32)).cost_analysis()["flops"]
    assert 0.95 * xla < ours <= xla, (ours, xla)  # measured: 19.56 vs 19.96 GFLOP
    # The training loss (MAE.loss): the decoder's last block and head on the 147 removed
    # patches; counted with decoder_rows, against XLA's count of that forward.
    trained = bench.forward_matmul_flops(dims, 224, encoder_tokens=49, decoder_rows=147)
    loss = jax.jit(lambda state, images, noise: nnx.merge(graphdef, state).loss(
        images, noise=noise))
    xla_loss = loss.lower(state, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, 196), jnp.float32)).cost_analysis()["flops"]
    assert 0.95 * xla_loss < trained <= xla_loss and trained < ours, (trained, xla_loss)
    # No decoder blocks: only the head skips the 50 kept tokens' rows (a review found the
    # count going negative there).
    shallow = {**dims, "decoder_depth": 0}
    skipped = (bench.forward_matmul_flops(shallow, 224, encoder_tokens=49)
               - bench.forward_matmul_flops(shallow, 224, encoder_tokens=49, decoder_rows=147))
    assert skipped == 2 * 50 * dims["decoder_embed_dim"] * 3 * 16 * 16
    # Peaks: NVIDIA's dense bf16 numbers by device name; float32 needs --peak_tflops.
    assert bench.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4  # SXM
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert bench.peak_tflops("NVIDIA H100 NVL", "bfloat16") == 835.0
    assert bench.peak_tflops("NVIDIA H200", "float32") is None
    assert bench.peak_tflops("cpu", "float32", override=2.0) == 2.0
    row = bench.add_utilisation({"images_per_s": 8000.0}, 3 * ours, devices=1, peak=989.4)
    assert row["mfu"] == pytest.approx(3 * ours * 8000 / 989.4e12)
    assert 0.45 < row["mfu"] < 0.5  # 8,000 img/s of MAE ViT-B on one H200: ~47%


@pytest.mark.slow
def test_both_frameworks_report_finite_timings_and_one_jax_compile(tmp_path, capsys):
    bench = load_bench()
    out_json = tmp_path / "bench.json"
    report = bench.main([*TINY, "--frameworks", "jax,torch", "--out_json", str(out_json),
                         "--profile_dir", str(tmp_path / "profile"), "--profile_steps", "2"])
    printed = capsys.readouterr().out

    assert json.loads(out_json.read_text())["results"] == json.loads(json.dumps(report["results"]))
    rows = {row["framework"]: row for row in report["results"]}
    assert list(rows) == ["jax", "torch"]
    for row in rows.values():
        assert row["batch"] == 4
        assert len(row["region_seconds"]) == 2
        for key in ("ms_per_step_median", "ms_per_step_mean", "images_per_s", "first_step_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["framework"], key, row[key])
        assert math.isfinite(row["loss"])
        assert row["model_tflops"] > 0 and row["mfu"] is None  # no peak known for a CPU
        assert row["framework"] in printed
    # The step train.py runs compiled exactly once and never again.
    assert rows["jax"]["compiles_first_call"] == 1
    assert rows["jax"]["compiles_after_first_call"] == 0
    assert rows["jax"]["jit_cache_size"] == 1
    assert rows["jax"]["compile_s"] > 0
    assert "no recompilation" in printed  # the two traced steps included
    # --profile_dir: two more steps traced, their XLA ops summed (benchmarks/trace_summary.py).
    profile = rows["jax"]["profile"]
    assert profile["where"] == "host" and profile["total_ms"] > 0 and profile["rows"]
    assert all(r["calls"] % 2 == 0 and r["total_ms"] >= 0 for r in profile["rows"])
    assert 0 < sum(r["share"] for r in profile["kinds"]) <= 1 + 1e-9
    # A kind's calls are its ops' calls summed ("fusion.3" + "fusion.7" -> "fusion").
    assert all(k["calls"] >= 2 and k["calls"] % 2 == 0 for k in profile["kinds"])
    for kind in profile["kinds"]:  # at least the listed ops' calls of that kind
        listed = [r["calls"] for r in profile["rows"]
                  if re.sub(r"\.\d+$", "", r["op"]) == kind["op"]]
        assert kind["calls"] >= sum(listed), kind
    assert "| kind of op | calls | total ms | ms / step | share |" in printed
    # Same architecture on both sides.
    assert rows["jax"]["params"] == rows["torch"]["params"]
    assert report["settings"]["model_dims"]["decoder_num_heads"] == 1
    assert "framework | device" in printed


def test_a_run_killed_after_its_first_row_leaves_that_row_in_its_report(tmp_path,
                                                                         monkeypatch):
    """On a GPU every row runs in one process (PyTorch's, JAX's masked, JAX's on all tokens)
    and the report was written only at the end: an entry killed at its time limit in its last
    compile lost every row, the MFU target's too. The report now holds each row as it ends."""
    bench = load_bench()
    out_json = tmp_path / "bench.json"
    finished = {"framework": "torch", "device": "cpu", "images_per_s": 50.0}
    monkeypatch.setattr(bench, "bench_torch", lambda args: dict(finished))

    def killed(args, **kwargs):
        raise SystemExit("killed at the entry's time limit")

    monkeypatch.setattr(bench, "bench_jax", killed)
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--frameworks", "jax,torch", "--processes", "one",
                    "--encoder_all_tokens", "--out_json", str(out_json)])
    report = json.loads(out_json.read_text())
    assert report["partial"] and [r["framework"] for r in report["results"]] == ["torch"]
    assert report["results"][0]["model_tflops"] > 0  # with its utilisation


def test_benchmark_never_imports_tensorflow(tmp_path):
    # The GPU machine has no TensorFlow: the whole benchmark must run without it. A package
    # named tensorflow shadows the real one, records any import attempt and fails it.
    fake = tmp_path / "no_tf" / "tensorflow"
    fake.mkdir(parents=True)
    marker = tmp_path / "tensorflow_imported"
    (fake / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "raise ImportError('TensorFlow is not installed (simulated)')\n"
    )
    code = f"""
import sys
sys.argv = ["bench", *{TINY!r}, "--steps", "1", "--repeats", "1", "--warmup", "0",
            "--processes", "one"]  # as on a GPU: both frameworks in this process
import runpy
runpy.run_path({SCRIPT!r}, run_name="__main__")
assert "mae_jax.reference.torch_mae" in sys.modules
sys.path.insert(0, {os.path.join(REPO, "benchmarks")!r})
import bench_seg_train_step  # segment.py's step and the segmentation library: no TF either
seg = bench_seg_train_step
seg.load_config(seg.parse_args(["--config", "configs/ade20k_base.py"]))
import bench_seg_input  # its --device_part runs on the GPU machine
import mae_jax.data.photometric
"""
    # Unoptimised XLA code compiles ~3x faster; this test checks imports, not speed.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE,
               PYTHONPATH=os.pathsep.join([str(tmp_path / "no_tf"), REPO]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no recompilation" in result.stdout
    assert not marker.exists(), "something imported tensorflow"


TINY_SEG_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_segmentation_config


def get_config(arg=None):  # transformers' UperHead takes the backbone's width as its channels
    return tiny_segmentation_config(**{{"model.depth": 3, "model.out_indices": (0, 1, 2, 2),
                                        "model.channels": 32}})
"""


def test_segmentation_step_benchmark_reports_one_compile_and_xla_flops(tmp_path, capsys):
    """benchmarks/bench_seg_train_step.py on a tiny segmenter (16 px, batch 4, 3 blocks):
    segment.py's step compiles once, XLA counts its FLOPs, TFLOP/s and MFU follow; the PyTorch
    row (transformers' BeitForSemanticSegmentation built from the same config) trains the same
    parameters but for the key projection's bias (BEiT has none: 3 blocks x 32) and our
    backbone's final LayerNorm (2 x 32; the heads read features before it), and gets the
    same FLOP count."""
    spec = importlib.util.spec_from_file_location(
        "bench_seg_train_step", os.path.join(REPO, "benchmarks", "bench_seg_train_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config, out_json = tmp_path / "tiny_seg.py", tmp_path / "seg.json"
    config.write_text(TINY_SEG_CONFIG.format(tests=os.path.join(REPO, "tests")))
    report = bench.main(["--config", str(config), "--num_devices", "1", "--steps", "1",
                         "--repeats", "2", "--warmup", "0", "--peak_tflops", "1",
                         "--frameworks", "jax,torch", "--processes", "one",
                         "--out_json", str(out_json)])
    ours, theirs = report["results"]
    assert json.loads(out_json.read_text())["results"] == json.loads(json.dumps([ours, theirs]))
    assert ours["compiles"] == 1 and ours["batch"] == theirs["batch"] == 4
    assert ours["image_size"] == theirs["image_size"] == 16
    for row in ours, theirs:
        assert math.isfinite(row["loss"]) and len(row["region_seconds"]) == 2
        assert row["tflops"] == pytest.approx(row["xla_tflop_per_step"] * row["images_per_s"] / 4)
        assert row["mfu"] == pytest.approx(row["tflops"] / 1.0)
    # XLA's count of forward + backward + AdamW: ~0.1 MFLOP an image for this segmenter (its
    # 3x3 convolutions over 32 to 128 channels dominate); ViT-B UPerNet at 512 px
    # (configs/ade20k_base.py) counts 3.66 TFLOP an image.
    assert 20e-6 < ours["xla_tflop_per_step"] / 4 < 200e-6, ours["xla_tflop_per_step"]
    assert theirs["xla_tflop_per_step"] == ours["xla_tflop_per_step"]
    assert ours["params"] - theirs["params"] == 3 * 32 + 2 * 32, (ours["params"], theirs["params"])
    assert ours["device"] == "1 x cpu" and theirs["framework"].startswith("torch")
    out = capsys.readouterr().out
    assert "| jax | vit_tiny_patch16 + UPerNet (32 ch)" in out and "| torch (transformers" in out
    # --compile_only: the same step compiled for shapes alone; XLA's plan and FLOPs, no run.
    planned = bench.main(["--config", str(config), "--num_devices", "1", "--compile_only"])
    (plan,) = planned["results"]
    assert plan["framework"] == "jax, compile only" and "region_seconds" not in plan
    assert plan["params"] == ours["params"] and plan["xla_tflop_per_step"] == pytest.approx(
        ours["xla_tflop_per_step"])
    kinds = plan["memory_plan_gib"]
    assert kinds["temporaries"] > 0 and kinds["donated"] > 0  # the state is donated
    assert plan["compiled_memory_gib"] == pytest.approx(
        kinds["arguments"] + kinds["outputs"] + kinds["temporaries"] - kinds["donated"])
    assert "| vit_tiny_patch16 + UPerNet (32 ch) | 1 x cpu |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--compile_only", "--frameworks", "jax,torch"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--config", "configs/no_such.py"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--frameworks", "jax,tf"])
    with pytest.raises(SystemExit, match="model.channels == the backbone width"):
        bench.check_torch_row(tiny_segmentation_config())  # 16 channels on a width-32 ViT


def test_products_benchmark_counts_the_step_flops_and_times_both_frameworks(capsys):
    """benchmarks/bench_products.py on ViT-Tiny at 32 px, batch 2: its list of products adds up
    to bench_train_step's analytic count (3 x the forward matmul FLOPs, less the patch
    embedding's input gradient, which no step computes), and each is timed in both
    frameworks."""
    spec = importlib.util.spec_from_file_location(
        "bench_products", os.path.join(REPO, "benchmarks", "bench_products.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--image_size", "32", "--batch_size", "2", "--calls", "1"])
    products, dims = report["products"], report["settings"]["model_dims"]
    counted = sum(p["count"] * 2 * p["batch"] * math.prod(p["mnk"]) for p in products)
    step = load_bench()
    visible = step.num_visible((32 // 16) ** 2, 0.75)
    forward = 2 * step.forward_matmul_flops(dims, 32, visible)
    patch_embed = 2 * 2 * (32 // 16) ** 2 * 3 * 16 * 16 * dims["embed_dim"]
    assert counted == 3 * forward - patch_embed
    for p in products:
        for framework in ("jax", "torch"):
            assert p[f"{framework} ms"] > 0 and math.isfinite(p[f"{framework} GFLOP/s"])
        # torch's weight gradient has the transposed shape of ours; the same FLOPs.
        assert math.prod(p.get("torch mnk", p["mnk"])) == math.prod(p["mnk"])
    assert set(report["step_ms"]) == {"jax", "torch"}
    assert "| decoder fc1 weight grad | 8 |" in capsys.readouterr().out


def test_trace_summary_sums_xla_ops_and_lists_those_that_ran_on_after_their_event(tmp_path):
    """benchmarks/trace_summary.py on traces written in jax.profiler's Perfetto format (gzipped
    JSON, thread names as metadata events): ops of XLA's threads only (not Python frames, not
    thread-pool bookkeeping), summed by name and by kind from their own events. XLA:CPU marks
    each op's completion with an `end: NAME` event; an Eigen `dot` handed to the thread pool
    completes long after its (launch) event (measured in benchmarks/README): such ops are
    listed apart with their start-to-end time, and the note says why."""
    spec = importlib.util.spec_from_file_location(
        "trace_summary", os.path.join(REPO, "benchmarks", "trace_summary.py"))
    summary_lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary_lib)

    def write_trace(folder, ops):
        """ops: (name, start us, own us, end us or None)."""
        events = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": 7,
                   "args": {"name": "tf_XLAEigen/123"}},
                  {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8,
                   "args": {"name": "python"}},
                  {"ph": "X", "name": "ThunkExecutor::Execute", "pid": 1, "tid": 7, "ts": 0,
                   "dur": 9000},
                  {"ph": "X", "name": "$api.py:2479 block_until_ready", "pid": 1, "tid": 7,
                   "ts": 0, "dur": 9000},
                  {"ph": "X", "name": "PjitFunction(step)", "pid": 1, "tid": 8, "ts": 0,
                   "dur": 500},
                  # a completion whose op started before the trace: ignored
                  {"ph": "X", "name": "end: dot_general.2", "pid": 1, "tid": 7, "ts": 5,
                   "dur": 1}]
        for name, start, own, end in ops:
            events.append({"ph": "X", "name": name, "pid": 1, "tid": 7, "ts": start, "dur": own})
            if end is not None:
                events.append({"ph": "X", "name": f"end: {name}", "pid": 1, "tid": 7,
                               "ts": end, "dur": 2})
        path = tmp_path / folder / "plugins" / "profile" / "run"
        path.mkdir(parents=True)
        with gzip.open(path / "perfetto_trace.json.gz", "wt") as handle:
            json.dump({"traceEvents": events}, handle)
        return summary_lib.summarize(str(tmp_path / folder), steps=2)

    cpu = write_trace("cpu", [("ynn_fusion.3", 100, 3000, 3101), ("ynn_fusion.3", 5000, 1000, None),
                              ("ynn_fusion.7", 7000, 2000, 9000),
                              ("dot_general.2", 3200, 100, 9500),  # runs on beside the others
                              ("dot_general.2", 10000, 100, 30000),
                              ("multiply_add_fusion", 31000, 800, 31800)])
    assert cpu["where"] == "host" and cpu["total_ms"] == pytest.approx(7.0)
    assert [(r["op"], r["calls"], r["total_ms"]) for r in cpu["rows"]] == [
        ("ynn_fusion.3", 2, 4.0), ("ynn_fusion.7", 1, 2.0), ("multiply_add_fusion", 1, 0.8),
        ("dot_general.2", 2, 0.2)]
    assert cpu["rows"][0]["ms_per_step"] == 2.0
    assert [(k["op"], k["calls"], k["total_ms"]) for k in cpu["kinds"]][:2] == [
        ("ynn_fusion", 3, 6.0), ("multiply_add_fusion", 1, 0.8)]
    assert cpu["async"] == [{"op": "dot_general.2", "calls": 2, "event_ms": pytest.approx(0.2),
                             "start_to_end_ms": pytest.approx(6.3 + 20.0)}]
    assert cpu["note"] == summary_lib.ASYNC_NOTE
    printed = summary_lib.format_summary(cpu, 2)
    assert "| `dot_general.2` | 2 | 0.20 | 26.30 |" in printed and summary_lib.ASYNC_NOTE in printed
    # Every op completes with its event: no third table, no note.
    done = write_trace("in_step", [("ynn_fusion.3", 100, 3000, 3101), ("dot_general.4", 4000, 50,
                                                                       4300)])
    assert done["async"] == [] and done["note"] is None
    assert "ran on after its event" not in summary_lib.format_summary(done, 2)


def test_trace_benchmark_times_both_rngs_on_the_same_model():
    """benchmarks/bench_trace.py: one row per model, both kinds of Rngs timed, the parameter
    count the model's own."""
    spec = importlib.util.spec_from_file_location(
        "bench_trace", os.path.join(REPO, "benchmarks", "bench_trace.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.main(["--models", "mae:vit_micro_patch4", "--repeats", "1"])
    row = [line for line in table.splitlines() if line.startswith("| mae:vit_micro_patch4")]
    assert len(row) == 1
    cells = [cell.strip() for cell in row[0].strip("|").split("|")]
    size = sum(x.size for x in jax.tree.leaves(nnx.state(
        nnx.eval_shape(lambda: mae_jax.create_mae("vit_micro_patch4")), nnx.Param)))
    assert float(cells[1]) == pytest.approx(size / 1e6, abs=0.051)
    old, new = float(cells[2]), float(cells[3])
    assert old > 0 and new > 0
    assert re.fullmatch(r"\d+\.\dx", cells[4])  # nnx.Rngs's time over make_rngs's
    with pytest.raises(SystemExit, match="Unknown model"):
        bench.main(["--models", "resnet:50"])
