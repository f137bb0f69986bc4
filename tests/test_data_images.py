"""Image pipelines (mae_jax.data.images / sources): mock or locally written data, no downloads."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax.data import image_ops, images, sources, tf_runtime
from mae_jax.data.constants import (
    IMAGENET_MEAN_UINT8,
    IMAGENET_STD,
    denormalize,
    normalize,
    normalize_uint8,
)
from mae_jax.data.stream import shuffled_stream

SIZE = 32


class MaeJaxTinyGray(tfds.core.GeneratorBasedBuilder):
    """20 train / 4 test grayscale images; image i is constant 10 * i + 5 and has label i % 4."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(names=["a", "b", "c", "d"]),
        })
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20), "test": self._generate_examples(4)}

    def _generate_examples(self, count):
        for i in range(count):
            yield i, {"image": np.full((8 + i % 3, 10, 1), 10 * i + 5, np.uint8), "label": i % 4}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    with tf_runtime.no_tfds_scratch():  # TFDS's empty scratch folder for a new dataset
        MaeJaxTinyGray(data_dir=data_dir).download_and_prepare(download_config=config)
    return data_dir


def _write_folder(root, count=9):
    """Nested JPEG/PNG files of different sizes and modes, constant grey value 20 * i + 10,
    plus one undecodable .jpg and a text file."""
    modes = [("RGB", ".jpg"), ("L", ".JPEG"), ("RGBA", ".png"), ("L", ".png"), ("RGB", ".PNG")]
    for i in range(count):
        mode, ext = modes[i % len(modes)]
        value = 20 * i + 10
        color = {"RGB": (value,) * 3, "L": value, "RGBA": (value, value, value, 128)}[mode]
        folder = root / f"class{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new(mode, (12 + 3 * i, 9 + 2 * i), color).save(folder / f"img{i}{ext}", quality=100)
    (root / "class0" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    (root / "notes.txt").write_text("not an image, ignored")
    return f"folder:{root}"


def _write_classes(root, split_sizes, colours=((200, 30, 30), (30, 200, 30), (30, 30, 200))):
    """PATH/<split>/<class>/*.jpg, class c painted colours[c]; split_sizes: {split: per class}."""
    for split, per_class in split_sizes.items():
        for label, colour in enumerate(colours):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = (40 + 7 * i, 30 + 5 * label)
                Image.new("RGB", size, colour).save(folder / f"{i:03d}.jpg", quality=95)
    return f"folder:{root}"


def _labels_from_colour(batch_images, colours=((200, 30, 30), (30, 200, 30), (30, 30, 200))):
    means = batch_images.reshape(len(batch_images), -1, 3).mean(axis=1)
    return np.argmin(np.abs(means[:, None] - np.asarray(colours)[None]).sum(-1), axis=1)


def _take(iterator, count):
    return [next(iterator)["image"] for _ in range(count)]


def _grey_ids(batch, spacing, offset):
    """Recovers which constant-grey source image each (un-augmented) output came from."""
    values = batch.reshape(len(batch), -1).mean(axis=1)
    return sorted(int(round((v - offset) / spacing)) for v in values)


def _one_process(**options):
    return {"process_index": 0, "process_count": 1, **options}


def test_parse_source_accepts_both_forms_and_rejects_others():
    assert images.parse_source("tfds:cifar100") == ("tfds", "cifar100")
    assert images.parse_source("folder:/data/imgs") == ("folder", "/data/imgs")
    for bad in ["cifar100", "tfds:", "hdf5:/x", "", "folder: "]:
        with pytest.raises(ValueError, match="tfds:NAME.*folder:"):
            images.parse_source(bad)


def test_normalize_uint8_matches_float_normalisation_in_numpy_and_jit():
    import jax

    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    expected = normalize(pixels / 255.0)
    np.testing.assert_allclose(normalize_uint8(pixels), expected, atol=1e-6)
    np.testing.assert_allclose(jax.jit(normalize_uint8)(pixels), expected, atol=1e-6)
    np.testing.assert_allclose(denormalize(normalize(pixels / 255.0)), pixels / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize_uint8(pixels.astype(np.float32))
    with pytest.raises(ValueError, match="channels-last"):
        normalize(np.zeros((2, 3, 4, 4)))


def test_tfds_batches_are_uint8_deterministic_and_seed_dependent():
    common = _one_process(source="tfds:cifar100", image_size=SIZE, global_batch_size=4)
    with tfds.testing.mock_data(num_examples=10):
        first = _take(images.create_pretrain_iterator(seed=0, **common), 3)
        other = _take(images.create_pretrain_iterator(seed=1, **common), 3)
        labelled = images.create_train_iterator(seed=0, with_labels=True, **common)
        again = [next(labelled) for _ in range(3)]
        fixed = images.load_fixed_images(source="tfds:cifar100", image_size=SIZE, count=3)
    assert first[0].shape == (4, SIZE, SIZE, 3) and first[0].dtype == np.uint8
    assert first[0].std() > 20  # real image content, not a constant
    for a, b in zip(first, again, strict=True):  # same seed, same batches
        np.testing.assert_array_equal(a, b["image"])
    assert not np.array_equal(first[0], other[0])
    labelled = again[0]
    assert labelled["label"].dtype == np.int32 and labelled["label"].shape == (4,)
    assert fixed.shape == (3, SIZE, SIZE, 3) and fixed.dtype == np.uint8


def test_resume_from_step_matches_fresh_iterator_across_epoch_boundary(tmp_path):
    source = _write_folder(tmp_path)  # 10 listed files, batch 4 -> 2 steps per epoch
    common = _one_process(source=source, image_size=SIZE, global_batch_size=4, seed=3)
    fresh = _take(images.create_pretrain_iterator(**common), 6)
    resumed = _take(images.create_pretrain_iterator(start_step=3, **common), 3)
    for a, b in zip(fresh[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    # Each epoch is a new permutation and new augmentations, not a replay.
    assert not np.array_equal(fresh[0], fresh[2])


def test_a_class_sorted_folder_is_fully_shuffled_whatever_the_buffer(tmp_path):
    # Review: a folder's listing is sorted by class (ImageFolder's order), and a bounded
    # shuffle buffer over it gave batches of a few neighbouring classes (ImageNet with the
    # default buffer: 40-150 classes a batch instead of ~640). Here a buffer of 1, which
    # would not shuffle at all, still gives a permutation of the whole listing every epoch.
    source = _write_classes(tmp_path, {"train": 8})  # 24 files, classes 0, 1, 2 in order
    iterator = images.create_train_iterator(
        source=source, image_size=SIZE, global_batch_size=6, seed=0, with_labels=True,
        shuffle_buffer_size=1, **_one_process())
    epochs = [[next(iterator)["label"] for _ in range(4)] for _ in range(2)]
    for epoch in epochs:
        assert np.bincount(np.concatenate(epoch)).tolist() == [8, 8, 8]
        assert len(set(epoch[0].tolist())) >= 2  # not class 0 alone
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))


def test_an_index_stream_is_a_permutation_per_epoch_and_resumes_exactly():
    def stream(start_step=0, **options):
        return shuffled_stream(tf.data.Dataset.range(50), num_records=50, batch_size=8, seed=5,
                               process_index=1, start_step=start_step, indices=True,
                               shuffle_buffer_size=4, **options)

    fresh = [(tuple(seed.numpy()), int(index)) for seed, index in stream().take(8 * 14)]
    for epoch in (fresh[:48], fresh[48:96]):  # 6 batches of 8 an epoch, 2 records left out
        assert len({index for _, index in epoch}) == 48 and max(i for _, i in epoch) >= 40
    assert [index for _, index in fresh[:48]] != [index for _, index in fresh[48:96]]
    resumed = [(tuple(seed.numpy()), int(index)) for seed, index in stream(9).take(8 * 5)]
    assert resumed == fresh[8 * 9:]
    # The example seeds are the buffered stream's: only the order of the records differs.
    buffered = shuffled_stream(tf.data.Dataset.range(50), num_records=50, batch_size=8, seed=5,
                               process_index=1, shuffle_buffer_size=4)
    assert [tuple(seed.numpy()) for seed, _ in buffered.take(60)] == [s for s, _ in fresh[:60]]


def test_folder_lists_every_file_decodes_modes_to_rgb_and_names_the_broken_one(tmp_path, caplog):
    source = _write_folder(tmp_path)
    # The broken file is listed (no start-up reading): the dataset size is the listing's.
    assert images.num_examples(source=source) == 10
    iterator = images.create_pretrain_iterator(
        source=source, augment=False, image_size=SIZE, global_batch_size=10, seed=0,
        **_one_process())
    with caplog.at_level(logging.WARNING, logger="mae_jax.data"):
        (batch,) = _take(iterator, 1)  # one epoch: every listed file once
    assert batch.shape == (10, SIZE, SIZE, 3)
    # Grey sources (L, RGB, RGBA alike) come out as equal R, G, B at the source value.
    pixels = batch.astype(int)
    np.testing.assert_allclose(pixels, pixels[..., :1].repeat(3, -1), atol=1)
    assert set(_grey_ids(batch, spacing=20, offset=10)) == set(range(9))  # broken one replaced
    assert "broken.jpg" in caplog.text and iterator.undecodable == {
        str(tmp_path / "class0" / "broken.jpg")}


def test_bmp_and_webp_are_read_and_formats_the_pipeline_cannot_read_are_named(tmp_path,
                                                                             capsys):
    # Review: torchvision's ImageFolder reads .bmp / .webp / .tif / .ppm too; they were left
    # out without a word. BMP and WebP decode as PIL decodes them; the others are named.
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8)
    (tmp_path / "c0").mkdir()
    for index, form in enumerate(["BMP", "WEBP", "PNG"]):
        Image.fromarray(pixels).save(tmp_path / "c0" / f"{index}.{form.lower()}", format=form,
                                     **({"lossless": True} if form == "WEBP" else {}))
    Image.fromarray(pixels).save(tmp_path / "c0" / "3.tif", format="TIFF")
    listing = sources.list_folder(str(tmp_path), with_labels=True)
    assert [os.path.basename(path) for path in listing.paths] == ["0.bmp", "1.webp", "2.png"]
    assert "WARNING: 1 file(s) in" in capsys.readouterr().out
    for path in listing.paths:
        decoded = image_ops.decode_rgb(tf.io.read_file(path)).numpy()
        np.testing.assert_array_equal(decoded, np.asarray(Image.open(path).convert("RGB")))
    # A pretraining folder of loose images says it too (QA: it dropped them silently).
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(pixels).save(loose / "a.png")
    Image.fromarray(pixels).save(loose / "b.ppm")
    assert sources.list_folder(str(loose), with_labels=False).paths == (str(loose / "a.png"),)
    assert f"1 file(s) in {loose} are left out, e.g. {loose / 'b.ppm'}" in capsys.readouterr().out
    (loose / "a.png").rename(tmp_path / "c0" / "4.png")  # class folders, loose .ppm only
    (loose / "c0").mkdir()
    Image.fromarray(pixels).save(loose / "c0" / "a.png")
    assert len(sources.list_folder(str(loose), with_labels=False).paths) == 1
    assert f"1 file(s) in {loose} are left out, e.g. {loose / 'b.ppm'}" in capsys.readouterr().out


def test_start_up_only_lists_files_and_opens_none(tmp_path, monkeypatch):
    for i in range(6):  # contents that no decoder accepts: listing must not care
        (tmp_path / f"{i}.jpg").write_bytes(b"x" * i)

    def no_reading(*args, **kwargs):
        raise AssertionError("an image file was opened at start-up")

    # The old start-up pass opened every file with PIL (and rejected all of these).
    monkeypatch.setattr(Image, "open", no_reading)
    assert images.num_examples(source=f"folder:{tmp_path}") == 6
    images.create_train_iterator(source=f"folder:{tmp_path}", image_size=SIZE,
                                 global_batch_size=2, seed=0, **_one_process())


def test_folder_shards_are_disjoint_equal_sized_and_count_globally(tmp_path):
    source = _write_folder(tmp_path)
    directory = sources.split_folder(str(tmp_path), "train")
    listings = [sources.list_folder(directory, with_labels=False, shard_index=i, shard_count=2)
                for i in range(2)]
    assert listings[0].total == listings[1].total == 10
    assert not set(listings[0].paths) & set(listings[1].paths)
    assert len(listings[0].paths) + len(listings[1].paths) == 10
    ids = []
    for index in range(2):
        iterator = images.create_pretrain_iterator(
            source=source, image_size=SIZE, global_batch_size=8, seed=0, process_count=2,
            process_index=index, augment=False,
        )  # fmt: skip
        ids.append(_grey_ids(_take(iterator, 1)[0], spacing=20, offset=10))
    assert len(ids[0]) == len(ids[1]) == 4
    assert not set(ids[0]) & set(ids[1])


def test_generated_data_of_other_settings_replaces_the_earlier_files(tmp_path):
    """From a QA pass: `generated:512` in a workdir that held `generated:2048` trained on all
    2048 (the earlier PNGs stayed beside a second marker); fewer generated classes would have
    left the earlier class folders, read as classes too. Other files are kept."""
    from mae_jax.classification.synthetic import write_labelled_dataset
    from mae_jax.data.generated import write_generated_images

    folder = str(tmp_path / "generated_images")
    write_generated_images(folder, count=8, size=8)
    (tmp_path / "generated_images" / "notes.txt").write_text("mine")
    write_generated_images(folder, count=3, size=8)
    assert sorted(os.listdir(folder)) == [".complete_3_8_0", "000000.png", "000001.png",
                                          "000002.png", "notes.txt"]
    classes = str(tmp_path / "generated_classes")
    write_labelled_dataset(classes, num_train=8, num_val=4, num_classes=4, size=8)
    write_labelled_dataset(classes, num_train=4, num_val=2, num_classes=2, size=8)
    for split, count in (("train", 4), ("val", 2)):
        assert sorted(os.listdir(os.path.join(classes, split))) == ["class_00", "class_01"]
        assert sum(len(files) for _, _, files in os.walk(os.path.join(classes, split))) == count


def test_labelled_folder_classes_splits_and_labels_follow_class_folders(tmp_path):
    source = _write_classes(tmp_path, {"train": 4, "val": 2})
    assert images.class_names(source=source) == ["c0", "c1", "c2"]
    assert images.num_classes(source=source, split="validation") == 3
    assert images.num_examples(source=source, split="train") == 12
    assert images.num_examples(source=source, split="val", with_labels=True) == 6
    iterator = images.create_train_iterator(
        source=source, image_size=SIZE, global_batch_size=6, seed=0, with_labels=True,
        crop_scale=(0.08, 1.0), **_one_process())
    for _ in range(3):
        batch = next(iterator)
        assert batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["label"], _labels_from_colour(batch["image"]))
    with pytest.raises(FileNotFoundError, match="no test/ sub-folder"):
        images.num_examples(source=source, split="test")
    flat = _write_folder(tmp_path / "flat")
    with pytest.raises(ValueError, match="one split"):
        images.num_examples(source=flat, split="validation")
    # Each split numbers its own sorted class folders: different sets are refused by name.
    assert images.shared_classes(source=source, splits=("train", "validation")) == [
        "c0", "c1", "c2"]
    os.rename(tmp_path / "val" / "c0", tmp_path / "val" / "c9")
    with pytest.raises(ValueError, match=r"different classes \(3 and 3 class folders; only in "
                       r"'train': c0; only in 'validation': c9\).*same class folders"):
        images.shared_classes(source=source, splits=("train", "validation"))


def test_eval_pass_covers_each_example_once_with_padding_masked_in_every_process(tmp_path):
    source = _write_classes(tmp_path, {"train": 1, "val": 5})  # 15 validation images
    seen, lengths = [], []
    for index in range(2):  # 8 + 7 examples, local batch 3: both run ceil(8 / 3) = 3 batches
        iterator = images.create_eval_iterator(
            source=source, image_size=SIZE, global_batch_size=6, split="validation",
            process_index=index, process_count=2)
        batches = list(iterator)
        lengths.append((len(iterator), len(batches)))
        for batch in batches:
            assert batch["image"].shape == (3, SIZE, SIZE, 3) and batch["mask"].dtype == bool
            keep = batch["mask"]
            np.testing.assert_array_equal(batch["label"][keep],
                                          _labels_from_colour(batch["image"][keep]))
            assert np.all(batch["image"][~keep] == 0)
            seen.extend(batch["label"][keep].tolist())
    assert lengths == [(3, 3), (3, 3)]
    assert sorted(seen) == sorted([0, 1, 2] * 5)


def test_pipeline_equals_the_float32_transform_to_rounding(tmp_path):
    source, decoded = _single_image_folder(tmp_path)  # PIL decodes with the accurate DCT
    iterator = images.create_train_iterator(source=source, image_size=SIZE, global_batch_size=1,
                                            seed=5, **_one_process())
    got = normalize_uint8(np.concatenate(_take(iterator, 4)))
    # Seeds split as the pipeline does: (crop seed, RandAugment seed), then the crop seed into
    # (box seed, flip seed).
    for image, seed in zip(got, _example_seeds(5, 4), strict=True):
        crop_seed = tf.random.experimental.stateless_split(seed, 2)[0]
        box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(crop_seed, 2))
        top, left, height, width = (int(v) for v in image_ops.crop_box(box_seed, 60, 80))
        crop = decoded[top:top + height, left:left + width]
        if tf.random.stateless_uniform([], flip_seed) < 0.5:
            crop = crop[:, ::-1]
        # The old pipeline's float path: TF's antialiased bicubic resize (PIL's filter), clipped.
        resized = tf.clip_by_value(tf.image.resize(crop, [SIZE, SIZE], "bicubic", antialias=True),
                                   0.0, 255.0).numpy()
        expected = normalize(resized / 255.0)
        # Half a grey level of rounding at the end, half a level more from rounding between
        # the horizontal and vertical passes (as PIL does, pinned in test_transform_parity.py),
        # plus float differences between the two resizes.
        tolerance = (1.0 + 0.01) / (255 * np.asarray(IMAGENET_STD))
        assert np.all(np.abs(image - expected) <= tolerance)


def _single_image_folder(tmp_path):
    """One smooth photo-like JPEG (60 x 80); returns (source, its pixels as PIL decodes them)."""
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(0, 6, (60, 80, 3)), axis=1)
    smooth += np.linspace(0, 90, 60)[:, None, None]
    pixels = np.clip(smooth - smooth.min() + 20, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "only.jpg", quality=95)
    return f"folder:{tmp_path}", np.asarray(Image.open(tmp_path / "only.jpg").convert("RGB"))


def _example_seeds(seed, steps):
    """The shared stream's example seeds for a one-record dataset (one example per step)."""
    stream = shuffled_stream(tf.data.Dataset.range(1), num_records=1, batch_size=1, seed=seed,
                             process_index=0)
    return [example_seed for example_seed, _ in stream.take(steps)]


def test_randaugment_runs_on_the_uint8_crop_after_crop_and_flip(tmp_path):
    from mae_jax.data import randaugment

    source, _ = _single_image_folder(tmp_path)
    common = _one_process(source=source, image_size=SIZE, global_batch_size=1, seed=2)
    plain = _take(images.create_train_iterator(**common), 3)
    augmented = _take(images.create_train_iterator(randaugment="rand-m9-mstd0.5-inc1", **common),
                      3)
    layers = randaugment.parse_rand_augment("rand-m9-mstd0.5-inc1")
    for crop, got, seed in zip(plain, augmented, _example_seeds(2, 3), strict=True):
        augment_seed = tf.random.experimental.stateless_split(seed, 2)[1]
        expected = randaugment.rand_augment(tf.constant(crop[0]), augment_seed, **layers)
        np.testing.assert_array_equal(got[0], expected.numpy())
    assert any(not np.array_equal(a, b) for a, b in zip(plain, augmented, strict=True))
    with pytest.raises(ValueError, match="RandAugment config"):
        images.create_train_iterator(randaugment="rand-q9", **common)


def test_tfds_process_shards_are_disjoint_and_grayscale_becomes_rgb(tiny_tfds_dir):
    shards = []
    for index in range(2):
        iterator = images.create_pretrain_iterator(
            source="tfds:mae_jax_tiny_gray", data_dir=tiny_tfds_dir, image_size=SIZE,
            global_batch_size=4, seed=0, process_count=2, process_index=index,
            download=False, augment=False,
        )  # fmt: skip
        batches = np.concatenate(_take(iterator, 5))  # one epoch: 10 examples per process
        shards.append(_grey_ids(batches, spacing=10, offset=5))
    assert sorted(shards[0] + shards[1]) == list(range(20))


def test_tfds_fixed_images_spread_and_labelled_eval_pass(tiny_tfds_dir):
    common = {"source": "tfds:mae_jax_tiny_gray", "data_dir": tiny_tfds_dir, "image_size": SIZE}
    fixed = images.load_fixed_images(count=4, **common)
    assert fixed.shape == (4, SIZE, SIZE, 3) and fixed.dtype == np.uint8
    assert _grey_ids(fixed, spacing=10, offset=5) == [0, 1, 2, 3]  # the 4-image "test" split
    # Spread over the split (records 0, 5, 10, 15 of its stored order), not its first examples.
    stored = tfds.builder("mae_jax_tiny_gray", data_dir=tiny_tfds_dir).as_dataset(
        split="train", shuffle_files=False)
    order = [int(round((e["image"].mean() - 5) / 10)) for e in stored.as_numpy_iterator()]
    spread = images.load_fixed_images(count=4, split="train", **common)
    assert _grey_ids(spread, spacing=10, offset=5) == sorted(order[i] for i in (0, 5, 10, 15))
    assert images.num_examples(source="tfds:mae_jax_tiny_gray", data_dir=tiny_tfds_dir) == 20
    assert images.class_names(source="tfds:mae_jax_tiny_gray", data_dir=tiny_tfds_dir) == list(
        "abcd")
    evaluated = list(images.create_eval_iterator(split="train", global_batch_size=8,
                                                 **common, **_one_process()))
    labels = np.concatenate([b["label"][b["mask"]] for b in evaluated])
    shown = np.concatenate([b["image"][b["mask"]] for b in evaluated])
    ids = np.round((shown.reshape(20, -1).mean(axis=1) - 5) / 10).astype(int)
    np.testing.assert_array_equal(ids, order)  # one pass, in stored order
    np.testing.assert_array_equal(labels, ids % 4)


def test_an_undecodable_tfds_training_record_takes_another_example_of_its_batch(
        tiny_tfds_dir, monkeypatch, caplog):
    """TFDS records have no random access: a record that fails to decode gives its slot to an
    example of its batch that decoded, WITH that example's label (never a mean-colour image
    under the failed record's label), is named once, and a resume repeats the same batches."""
    real_records = sources.tfds_records

    def two_broken(builder, split):
        records = real_records(builder, split).enumerate()
        return records.map(lambda i, r: {**r, "encoded": tf.where(
            (i == 3) | (i == 7), tf.constant(b"not an image"), r["encoded"])})

    monkeypatch.setattr(sources, "tfds_records", two_broken)
    common = dict(source="tfds:mae_jax_tiny_gray", data_dir=tiny_tfds_dir, image_size=SIZE,
                  global_batch_size=4, seed=3, download=False, with_labels=True,
                  **_one_process())
    with caplog.at_level(logging.WARNING, logger="mae_jax.data"):
        iterator = images.create_train_iterator(**common)
        fresh = [next(iterator) for _ in range(10)]  # two epochs of 5 batches
    for batch in fresh:
        ids = np.round((batch["image"].reshape(4, -1).mean(axis=1) - 5) / 10).astype(int)
        assert (batch["image"] == batch["image"][:, :1, :1]).all()  # a real (constant) image
        np.testing.assert_array_equal(batch["label"], ids % 4)
    assert len(iterator.undecodable) == 2
    assert caplog.text.count("Undecodable image") == 2
    assert "filled by another example of its batch" in caplog.text
    resumed = images.create_train_iterator(start_step=6, **common)
    for expected in fresh[6:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])
    # A batch of which nothing decodes: the mean colour, said as such (review: the warning
    # said another example had taken the slot).
    monkeypatch.setattr(sources, "tfds_records", lambda builder, split: real_records(
        builder, split).map(lambda r: {**r, "encoded": tf.constant(b"not an image")}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mae_jax.data"):
        batch = next(images.create_train_iterator(**common))
    np.testing.assert_array_equal(batch["image"],
                                  np.broadcast_to(IMAGENET_MEAN_UINT8, batch["image"].shape))
    assert caplog.text.count("No example of a batch of tfds:mae_jax_tiny_gray split 'train' "
                             "decodes: its "
                             f"{len(batch['image'])} slot(s) are the mean colour") == 1
    assert "its slot is the mean colour" in caplog.text
    assert "filled by another example" not in caplog.text  # review: it said so for these too


def test_fixed_images_are_spread_over_a_class_sorted_folder(tmp_path):
    source = _write_classes(tmp_path, {"train": 5, "val": 4})
    fixed = images.load_fixed_images(source=source, image_size=SIZE, count=3)  # from val/
    np.testing.assert_array_equal(_labels_from_colour(fixed), [0, 1, 2])
    again = images.load_fixed_images(source=source, image_size=SIZE, count=3)
    np.testing.assert_array_equal(fixed, again)


def test_clear_errors_for_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no .jpg/.jpeg/.png/.bmp/.webp images"):
        images.num_examples(source=f"folder:{empty}")
    with pytest.raises(ValueError, match="no class sub-folders"):
        images.num_classes(source=f"folder:{empty}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.num_examples(source=f"folder:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="tfds:NAME"):
        images.create_pretrain_iterator(source="imagenet", image_size=SIZE, global_batch_size=4,
                                        seed=0, **_one_process())
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build cifar100"):
        images.create_pretrain_iterator(
            source="tfds:cifar100", data_dir=str(tmp_path / "tfds"), image_size=SIZE,
            global_batch_size=4, seed=0, download=False, **_one_process())
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        images.create_pretrain_iterator(source=_write_folder(tmp_path / "f"), image_size=SIZE,
                                        global_batch_size=5, seed=0, process_index=0,
                                        process_count=2)
    with pytest.raises(ValueError, match="crop_scale"):
        images.create_train_iterator(source=f"folder:{tmp_path / 'f'}", image_size=SIZE,
                                     global_batch_size=2, seed=0, crop_scale=(0.5, 0.2),
                                     **_one_process())


def test_failed_download_says_how_to_build_offline(tmp_path, monkeypatch):
    def no_network(self, dl_manager):
        raise ConnectionError("no internet")

    monkeypatch.setattr(MaeJaxTinyGray, "_split_generators", no_network)
    with pytest.raises(RuntimeError, match="tfds build mae_jax_tiny_gray --data_dir DIR"):
        images.num_examples(source="tfds:mae_jax_tiny_gray", data_dir=str(tmp_path))
    assert not os.path.exists(tmp_path / "mae_jax_tiny_gray" / "1.0.0" / "dataset_info.json")


@pytest.mark.parametrize("module", ["images", "seg_input", "in_memory", "ade20k"])
def test_each_pipeline_module_runs_tensorflow_kernels_single_threaded_and_off_the_gpus(module):
    """Importing any pipeline module, first thing in a process, sets TensorFlow up for it
    (mae_jax.data.tf_runtime): one thread per kernel (tf.data's parallel maps use the cores),
    no GPUs. Each module on its own, as the entry points import only theirs."""
    import subprocess
    import sys

    code = (f"import mae_jax.data.{module}, tensorflow as tf; tf.constant(1); "
            "print(tf.config.threading.get_intra_op_parallelism_threads(), "
            "len(tf.config.get_visible_devices('GPU')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "0"]


def test_tensorflow_setup_hides_the_gpus_and_warns_when_tensorflow_started_first(monkeypatch,
                                                                                 caplog):
    calls = []
    monkeypatch.setattr(tf.config, "set_visible_devices",
                        lambda devices, kind: calls.append(("visible", devices, kind)))
    monkeypatch.setattr(tf.config.threading, "set_intra_op_parallelism_threads",
                        lambda n: calls.append(("intra", n)))
    tf_runtime.configure()
    assert calls == [("visible", [], "GPU"), ("intra", 1)]
    monkeypatch.undo()

    tf.constant(1.0) + 1  # TensorFlow runs an op: its settings can no longer change
    before = tf.config.threading.get_intra_op_parallelism_threads()
    monkeypatch.setattr(tf_runtime, "INTRA_OP_THREADS", before + 2)
    with caplog.at_level(logging.WARNING, logger="mae_jax.data.tf_runtime"):
        tf_runtime.configure()  # no error, nothing changed, the user told
    assert tf.config.threading.get_intra_op_parallelism_threads() == before
    assert "Import mae_jax.data.tf_runtime before" in caplog.text


def test_looking_for_unprepared_datasets_leaves_no_tfds_folders_behind(tmp_path, monkeypatch):
    """TFDS makes an empty tempfile.mkdtemp("tfds") folder for every builder of a dataset not
    prepared yet, and keeps it; `tf_runtime.no_tfds_scratch` removes those (only new, empty
    ones: a folder there before, or holding a file, stays)."""
    import tempfile

    from mae_jax.data import ade20k

    scratch = tmp_path / "scratch"
    (scratch / "tmpkepttfds").mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(FileNotFoundError, match="not prepared"):
        images.num_examples(source="tfds:cifar100", data_dir=str(tmp_path / "t"), download=False)
    with pytest.raises(FileNotFoundError, match="no manual_dir"):
        ade20k.load_ade20k_builder(data_dir=tmp_path / "a")
    assert os.listdir(scratch) == ["tmpkepttfds"]
    with tf_runtime.no_tfds_scratch():
        (scratch / "tmpfulltfds").mkdir()
        (scratch / "tmpfulltfds" / "file").write_text("kept")
    assert sorted(os.listdir(scratch)) == ["tmpfulltfds", "tmpkepttfds"]
