"""ADE20K builder (from a fake ADEChallengeData2016), segmentation iterators, synthetic scenes."""

import io
import re
import zipfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import tiny_segmentation_config
from PIL import Image

from mae_jax.data import ade20k, seg_eval_input, seg_input, synthetic_scenes
from mae_jax.data.ade20k_meta import ADE20K_CLASSES, ADE20K_PALETTE, colorize
from mae_jax.data.constants import IMAGENET_MEAN_UINT8
from mae_jax.segmentation import lib as segment_lib

SIZES = {"training": [(24, 40), (40, 24), (30, 30), (36, 52)], "validation": [(28, 44), (20, 36)]}
PREFIX = {"training": "ADE_train", "validation": "ADE_val"}


def _fake_pairs(folder):
    """(stem, JPEG bytes, PNG bytes, raw label) in the release's format (labels 0..150)."""
    rng = np.random.default_rng(len(folder))
    for i, (height, width) in enumerate(SIZES[folder]):
        label = np.kron(rng.integers(0, 151, size=(height // 4, width // 4)), np.ones((4, 4)))
        label = label.astype(np.uint8)
        image = np.stack([label, 255 - label, np.full_like(label, 128)], axis=-1)
        jpeg, png = io.BytesIO(), io.BytesIO()
        Image.fromarray(image).save(jpeg, format="JPEG")
        Image.fromarray(label, mode="L").save(png, format="PNG")
        yield f"{PREFIX[folder]}_{i + 1:08d}", jpeg.getvalue(), png.getvalue(), label


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A manual dir holding the extracted folder and another holding only the zip."""
    root = tmp_path_factory.mktemp("ade")
    folder_dir, zip_dir = root / "manual_folder", root / "manual_zip"
    zip_dir.mkdir()
    labels = {}
    with zipfile.ZipFile(zip_dir / "ADEChallengeData2016.zip", "w") as archive:
        for folder in SIZES:
            for stem, jpeg, png, label in _fake_pairs(folder):
                labels[stem] = label
                for kind, suffix, data in (("images", "jpg", jpeg), ("annotations", "png", png)):
                    member = f"ADEChallengeData2016/{kind}/{folder}/{stem}.{suffix}"
                    path = folder_dir / member
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    archive.writestr(member, data)
        archive.writestr("ADEChallengeData2016/objectInfo150.txt", "Idx\tRatio\n")
    return {"folder": folder_dir, "zip": zip_dir, "labels": labels, "root": root}


@pytest.fixture(scope="module")
def prepared(release):
    data_dir = release["root"] / "tfds_folder"
    ade20k.prepare_ade20k(data_dir=data_dir, manual_dir=release["folder"])
    return data_dir


def _check_builder(builder, labels):
    assert builder.info.splits["train"].num_examples == 4
    assert builder.info.splits["validation"].num_examples == 2
    for example in builder.as_dataset(split="validation").as_numpy_iterator():
        name = example["file_name"].decode()
        assert example["image"].dtype == np.uint8 and example["image"].shape[-1] == 3
        # PNG is lossless: the stored label is the annotation, pixel for pixel.
        np.testing.assert_array_equal(example["label"][..., 0], labels[name])


def test_builder_prepares_from_the_extracted_folder(prepared, release):
    _check_builder(ade20k.Ade20kSemantic(data_dir=prepared), release["labels"])


def test_builder_prepares_from_the_zip(release):
    builder = ade20k.prepare_ade20k(
        data_dir=release["root"] / "tfds_zip", manual_dir=release["zip"]
    )
    _check_builder(builder, release["labels"])


def test_missing_data_raises_clear_error_without_downloading(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", no_download)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", no_download)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        ade20k.prepare_ade20k(data_dir=tmp_path / "tfds", manual_dir=tmp_path / "empty")
    message = str(error.value)
    assert "ADEChallengeData2016.zip" in message and "sceneparsing.csail.mit.edu" in message
    assert "scene_parse150" in message
    with pytest.raises(FileNotFoundError, match="not prepared"):
        seg_input.create_seg_train_iterator(
            source="ade20k",
            data_dir=tmp_path / "tfds",
            global_batch_size=2,
            crop_size=16,
            seed=0,
            process_index=0,
            process_count=1,
        )


def test_a_run_of_several_processes_does_not_prepare_datasets(release, tmp_path, monkeypatch):
    """Every process of a multi-host run preparing one dataset at once raced on TFDS's final
    rename in a shared data_dir (the first wins, the others fail while the rest wait in a
    collective). Such a run refuses, on every process alike, before any work, naming how to
    prepare it with one process; a prepared dataset is used as before."""
    from mae_jax.data import preparing, sources

    assert not preparing.several_processes()  # this process has no multi-process runtime
    monkeypatch.setattr(preparing, "several_processes", lambda: True)
    data_dir = tmp_path / "tfds"
    with pytest.raises(FileNotFoundError, match="several processes") as error:
        ade20k.load_ade20k_builder(data_dir=data_dir, manual_dir=release["zip"])
    assert "prepare_ade20k(data_dir=" in str(error.value) and not data_dir.exists()
    with pytest.raises(FileNotFoundError, match="several processes.*tfds build cifar100"):
        sources.tfds_builder("cifar100", str(tmp_path / "cifar"), download=True)
    monkeypatch.undo()
    ade20k.prepare_ade20k(data_dir=data_dir, manual_dir=release["zip"])
    monkeypatch.setattr(preparing, "several_processes", lambda: True)
    assert ade20k.load_ade20k_builder(data_dir=data_dir).is_prepared()


def test_processes_whose_ade20k_copies_differ_stop_before_any_model_work(prepared, tmp_path,
                                                                         monkeypatch):
    """Each host reads its own copy of the prepared records, and each process takes its share
    of what its copy holds: an incomplete copy on one host made the shares overlap or skip
    records, and evaluated another validation set, without a word. The processes compare the
    counts (process 1's copy lacks a training record here; the two-process comparison itself
    is pinned in test_multiprocess.py) and every process stops, naming them."""
    from jax.experimental import multihost_utils

    from mae_jax.core.errors import BadDataError

    config = tiny_segmentation_config(**{"data.source": "ade20k", "data.data_dir": str(prepared),
                                         "data.num_classes": 150, "batch_size": 2})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda count: np.array([count, count - 1]))
    with pytest.raises(BadDataError, match=r"disagree on the number of ADE20K train examples "
                                           r"\(process 0: 4, process 1: 3\)"):
        segment_lib.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not (tmp_path / "run").exists()  # before the workdir is touched


def test_ade20k_train_batches_are_reduced_padded_and_typed(prepared):
    batches = seg_input.create_seg_train_iterator(
        source="ade20k",
        data_dir=prepared,
        global_batch_size=4,
        crop_size=64,
        seed=0,
        process_index=0,
        process_count=1,
        scale=(64, 32),
        ratio_range=(0.5, 1.0),
    )
    batch = next(batches)
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4, 64, 64) and batch["label"].dtype == np.uint8
    labels = batch["label"]
    assert np.all((labels == 255) | ((labels >= 0) & (labels < 150)))
    # Images are at most 32 pixels on the short side, so the crop's far corner is padding: the
    # mean colour, which normalises to 0 as mmseg's padding of the normalised image.
    assert np.all(labels[:, -1, -1] == 255)
    assert np.all(batch["image"][:, -1, -1] == IMAGENET_MEAN_UINT8)


def test_ade20k_eval_examples_keep_the_original_label(prepared, release):
    examples = list(seg_eval_input.seg_eval_examples(source="ade20k", data_dir=prepared,
                                                     scale=(64, 32)))
    assert len(examples) == 2
    for example in examples:
        raw = release["labels"][example["name"]]
        np.testing.assert_array_equal(
            example["label"], np.where(raw == 0, 255, raw.astype(int) - 1)
        )
        assert example["label"].dtype == np.int32 and example["image"].dtype == np.uint8
        assert min(example["image"].shape[:2]) == 32 or max(example["image"].shape[:2]) == 64
    assert len(list(seg_eval_input.seg_eval_examples(source="ade20k", data_dir=prepared,
                                                     limit=1))) == 1
    # segment.py's check before training: every pair decodes (the first `limit`), nothing raised
    assert seg_eval_input.check_validation_decodes("ade20k", data_dir=prepared) == 2
    assert seg_eval_input.check_validation_decodes("ade20k", data_dir=prepared, limit=1) == 1
    assert seg_eval_input.check_validation_decodes("synthetic") == 0  # generated: nothing to decode


def test_ade20k_images_decode_with_the_accurate_dct_as_pil_and_opencv_do(prepared, release):
    from mae_jax.data import seg_transforms

    folder = release["folder"] / "ADEChallengeData2016" / "images" / "validation"
    for example in seg_eval_input.seg_eval_examples(source="ade20k", data_dir=prepared,
                                               scale=(64, 32)):
        decoded = np.asarray(Image.open(folder / f"{example['name']}.jpg").convert("RGB"))
        expected = seg_transforms.resize_image(decoded, example["image"].shape[:2]).numpy()
        np.testing.assert_array_equal(example["image"], expected)


def _synthetic_iterator(**overrides):
    options = dict(
        source="synthetic",
        global_batch_size=4,
        crop_size=32,
        seed=3,
        process_index=0,
        process_count=1,
        scale=(64, 32),
        num_classes=5,
        image_size=(32, 48),
        num_examples=6,
    )
    return seg_input.create_seg_train_iterator(**{**options, **overrides})


def test_train_iterator_is_deterministic_and_resumes_exactly():
    fresh = [next(it) for it in [_synthetic_iterator()] for _ in range(5)]
    again = _synthetic_iterator()
    for batch in fresh:
        np.testing.assert_array_equal(next(again)["image"], batch["image"])
    # 6 examples, 4 a batch: step 3 starts mid-way through the third epoch.
    resumed = _synthetic_iterator(start_step=3)
    for batch in fresh[3:]:
        step = next(resumed)
        np.testing.assert_array_equal(step["image"], batch["image"])
        np.testing.assert_array_equal(step["label"], batch["label"])
    other_seed = next(_synthetic_iterator(seed=4))
    assert not np.array_equal(other_seed["image"], fresh[0]["image"])


def test_ade20k_train_iterator_resumes_exactly(prepared):
    options = dict(
        source="ade20k",
        data_dir=prepared,
        global_batch_size=3,
        crop_size=16,
        seed=1,
        process_index=0,
        process_count=1,
        scale=(64, 32),
    )
    fresh = seg_input.create_seg_train_iterator(**options)
    batches = [next(fresh) for _ in range(3)]
    resumed = next(seg_input.create_seg_train_iterator(**options, start_step=2))
    np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
    np.testing.assert_array_equal(resumed["label"], batches[2]["label"])


def test_undecodable_files_cost_their_slot_not_the_run_nor_exact_resume(tmp_path, caplog,
                                                                         monkeypatch):
    """A truncated JPEG and a truncated PNG label in the release: TFDS prepares them (it keeps
    the bytes), and decoding them raises. Each such example becomes the fill (the mean colour,
    every label pixel ignored, so it adds nothing to the loss; photometric parameters that
    change nothing), the run goes on, the file is named in a warning, and a resumed iterator
    gives the same batches (the stream is unchanged). A damaged validation image or label (or
    a label value past 150) stops the evaluation with an error naming it, and a segment.py run
    before its model is built, naming each."""
    release = tmp_path / "manual" / "ADEChallengeData2016"
    for folder in SIZES:
        for stem, jpeg, png, label in _fake_pairs(folder):
            if stem == "ADE_train_00000003":  # a raw value past class 150: a NaN loss if kept
                label[:4, :4] = 200
                png = _png(label)
            if stem == "ADE_train_00000002":
                jpeg = jpeg[: len(jpeg) // 3]
            if stem == "ADE_train_00000004":
                png = png[: len(png) // 2]
            if stem == "ADE_val_00000002":
                jpeg = jpeg[: len(jpeg) // 2]
            for kind, suffix, data in (("images", "jpg", jpeg), ("annotations", "png", png)):
                path = release / kind / folder / f"{stem}.{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    # Two more validation pairs: a truncated label, and a label value past 150.
    stem, jpeg, png, label = next(_fake_pairs("validation"))
    label[:4, :4] = 200
    for name, label_png in (("ADE_val_00000003", png[: len(png) // 2]),
                            ("ADE_val_00000004", _png(label))):
        (release / "images" / "validation" / f"{name}.jpg").write_bytes(jpeg)
        (release / "annotations" / "validation" / f"{name}.png").write_bytes(label_png)
    data_dir = tmp_path / "tfds"
    ade20k.prepare_ade20k(data_dir=data_dir, manual_dir=tmp_path / "manual")
    options = dict(source="ade20k", data_dir=data_dir, global_batch_size=2, crop_size=16,
                   seed=1, process_index=0, process_count=1, scale=(64, 32),
                   device_photometric=True)
    iterator = seg_input.create_seg_train_iterator(**options)
    with caplog.at_level("WARNING"):
        batches = [next(iterator) for _ in range(4)]  # two epochs of the 4 training pairs
    filled = [(batch["label"][i] == 255).all() for batch in batches for i in range(2)]
    assert sum(filled) == 6  # 3 bad files x 2 epochs
    for batch in batches:
        for i in np.flatnonzero((batch["label"] == 255).all(axis=(1, 2))):
            assert (batch["image"][i] == IMAGENET_MEAN_UINT8).all()
            np.testing.assert_array_equal(batch["photometric"][i], [0, 1, 0, 1, 0, 0, 1, 16, 16])
    assert iterator.undecodable == {"ADE_train_00000002", "ADE_train_00000003",
                                    "ADE_train_00000004"}
    assert "ADE_train_00000002" in caplog.text and "every pixel ignored" in caplog.text
    resumed = next(seg_input.create_seg_train_iterator(**options, start_step=3))
    for key in ("image", "label", "photometric"):
        np.testing.assert_array_equal(resumed[key], batches[3][key])
    # Evaluation cannot leave an image out without changing the metrics: it stops, naming it.
    # (in the records' order: the good pair may come first)
    with pytest.raises(ValueError, match="image ADE_val_0000000[234] of ade20k does not decode"):
        for example in seg_eval_input.seg_eval_examples(source="ade20k", data_dir=data_dir):
            assert example["name"] == "ADE_val_00000001"
    # segment.py finds them before any model work, not at the first evaluation: every pair is
    # decoded first (its workdir is not even made).
    with pytest.raises(ValueError, match=r"images ADE_val_00000002, ADE_val_00000003, "
                       r"ADE_val_00000004 of ade20k do not decode \(3 of 4\): .* prepare"):
        seg_eval_input.check_validation_decodes("ade20k", data_dir=data_dir)
    with pytest.raises(ValueError, match=r"\(3 of 4\)"):
        seg_eval_input.check_validation_decodes("ade20k", data_dir=data_dir, limit=10)
    config = tiny_segmentation_config(**{"data.source": "ade20k", "data.data_dir": str(data_dir),
                                         "data.num_classes": None, "data.eval_limit": 0})
    with pytest.raises(ValueError, match="ADE_val_00000002, ADE_val_00000003, ADE_val_00000004"):
        segment_lib.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not (tmp_path / "run").exists()
    config.eval_every_steps = 0  # a run that never evaluates does not look

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(segment_lib, "Run", started)
    with pytest.raises(Started):
        segment_lib.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])


def _png(image):
    """PNG bytes of a PIL image or an array (PIL picks the mode from the dtype and shape)."""
    data = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(data, format="PNG")
    return data.getvalue()


def test_label_maps_that_are_not_8_bit_grayscale_are_refused_by_name():
    """TF's PNG decoder (TFDS's label feature) turns colours into grey levels and scales
    16-bit values to 8 bits: such label maps would invent classes, so preparing refuses them."""
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert ade20k.check_label_png(_png(label), "ok.png") == _png(label)
    for image, kind in ((label.astype(np.uint16) * 300, "16-bit grayscale"),
                        (np.stack([label] * 3, -1), "8-bit RGB"),
                        (Image.fromarray(label).convert("P"), "8-bit palette")):
        with pytest.raises(ValueError, match=f"annotation x.png is a {kind} PNG.*8-bit gray"):
            ade20k.check_label_png(_png(image), "x.png")
    for data in (b"GIF89a" + bytes(40), _png(label)[:20]):  # another format; cut in its header
        with pytest.raises(ValueError, match="not a PNG file"):
            ade20k.check_label_png(data, "x.png")


def test_label_maps_of_another_size_than_their_image_are_refused(tmp_path, monkeypatch):
    """QA: label maps saved at another size (here half, and one transposed) were trained on as
    "every pixel ignored" (a whole run at loss 0, exit 0) and scored on misaligned pixels.
    Preparing now refuses such pairs, naming each with both sizes; data prepared before that
    check is refused by the validation check and by evaluation; a training stream whose
    examples mostly fail stops with BadDataError, its warnings giving the possible causes."""
    from mae_jax.core.errors import BadDataError
    from mae_jax.data import decodable

    release = tmp_path / "manual" / "ADEChallengeData2016"
    for folder in SIZES:
        for stem, jpeg, _, label in _fake_pairs(folder):
            label = label[::2, ::2] if folder == "training" else label.T
            for kind, suffix, data in (("images", "jpg", jpeg),
                                       ("annotations", "png", _png(label))):
                path = release / kind / folder / f"{stem}.{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    with pytest.raises(BadDataError, match=r"4 of 4 annotation\(s\) in training .* not the "
                       r"size of their image: ADE_train_00000001 \(image 40x24, annotation "
                       r"20x12\), .*nothing was prepared"):
        ade20k.prepare_ade20k(data_dir=tmp_path / "refused", manual_dir=tmp_path / "manual")
    monkeypatch.setattr(ade20k, "_jpeg_size", lambda data: None)  # as prepared before the check
    data_dir = tmp_path / "tfds"
    ade20k.prepare_ade20k(data_dir=data_dir, manual_dir=tmp_path / "manual")
    with pytest.raises(BadDataError, match=r"2 validation label map\(s\) of ade20k are not the "
                       r"size of their image: ADE_val_00000001 \(image 44x28, label 28x44\)"):
        seg_eval_input.check_validation_decodes("ade20k", data_dir=data_dir)
    # segment.py's eval_only in one process too, before any model work (QA: it met the first
    # at evaluation time).
    config = tiny_segmentation_config(**{"data.source": "ade20k", "data.data_dir": str(data_dir),
                                         "data.num_classes": 150, "eval_only": True})
    with pytest.raises(BadDataError, match=r"2 validation label map\(s\) of ade20k are not"):
        segment_lib.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not (tmp_path / "run").exists()
    with pytest.raises(BadDataError, match="ADE_val_0000000[12] of ade20k does not decode"):
        next(seg_eval_input.seg_eval_examples(source="ade20k", data_dir=data_dir))
    monkeypatch.setattr(decodable, "MIN_EXAMPLES_JUDGED", 8)
    iterator = seg_input.create_seg_train_iterator(
        source="ade20k", data_dir=data_dir, global_batch_size=2, crop_size=16, seed=1,
        process_index=0, process_count=1, scale=(64, 32))
    for _ in range(4):
        next(iterator)  # the loop stops the run on `broken` (test_reliability.py)
    assert re.search(r"8 of the first 8 examples .* label map of another size than its image.*"
                     r"broken as a whole", iterator.broken)


def test_train_iterator_gives_each_process_its_own_share():
    first = next(_synthetic_iterator(process_index=0, process_count=2))
    second = next(_synthetic_iterator(process_index=1, process_count=2))
    assert first["image"].shape == (2, 32, 32, 3)
    assert not np.array_equal(first["image"], second["image"])
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        _synthetic_iterator(global_batch_size=3, process_index=0, process_count=2)


def test_synthetic_scenes_are_deterministic_and_labels_in_range():
    images, labels = synthetic_scenes.generate_scenes(
        num_classes=5, count=6, image_size=(32, 40), seed=7
    )
    again, _ = synthetic_scenes.generate_scenes(num_classes=5, count=3, image_size=(32, 40), seed=7)
    assert images.shape == (6, 32, 40, 3) and images.dtype == np.uint8
    assert labels.shape == (6, 32, 40) and labels.dtype == np.uint8
    np.testing.assert_array_equal(again, images[:3])  # scene i does not depend on the count
    assert labels.max() <= 5 and len(np.unique(labels)) >= 4
    other, _ = synthetic_scenes.generate_scenes(num_classes=5, count=1, image_size=(32, 40), seed=8)
    assert not np.array_equal(other[0], images[0])


def test_synthetic_eval_examples_and_class_counts():
    examples = list(
        seg_eval_input.seg_eval_examples(
            source="synthetic", scale=(64, 32), num_classes=5, image_size=(32, 48), limit=3
        )
    )
    assert [e["name"] for e in examples] == [f"synthetic_validation_{i:05d}" for i in range(3)]
    for example in examples:
        assert example["image"].shape == (32, 48, 3) and example["label"].shape == (32, 48)
        assert set(np.unique(example["label"])) <= set(range(5)) | {255}
    assert seg_input.num_seg_classes("ade20k") == 150
    assert seg_input.num_seg_classes("synthetic", num_classes=5) == 5
    with pytest.raises(ValueError, match="150 classes"):
        seg_input.num_seg_classes("ade20k", num_classes=10)


def test_meta_lists_and_colorize():
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"
    painted = colorize(np.array([[0, 255], [149, 2]]))
    assert painted.dtype == np.uint8 and painted.shape == (2, 2, 3)
    np.testing.assert_array_equal(painted[0, 0], ADE20K_PALETTE[0])
    np.testing.assert_array_equal(painted[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(painted[1, 0], ADE20K_PALETTE[149])
