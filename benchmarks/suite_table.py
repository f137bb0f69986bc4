"""The suite's markdown table: one row per measurement, next to its reference and target.

`markdown(info, reports)`: info is a suite run's suite.json (machine, date, each entry's command,
exit status, seconds and load averages); reports maps an entry's name to the JSON report its
script wrote. Targets are the project's (issue 11); "GPU only" marks a target that needs the
device it names.
"""

from __future__ import annotations

MAE_MFU_TARGET = {"vit_tiny_patch16": 0.35, "vit_base_patch16": 0.40}
INPUT_TARGET = 2.0  # images/s per core over the official transform's
ON_DEVICE_TARGET = 5.0  # % step-time overhead over a synthetic on-device batch
SEG_MEMORY_TARGET_GB = 10.0  # UPerNet ViT-B training, 2 images
SEG_EVAL_TARGET = 50.0  # images/s, ViT-B UPerNet, ADE20K's protocol, one GPU
EVAL_COMPILE_BOUND = 8  # XLA compilations in a first pass over many sizes
MAE_CPU_TARGET = 0.8  # ours / official, train step on a CPU

HEADER = ("entry", "measurement", "setting", "ours", "reference", "ours / ref.", "target",
          "status", "notes")


def _status(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def _on_gpu(device: str) -> bool:
    """Whether a report's device name (e.g. "1 x cpu", "1 x NVIDIA H200") is not a CPU."""
    return "cpu" not in device.lower()


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _row(measurement, setting, ours, reference="-", ratio="-", target="-", status="-",
         notes="") -> tuple:
    return (measurement, setting, ours, reference, ratio, target, status, notes)


def train_rows(report: dict) -> list[tuple]:
    s, rows = report["settings"], {r["framework"]: r for r in report["results"]}
    ours, torch = rows.get("jax"), rows.get("torch")
    on_gpu = ours is not None and _on_gpu(ours["device"])
    setting = f"{s['model']} {s['image_size']} px, batch {s['batch_size']}, {s['dtype']}"
    out = []
    if ours is not None:
        ratio = ours["ms_per_step_median"] / torch["ms_per_step_median"] if torch else None
        notes = (f"compile {ours['compile_s']:.1f} s; {ours['compiles_first_call']} compile, "
                 f"{ours['compiles_after_first_call']} after; {ours['device']}")
        if ours.get("peak_memory_gib") is not None:
            notes += f"; peak {ours['peak_memory_gib']:.2f} GiB"
        out.append(_row("MAE train step", setting, _ms(ours["ms_per_step_median"]),
                        _ms(torch and torch["ms_per_step_median"]) + (
                            " (official, bf16 autocast)" if "autocast" in torch.get("dtype", "")
                            else " (official)") if torch else "-", _ratio(ratio),
                        f"<= {MAE_CPU_TARGET}x (CPU)" if not on_gpu else "-",
                        _status(None if on_gpu or ratio is None else ratio <= MAE_CPU_TARGET),
                        notes))
        target = MAE_MFU_TARGET.get(s["model"])
        if target is not None:  # a bfloat16 target: a float32 row on a GPU is not judged
            mfu, bf16 = ours.get("mfu"), s["dtype"] == "bfloat16"
            out.append(_row("MAE train step MFU", setting,
                            "-" if mfu is None else f"{mfu:.1%}", "-", "-",
                            f">= {target:.0%} (bf16; set for an H200)",
                            _status(mfu >= target) if mfu is not None and on_gpu and bf16
                            else "- (not bf16)" if on_gpu else "GPU only",
                            f"{ours['images_per_s']:.0f} images/s"))
    elif torch is not None:  # our row failed (the report's "errors"): the official one stands
        out.append(_row("MAE train step", setting, "- (failed)",
                        _ms(torch["ms_per_step_median"]) + " (official)"))
    ablation = report.get("masking_ablation")
    if ablation:
        out.append(_row("encoder on all tokens / visible only", setting,
                        f"{ablation['time_ratio']:.2f}x time", f"{ablation['flop_ratio']:.2f}x "
                        "forward FLOPs", notes="the paper's masking speed-up"))
    return out


def input_rows(report: dict, kind: str) -> list[tuple]:
    if kind == "input":
        name, paths = "JPEG input, images/s", {
            "ours_host_resize": "resize on the host", "ours_device_resize":
            "resize on the device (host part)"}
        device_what = "resize + flip of a 512 px canvas"
    else:
        name, paths = "ADE20K input, images/s", {
            "ours": "photometric on the device (host part)", "ours_all_on_host": "all on host"}
        device_what = "photometric distortion + normalisation, 512 px crop"
    out = []
    for cores, columns in report.get("summary", {}).items():
        official = columns["official"]
        for key, label in paths.items():
            c = columns[key]
            out.append(_row(name, f"{cores}, ours {label}", f"{c['img_s']:.1f}",
                            f"{official['img_s']:.1f} (official)", _ratio(c["ratio"]),
                            f">= {INPUT_TARGET:g}x", _status(c["ratio"] >= INPUT_TARGET),
                            f"per CPU-second {c['ratio_cpu']:.2f}x"))
    part = report.get("device_part")
    if part:
        out.append(_row(name.split(",")[0] + ", device part", f"{device_what}, on "
                        f"{part['device']}", f"{part['ms_per_image']:.3f} ms / image",
                        notes=f"{1e3 / part['ms_per_image']:.0f} images/s"))
    return out


def finetune_input_rows(report: dict) -> list[tuple]:
    """Fine-tuning's input against timm's transform: all on the host, and RandAugment on the
    device (its host part; the device part timed apart). No target of its own: the
    pretraining input's 2x is for the plain crop + flip."""
    policy, out = report.get("settings", {}).get("policy", "RandAugment"), []
    for cores, c in report.get("summary", {}).items():
        reference = f"{c['official_img_s']:.1f} (official, timm)"
        rounds = c["rounds"]
        out.append(_row("fine-tuning input, images/s", f"{cores}, ours all on host, {policy}",
                        f"{c['ours_img_s']:.1f}", reference, _ratio(c["ratio"]),
                        notes="rounds " + ", ".join(f"{o:.0f} / {f:.0f}" for o, f in zip(
                            rounds["ours"], rounds["official"], strict=True))))
        if "ours_device_img_s" in c:
            out.append(_row("fine-tuning input, images/s", f"{cores}, ours RandAugment on the "
                            "device (host part)", f"{c['ours_device_img_s']:.1f}", reference,
                            _ratio(c["ratio_device"]), notes="rounds " + ", ".join(
                                f"{o:.0f} / {f:.0f}" for o, f in zip(
                                    rounds["ours_device"], rounds["official"], strict=True))))
    part = report.get("device_part")
    if part:
        out.append(_row("fine-tuning input, device part", "resize + flip + RandAugment of a "
                        f"{part.get('canvas', 512)} px canvas, on {part['device']}",
                        f"{part['ms_per_image']:.3f} ms / image",
                        f"{part['resize_ms_per_image']:.3f} ms (without RandAugment)",
                        notes=f"{1e3 / part['ms_per_image']:.0f} images/s"))
    return out


def on_device_rows(report: dict) -> list[tuple]:
    rows = {r["input"]: r for r in report["rows"]}
    s, ours = report["settings"], rows["on-device augmentation"]
    base, alone = rows["synthetic batch on device"], rows.get("augmentation alone")
    setting = (f"{s['model']} {s['image_size']} px, batch {s['batch_size']}, {s['dtype']}, "
               f"{s['num_images']} images of {s['source_size']} px")
    name = "step fed by the on-device input"
    if s.get("task") == "finetune":
        name = "fine-tuning " + name + " (crop, flip, RandAugment)"
    return [_row(name, setting,
                 _ms(ours["ms_per_step_median"]), _ms(base["ms_per_step_median"])
                 + " (synthetic batch)", f"{ours['paired_percent']:+.1f}% (paired)",
                 f"<= +{ON_DEVICE_TARGET:g}%",
                 _status(ours["paired_percent"] <= ON_DEVICE_TARGET),
                 f"medians {ours['median_percent']:+.1f}%" + (
                     f"; augmentation alone {alone['paired_percent']:.1f}% of a step"
                     if alone else "") + (
                     f"; host part {report['host_images_per_s']:,.0f} images/s (one thread)"
                     if "host_images_per_s" in report else ""))]


def seg_train_rows(report: dict) -> list[tuple]:
    rows = report["results"]
    ours = next((r for r in rows if r["framework"].startswith("jax")), None)
    torch = next((r for r in rows if r["framework"].startswith("torch")), None)
    if ours is None:  # the entry's own row says how it failed (QA: a StopIteration row)
        return [_row("segmentation train step", f"{torch['model']}, {torch['image_size']} px, "
                     f"batch {torch['batch']}, {torch['dtype']}", "- (failed)",
                     _ms(torch["ms_per_step_median"]) + " (transformers BEiT)")] if torch else []
    on_gpu = _on_gpu(ours["device"])
    setting = (f"{ours['model']}, {ours['image_size']} px, batch {ours['batch']}, "
               f"{ours['dtype']}")
    flops = ours.get("xla_tflop_per_step")
    notes = (f"compile {ours['compile_s']:.1f} s; XLA "
             + ("-" if flops is None else f"{flops:.3g}") + f" TFLOP/step; {ours['device']}")
    ratio = ours["ms_per_step_median"] / torch["ms_per_step_median"] if torch else None
    out = [_row("segmentation train step", setting, _ms(ours["ms_per_step_median"]),
                _ms(torch["ms_per_step_median"]) + " (transformers BEiT)" if torch else "-",
                _ratio(ratio), notes=notes + (f"; MFU {ours['mfu']:.1%}" if ours.get("mfu")
                                              is not None else ""))]
    if ours["batch"] == 2 or not on_gpu:
        peak = ours.get("peak_memory_gib")
        status = "GPU only"
        if peak is not None and on_gpu and ours["image_size"] == 512:
            status = _status(peak * 2**30 / 1e9 <= SEG_MEMORY_TARGET_GB)
            plan = ours.get("compiled_memory_gib")
            if status != "met" and plan is not None and plan * 2**30 / 1e9 <= (
                    SEG_MEMORY_TARGET_GB):  # the allocator's peak also holds compile scratch
                status += " by the peak; XLA's plan meets it"
        out.append(_row("segmentation train step, device memory", setting,
                        "-" if peak is None else f"{peak * 2**30 / 1e9:.2f} GB",
                        target=f"<= {SEG_MEMORY_TARGET_GB:g} GB (2 images, 512 px)",
                        status=status, notes="peak bytes in use" + (
                            f"; XLA's plan {ours['compiled_memory_gib'] * 2**30 / 1e9:.2f} GB"
                            if ours.get("compiled_memory_gib") is not None else "")))
    return out


def seg_eval_rows(report: dict) -> list[tuple]:
    s, rows = report["settings"], {r["path"]: r for r in report["results"]}
    after, before = rows.get("after"), rows.get("before")
    on_gpu = all(_on_gpu(d) for d in report["machine"]["devices"])
    setting = (f"{s['num_images']} images of distinct sizes, {s['variant']} "
               f"{s['embed_dim']}/{s['depth']}, window {s['window']}, {s['dtype']}")
    out = []
    if after:
        ok = (after["compiles_first_pass"] <= EVAL_COMPILE_BOUND
              and after["compiles_steady"] == 0)
        out.append(_row("segmentation evaluation, XLA compilations", setting,
                        f"{after['compiles_first_pass']} (+{after['compiles_steady']} later)",
                        f"{before['compiles_first_pass']} (per image size)" if before else "-",
                        target=f"<= {EVAL_COMPILE_BOUND}, none later", status=_status(ok)))
        vit_b = s["embed_dim"] == 768 and s["window"] == 512
        out.append(_row("segmentation evaluation, images/s", setting,
                        f"{after['images_per_s']:.1f}",
                        f"{before['images_per_s']:.1f} (per image)" if before else "-",
                        _ratio(after["images_per_s"] / before["images_per_s"]) if before
                        else "-", f">= {SEG_EVAL_TARGET:g} (ViT-B, GPU)",
                        _status(after["images_per_s"] >= SEG_EVAL_TARGET)
                        if on_gpu and vit_b else "GPU only", "steady state"))
    return out


ROWS = {"train": train_rows, "input": lambda r: input_rows(r, "input"),
        "seg_input": lambda r: input_rows(r, "seg_input"), "on_device": on_device_rows,
        "finetune_input": finetune_input_rows,
        "seg_train": seg_train_rows, "seg_eval": seg_eval_rows}


def _cell(text) -> str:
    """One table cell: an error's newlines and pipes would split the row (QA: XLA's
    out-of-memory message is several lines)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(info: dict, reports: dict[str, dict]) -> str:
    m = info["machine"]
    judged = info["preset"] != "smoke"  # tiny sizes: no target applies
    malloc = {True: ", glibc malloc huge pages on (mae_jax.core.hostmem)",
              False: ", glibc malloc huge pages off"}.get(m.get("malloc_hugepages"), "")
    versions = "".join(f", {name} {version}" for name, version in m.get("versions", {}).items())
    commit = f", at commit {m['commit']}" if m.get("commit") else ""
    lines = [f"Benchmark suite, preset `{info['preset']}`, started {info['started_utc']} UTC "
             f"on {m['cpu']} ({m['cores']} cores"
             + (f"; GPU {m['gpu']}" if m.get("gpu") else "; no GPU") + f"), Python "
             f"{m['python']}{versions}{malloc}{commit}. Load average (1 min) "
             f"{info['load_before'][0]:.2f} before, "
             + (f"{info['load_after'][0]:.2f} after; {info['seconds'] / 60:.1f} min in all."
                if "load_after" in info else "run not finished."), "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for record in info["entries"]:
        name = record["name"]
        load = (f"load {record['load_before']:.2f} -> {record['load_after']:.2f}, "
                f"{record['seconds']:.0f} s" if "seconds" in record else "")
        if record.get("returncode") != 0:
            errors = (reports.get(name) or {}).get("errors")
            failure = f"did not run to the end: {record['returncode']}" + (
                f" ({'; '.join(f'{k}: {v[:200]}' for k, v in errors.items())})" if errors else "")
            lines.append(f"| {name} | {_cell(failure)} | `{_cell(record['command'])}` | - | - | "
                         f"- | - | - | {load} |")
            if name not in reports:  # a failed run's report keeps the rows that ran
                continue
        try:
            rows = ROWS[record["kind"]](reports[name])
        except (KeyError, TypeError, ZeroDivisionError, StopIteration) as error:
            rows = [_row(f"report not understood ({type(error).__name__}: {error})", "-", "-")]
        for i, row in enumerate(rows):
            notes = "; ".join(x for x in (row[-1], load if i == 0 else "") if x)
            if not judged and row[6] != "-":
                row = (*row[:6], "(smoke sizes)", row[7])
            lines.append("| " + " | ".join(_cell(x) for x in (name, *row[:-1], notes)) + " |")
    failed = [r["name"] for r in info["entries"] if r.get("returncode") != 0]
    lines += ["", "Each entry's command, log and JSON report are in the run's folder (suite.json"
              ", <entry>.txt, <entry>.json)." + (f" Did not finish: {', '.join(failed)}."
                                                if failed else "")]
    return "\n".join(lines) + "\n"

