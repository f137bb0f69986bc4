"""benchmarks/suite.py: every preset entry is a command its script accepts, a failed entry is
reported and the suite goes on, targets are judged as the project states them, and (slow) the
smoke preset runs every script and renders one table from their real reports."""

import importlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCHMARKS)
suite = importlib.import_module("suite")
suite_table = importlib.import_module("suite_table")


@pytest.mark.parametrize("preset", sorted(suite.PRESETS))
def test_every_entry_is_a_command_its_script_accepts(preset):
    entries = suite.PRESETS[preset]
    assert len({e["name"] for e in entries}) == len(entries)
    for entry in entries:
        script = importlib.import_module(entry["script"][:-3])
        args = script.parse_args([*entry["args"], "--out_json", "report.json"])
        assert args.out_json == "report.json"
        assert entry["kind"] in suite_table.ROWS
        assert "{" not in " ".join(suite.command(entry, "/runs/x"))  # placeholders filled
        if preset == "gpu" and entry["script"] in ("bench_input.py", "bench_seg_input.py"):
            assert args.device_part  # the GPU machine has no TensorFlow: device parts only


def test_a_failed_entry_is_reported_and_later_ones_skipped_past_the_deadline(tmp_path,
                                                                            monkeypatch, capsys):
    bad = suite._entry("bad_input", "input", "bench_input.py", ["--images", "1"], 60)
    late = suite._entry("late", "input", "bench_input.py", ["--images", "1"], 60)
    monkeypatch.setitem(suite.PRESETS, "smoke", [bad, late])
    (tmp_path / "late.json").write_text("{}")  # an earlier run's report in a reused folder
    seen_while_running = []
    run_entry = suite.run_entry

    def watched(entry, out_dir):  # what a suite stopped during this entry would leave
        seen_while_running.append(json.loads((tmp_path / "suite.json").read_text()))
        return run_entry(entry, out_dir)

    monkeypatch.setattr(suite, "run_entry", watched)
    text = suite.main(["--preset", "smoke", "--out_dir", str(tmp_path),
                       "--stop_starting_after", "0.01", "--table_copy",
                       str(tmp_path / "copy.md")])
    assert [r["returncode"] for r in seen_while_running[0]["entries"]] == [
        "did not finish: the suite stopped"]
    assert not (tmp_path / "late.json").exists()
    assert (tmp_path / "copy.md").read_text() == text  # written after every entry
    info = json.loads((tmp_path / "suite.json").read_text())
    assert [r["returncode"] for r in info["entries"]] == [2, "skipped: out of time"]
    assert "--images 1: the pipelines batch 64 images" in (tmp_path / "bad_input.txt").read_text()
    assert "| bad_input | did not run to the end: 2 |" in text
    assert "| late | did not run to the end: skipped: out of time |" in text
    assert (tmp_path / "suite.md").read_text() == text
    assert suite.main(["--render", str(tmp_path)]) == text
    with pytest.raises(SystemExit):
        suite.parse_args(["--only", "no_such_entry"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--render", str(tmp_path / "missing")])
    capsys.readouterr()
    suite.main(["--preset", "smoke", "--list", "--only", "late"])  # QA: --only was ignored
    assert capsys.readouterr().out == "late: bench_input.py --images 1\n"
    # Before any entry runs (QA: every entry skipped, or tracebacks at the first save).
    for argv in (["--stop_starting_after", "-1"], ["--out_dir", str(tmp_path / "suite.md")],
                 ["--table_copy", str(tmp_path / "none" / "suite.md")]):
        with pytest.raises(SystemExit):
            suite.parse_args(argv)


def test_a_timed_out_entry_stops_the_processes_it_started(tmp_path):
    """QA: subprocess.run's timeout killed the entry alone; a child it had started (as
    bench_train_step starts one per framework) ran on under the next entries."""
    script = tmp_path / "spawns.py"
    script.write_text("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; "
                      "time.sleep(60)'])\n"
                      f"open({str(tmp_path / 'child')!r}, 'w').write(str(child.pid))\n"
                      "time.sleep(60)\n")
    entry = suite._entry("spawns", "input", str(script), [], 8)
    record = suite.run_entry(entry, str(tmp_path))
    assert record["returncode"] == "timed out after 8 s"
    assert _gone(int((tmp_path / "child").read_text()))
    # The suite stopped by SIGTERM (gpu_check.sh's `timeout 420`) stops the entry too (review:
    # in a session of its own, the signal no longer reached it).
    (tmp_path / "child").unlink()
    runner = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, "
                               f"{BENCHMARKS!r}); import suite; suite.stop_on_sigterm(); "
                               f"suite.run_entry(suite._entry('spawns', 'input', {str(script)!r}, "
                               f"[], 60), {str(tmp_path)!r})"])
    deadline = time.time() + 30
    while not (tmp_path / "child").exists() and time.time() < deadline:
        time.sleep(0.1)
    runner.terminate()
    assert runner.wait(timeout=30) == 128 + 15
    pid = int((tmp_path / "child").read_text())
    assert _gone(pid)


def _gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie is gone
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _train_report(device, ours_ms, torch_ms, mfu=None, model="vit_base_patch16",
                  dtype="float32"):
    row = {"device": device, "ms_per_step_median": ours_ms, "compile_s": 1.0, "images_per_s": 1.0,
           "compiles_first_call": 1, "compiles_after_first_call": 0, "mfu": mfu}
    return {"settings": {"model": model, "image_size": 224, "batch_size": 8, "dtype": dtype},
            "results": [{"framework": "jax", **row},
                        {"framework": "torch", **row, "ms_per_step_median": torch_ms}]}


def test_targets_are_judged_where_they_apply():
    # CPU: ours / official <= 0.8; the MFU target needs the GPU.
    rows = suite_table.train_rows(_train_report("1 x cpu", 79.0, 100.0))
    assert [(r[0], r[4], r[6]) for r in rows] == [
        ("MAE train step", "0.79x", "met"), ("MAE train step MFU", "-", "GPU only")]
    rows = suite_table.train_rows(_train_report("1 x cpu", 81.0, 100.0))
    assert rows[0][6] == "**not met**"
    # H200: MFU >= 40% for ViT-B, >= 35% for ViT-Tiny; no time-ratio target there.
    rows = suite_table.train_rows(_train_report("1 x NVIDIA H200", 81.0, 100.0, mfu=0.39,
                                                dtype="bfloat16"))
    assert [r[6] for r in rows] == ["-", "**not met**"]
    rows = suite_table.train_rows(_train_report("1 x NVIDIA H200", 81.0, 100.0, mfu=0.36,
                                                model="vit_tiny_patch16", dtype="bfloat16"))
    assert rows[1][2:7] == ("36.0%", "-", "-", ">= 35% (bf16; set for an H200)", "met")
    # On an H100 the same target, of the H100's own peak (QA: the label named the H200 alone).
    rows = suite_table.train_rows(_train_report("1 x NVIDIA H100 80GB HBM3", 81.0, 100.0,
                                                mfu=0.36, model="vit_tiny_patch16",
                                                dtype="bfloat16"))
    assert rows[1][5:7] == (">= 35% (bf16; set for an H200)", "met")
    # The MFU targets are bfloat16's: a float32 step on the GPU is reported, not judged.
    rows = suite_table.train_rows(_train_report("1 x NVIDIA H200", 81.0, 100.0, mfu=0.2))
    assert rows[1][2] == "20.0%" and rows[1][6] == "- (not bf16)"
    # The UPerNet step's memory on the GPU: the allocator's peak, with XLA's plan beside it
    # (the peak also holds what the compiler's autotuning allocated).
    def seg(peak_gib, plan_gib):
        row = {"framework": "jax", "device": "1 x NVIDIA H200", "model": "vit_base_patch16",
               "image_size": 512, "batch": 2, "dtype": "bfloat16", "compile_s": 30.0,
               "xla_tflop_per_step": 1.0, "ms_per_step_median": 100.0, "mfu": 0.3,
               "peak_memory_gib": peak_gib, "compiled_memory_gib": plan_gib}
        return suite_table.seg_train_rows({"results": [row]})[1][6]

    assert seg(8.0, 7.0) == "met"
    assert seg(12.0, 7.0) == "**not met** by the peak; XLA's plan meets it"
    assert seg(12.0, 11.0) == "**not met**"


def test_a_failed_entry_keeps_the_rows_its_report_holds(tmp_path):
    """A GPU run is one shot: when our step fails (bench_train_step exits 1 and its report
    lists the error), PyTorch's row still reaches the table; an unknown FLOP count (None)
    does not make a segmentation report unreadable."""
    report = _train_report("1 x NVIDIA H200", 81.0, 100.0, dtype="bfloat16")
    report["results"] = report["results"][1:]
    report["errors"] = {"jax": "XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory"}
    seg = {"framework": "jax", "device": "1 x NVIDIA H200", "model": "vit_base_patch16 + "
           "UPerNet (768 ch)", "image_size": 512, "batch": 2, "dtype": "bfloat16",
           "ms_per_step_median": 500.0, "compile_s": 9.0, "xla_tflop_per_step": None,
           "peak_memory_gib": 8.0, "compiled_memory_gib": 7.5, "mfu": None}
    (tmp_path / "train.json").write_text(json.dumps(report))
    (tmp_path / "seg.json").write_text(json.dumps({"results": [seg]}))
    # QA: a several-line error with a pipe split the row; a report whose every row failed
    # gave a "report not understood (StopIteration)" row.
    (tmp_path / "seg_b16.json").write_text(json.dumps({"results": [], "errors": {
        "jax": "RESOURCE_EXHAUSTED: Out of memory\nBufferAssignment | stats:\n  2 GiB"}}))
    (tmp_path / "seg_torch.json").write_text(json.dumps({"results": [  # PyTorch's row stands
        seg | {"framework": "torch (transformers BEiT, eager)", "ms_per_step_median": 600.0}]}))
    info = {"preset": "gpu", "started_utc": "now", "load_before": [0.0], "machine": {
        "cpu": "x", "cores": 16, "gpu": "NVIDIA H200", "python": "3.12", "commit": "abc1234",
        "versions": {"jax": "0.11.2", "torch": "2.11.0"}}, "entries": [
            {"name": "train", "kind": "train", "command": "c", "returncode": 1},
            {"name": "seg", "kind": "seg_train", "command": "c", "returncode": 0},
            {"name": "seg_b16", "kind": "seg_train", "command": "c", "returncode": 1},
            {"name": "seg_torch", "kind": "seg_train", "command": "c", "returncode": 1}]}
    (tmp_path / "suite.json").write_text(json.dumps(info))
    text = suite.render(str(tmp_path))
    assert ("| seg_b16 | did not run to the end: 1 (jax: RESOURCE_EXHAUSTED: Out of memory "
            "BufferAssignment \\| stats: 2 GiB) | `c` |") in text
    assert "not understood" not in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert ("| seg_torch | segmentation train step | vit_base_patch16 + UPerNet (768 ch), 512 px, "
            "batch 2, bfloat16 | - (failed) | 600.0 ms (transformers BEiT) |") in text
    assert len(table) == 9 and all(len(re.findall(r"(?<!\\)\|", line)) == 10 for line in table)
    assert ("| train | did not run to the end: 1 (jax: XlaRuntimeError: RESOURCE_EXHAUSTED: out "
            "of memory) |") in text
    assert "| train | MAE train step | vit_base_patch16 224 px, batch 8, bfloat16 | - (failed) " \
           "| 100.0 ms (official) |" in text
    assert "XLA - TFLOP/step" in text
    assert "| 8.59 GB | - | - | <= 10 GB (2 images, 512 px) | met | peak bytes in use; " \
           "XLA's plan 8.05 GB |" in text
    assert "Did not finish: train, seg_b16, seg_torch." in text
    assert "; GPU NVIDIA H200), Python 3.12, jax 0.11.2, torch 2.11.0, at commit abc1234. " in text


def test_machine_names_the_commit_and_the_frameworks_versions():
    from importlib import metadata

    found = suite.machine()
    assert found["versions"]["jax"] == metadata.version("jax")
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (.ci/run's is one)
        assert found["commit"].split(" + ")[0] == head.stdout.strip()
    else:
        assert found["commit"] is None


@pytest.mark.slow
def test_smoke_preset_runs_every_benchmark_into_one_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "suite.py"), "--preset",
                           "smoke", "--out_dir", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.loads((tmp_path / "suite.json").read_text())
    assert [r["returncode"] for r in info["entries"]] == [0] * len(suite.PRESETS["smoke"])
    table = (tmp_path / "suite.md").read_text()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")][1:]
    measured = {(row[0][2:], row[1]) for row in rows}
    for entry, measurement in [
            ("train_tiny", "MAE train step"), ("train_tiny", "encoder on all tokens / visible "
                                                             "only"),
            ("input", "JPEG input, images/s"), ("input", "JPEG input, device part"),
            ("seg_input", "ADE20K input, images/s"), ("seg_input", "ADE20K input, device part"),
            ("input_device", "JPEG input, device part"),
            ("seg_input_device", "ADE20K input, device part"),
            ("finetune_input_device", "fine-tuning input, device part"),
            ("on_device", "step fed by the on-device input"),
            ("on_device_finetune", "fine-tuning step fed by the on-device input (crop, flip, "
                                   "RandAugment)"),
            ("seg_train", "segmentation train step"),
            ("seg_eval", "segmentation evaluation, XLA compilations")]:
        assert (entry, measurement) in measured, (entry, measurement, table)
    for row in rows:  # every measurement has a number; no target is judged at smoke sizes
        assert row[3] != "-" or "MFU" in row[1] or "memory" in row[1], row
        assert row[7] in ("-", "(smoke sizes)"), row
    assert "not understood" not in table and "did not run" not in table


def test_fine_tuning_input_rows_have_no_target_of_their_own():
    report = {"settings": {"policy": "rand-m9-mstd0.5-inc1"}, "summary": {"2 cores": {
        "ours_img_s": 480.0, "official_img_s": 473.0, "ratio": 480 / 473,
        "ours_device_img_s": 1300.0, "ratio_device": 1300 / 473,
        "rounds": {"ours": [480.0, 470.0], "ours_device": [1300.0, 1290.0],
                   "official": [473.0, 460.0]}}},
        "device_part": {"ms_per_image": 0.05, "resize_ms_per_image": 0.02,
                        "device": "NVIDIA H200"}}
    host, device, part = suite_table.finetune_input_rows(report)
    assert host[1:7] == ("2 cores, ours all on host, rand-m9-mstd0.5-inc1", "480.0",
                         "473.0 (official, timm)", "1.01x", "-", "-")
    assert host[7] == "rounds 480 / 473, 470 / 460"
    assert device[1:5] == ("2 cores, ours RandAugment on the device (host part)", "1300.0",
                           "473.0 (official, timm)", "2.75x")
    assert device[7] == "rounds 1300 / 473, 1290 / 460"
    assert part[0] == "fine-tuning input, device part" and "NVIDIA H200" in part[1]
    assert part[2:4] == ("0.050 ms / image", "0.020 ms (without RandAugment)")
    assert part[7] == "20000 images/s"
    # --device_part alone (the GPU preset): its one row
    (only,) = suite_table.finetune_input_rows({"device_part": report["device_part"]})
    assert only == part
