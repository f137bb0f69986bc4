"""ADE20K (ADEChallengeData2016, 150 classes) as a TFDS builder that reads a manual download.

TFDS's own `scene_parse150` builder downloads the 2017 instance annotations, not the 150-class
semantic maps that mmsegmentation (and the MAE paper's 48.1 mIoU) use, so this builder reads
the MIT Scene Parsing release itself. It never downloads anything.

    from mae_jax.data.ade20k import prepare_ade20k
    prepare_ade20k(data_dir="~/tensorflow_datasets", manual_dir="~/downloads")

where ~/downloads holds ADEChallengeData2016.zip or the extracted ADEChallengeData2016/ folder.
"""

import io
import os
import pathlib
import zipfile

import tensorflow_datasets as tfds
from PIL import Image

from mae_jax.core.errors import BadDataError, DataNotFoundError
from mae_jax.data import tf_runtime  # sets TensorFlow up when imported
from mae_jax.data.preparing import refuse_to_prepare

RELEASE_NAME = "ADEChallengeData2016"
RELEASE_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
BENCHMARK_URL = "http://sceneparsing.csail.mit.edu/"
SPLIT_FOLDERS = {"train": "training", "validation": "validation"}  # TFDS split -> release folder

_HOW_TO_GET_IT = f"""\
Download {RELEASE_NAME}.zip (about 923 MB) from the MIT Scene Parsing benchmark
({BENCHMARK_URL}): {RELEASE_URL}
and put either the zip itself or the extracted `{RELEASE_NAME}/` folder (holding
images/{{training,validation}}/*.jpg and annotations/{{training,validation}}/*.png) into the
manual directory. Note: TFDS's `scene_parse150` builder is NOT this data (it fetches the 2017
instance annotations), so it cannot reproduce the ADE20K numbers."""


def _damaged_zip(archive, problem: str) -> str:
    return (
        f"{archive} is damaged or incomplete ({problem}). Delete it and download it again "
        f"({RELEASE_URL}, about 923 MB), or put the extracted `{RELEASE_NAME}/` folder next "
        "to it."
    )


_PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale + alpha",
                     6: "RGBA"}


def check_label_png(data: bytes, where: str) -> bytes:
    """`data` if it is an 8-bit grayscale PNG (one class index per pixel, as the release
    ships them); else a BadDataError naming the file: the label decoder would otherwise turn
    colours into grey levels or scale 16-bit values to 8 bits, i.e. invent classes."""
    if len(data) < 26 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise BadDataError(f"annotation {where} is not a PNG file; the release is damaged: "
                           "extract or download it again.")
    depth, colour = data[24], data[25]
    if (depth, colour) != (8, 0):
        kind = _PNG_COLOUR_TYPES.get(colour, f"colour type {colour}")
        raise BadDataError(
            f"annotation {where} is a {depth}-bit {kind} PNG; ADE20K labels are 8-bit "
            "grayscale PNGs holding the class index of each pixel (0 = other, 1..150). Write "
            "the label maps in that form (e.g. PIL: Image.fromarray(label.astype(np.uint8)), "
            "mode 'L') or use the release as downloaded.")
    return data


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header, None when PIL cannot read it (a damaged file
    is named when it is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR (`check_label_png` checked it is there)."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def find_ade20k_release(manual_dir) -> pathlib.Path:
    """Locates the release in `manual_dir`: the extracted folder (or manual_dir itself being that
    folder) or the zip. Raises FileNotFoundError saying where to get it otherwise."""
    if manual_dir is None:
        raise DataNotFoundError(f"No manual_dir given for ADE20K.\n{_HOW_TO_GET_IT}")
    root = pathlib.Path(os.path.expanduser(os.fspath(manual_dir)))
    for folder in (root / RELEASE_NAME, root):
        if (folder / "images").is_dir() and (folder / "annotations").is_dir():
            return folder
    archive = root / f"{RELEASE_NAME}.zip"
    if archive.is_file():
        if not zipfile.is_zipfile(archive):
            raise BadDataError(_damaged_zip(archive, "it is not a zip archive"))
        return archive
    raise DataNotFoundError(
        f"ADE20K release not found in {root} (looked for {RELEASE_NAME}/ and "
        f"{RELEASE_NAME}.zip).\n{_HOW_TO_GET_IT}"
    )


def _pairs_in_folder(release: pathlib.Path, folder: str):
    """Yields (stem, image bytes reader, label bytes reader) for one split of the folder form."""
    for image_path in sorted((release / "images" / folder).glob("*.jpg")):
        label_path = release / "annotations" / folder / f"{image_path.stem}.png"
        if not label_path.is_file():
            raise DataNotFoundError(
                f"{image_path} has no annotation {label_path}; the release is incomplete, "
                "extract the zip again."
            )
        yield image_path.stem, image_path.read_bytes, label_path.read_bytes


def _pairs_in_zip(archive: zipfile.ZipFile, folder: str):
    """Same as `_pairs_in_folder` for the zip (with or without the top-level folder)."""
    images, labels = {}, {}
    for member in archive.namelist():
        parts = member.split("/")
        if len(parts) < 3 or parts[-3] not in ("images", "annotations") or parts[-2] != folder:
            continue
        stem, suffix = os.path.splitext(parts[-1])
        if parts[-3] == "images" and suffix == ".jpg":
            images[stem] = member
        elif parts[-3] == "annotations" and suffix == ".png":
            labels[stem] = member
    for stem in sorted(images):
        if stem not in labels:
            raise DataNotFoundError(
                f"{images[stem]} has no annotation in {archive.filename}; the zip is incomplete, "
                "download it again."
            )
        yield (
            stem,
            (lambda m=images[stem]: archive.read(m)),
            (lambda m=labels[stem]: archive.read(m)),
        )


class Ade20kSemantic(tfds.core.GeneratorBasedBuilder):
    """ADE20K scene parsing, 150 classes (ADEChallengeData2016), from a manual download.

    Features: image uint8 [H, W, 3] JPEG; label uint8 [H, W, 1] PNG, raw class index per pixel
    (0 = other, 1..150 = ADE20K_CLASSES[i - 1]); file_name (image stem, e.g.
    ADE_val_00000001). Splits: train (20,210) and validation (2,000).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "ADEChallengeData2016 semantic maps, read from a manual download."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _HOW_TO_GET_IT

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=BENCHMARK_URL,
        )

    def _split_generators(self, dl_manager):
        release = find_ade20k_release(dl_manager.manual_dir)
        return {
            split: self._generate_examples(release, folder)
            for split, folder in SPLIT_FOLDERS.items()
        }

    def _generate_examples(self, release: pathlib.Path, folder: str):
        def examples(pairs):
            count, mismatched = 0, []
            for stem, read_image, read_label in pairs:
                count += 1
                # JPEG/PNG bytes are stored as they are: no re-encoding, no quality loss.
                label = check_label_png(read_label(), f"{stem}.png ({folder}, in {release})")
                image = read_image()
                sizes = _jpeg_size(image), _png_size(label)
                if sizes[0] is not None and sizes[0] != sizes[1]:
                    mismatched.append(f"{stem} (image {'x'.join(map(str, sizes[0]))}, "
                                      f"annotation {'x'.join(map(str, sizes[1]))})")
                    continue
                yield stem, {"image": image, "label": label, "file_name": stem}
            if count == 0:
                raise DataNotFoundError(
                    f"No images/{folder}/*.jpg found in {release}.\n{_HOW_TO_GET_IT}"
                )
            if mismatched:  # QA: every pair was trained on as "all ignored", exit 0
                listed = ", ".join(mismatched[:10]) + (
                    f" and {len(mismatched) - 10} more" if len(mismatched) > 10 else "")
                raise BadDataError(
                    f"{len(mismatched)} of {count} annotation(s) in {folder} of {release} are "
                    f"not the size of their image: {listed}. A label map holds one class per "
                    "pixel of its image (mmseg fails on such pairs too): put the release's own "
                    "files back (width x height above), then run again; nothing was prepared.")

        if release.suffix == ".zip":
            try:
                with zipfile.ZipFile(release) as archive:
                    yield from examples(_pairs_in_zip(archive, folder))
            except zipfile.BadZipFile as error:  # e.g. a member whose CRC does not match
                raise BadDataError(_damaged_zip(release, str(error))) from error
        else:
            yield from examples(_pairs_in_folder(release, folder))


def _download_config(manual_dir) -> tfds.download.DownloadConfig:
    # try_download_gcs=False: TFDS would otherwise look for a prepared copy online.
    return tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), try_download_gcs=False)


def _builder(data_dir) -> Ade20kSemantic:
    with tf_runtime.no_tfds_scratch():  # TFDS's empty scratch folder while not yet prepared
        return Ade20kSemantic(data_dir=os.path.expanduser(os.fspath(data_dir)))


def prepare_ade20k(*, data_dir, manual_dir) -> Ade20kSemantic:
    """Converts the manual download in `manual_dir` into TFDS records under `data_dir` (once;
    later calls reuse them). Returns the prepared builder. Never downloads anything."""
    find_ade20k_release(manual_dir)  # fail early, with instructions, before TFDS does
    builder = _builder(data_dir)
    builder.download_and_prepare(download_config=_download_config(manual_dir))
    return builder


def load_ade20k_builder(*, data_dir, manual_dir=None) -> Ade20kSemantic:
    """The prepared builder in `data_dir`, preparing it first from `manual_dir` if needed."""
    if data_dir is None:
        raise BadDataError(
            "source='ade20k' needs data_dir: the TFDS directory that holds (or will hold) the "
            "prepared ade20k_semantic records."
        )
    builder = _builder(data_dir)
    if builder.is_prepared():
        return builder
    if manual_dir is None:
        raise DataNotFoundError(
            f"ADE20K is not prepared in {data_dir} and no manual_dir was given. Run "
            "mae_jax.data.ade20k.prepare_ade20k(data_dir=..., manual_dir=...) or pass "
            f"manual_dir.\n{_HOW_TO_GET_IT}"
        )
    refuse_to_prepare("ade20k_semantic", data_dir, how_to=(
        "python -c 'from mae_jax.data.ade20k import prepare_ade20k; "
        f"prepare_ade20k(data_dir=\"{data_dir}\", manual_dir=\"{manual_dir}\")'"))
    return prepare_ade20k(data_dir=data_dir, manual_dir=manual_dir)
