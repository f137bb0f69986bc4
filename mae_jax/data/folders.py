"""`folder:` sources: torchvision's ImageFolder layout, listed once at start-up (O(files),
`os.walk` over `os.scandir`; no `stat`, no file opened), each process keeping its shard."""

import functools
import os
from typing import NamedTuple

from mae_jax.core.errors import BadDataError, DataNotFoundError

# What the pipeline decodes (`image_ops`: TensorFlow's JPEG / PNG / BMP / WebP decoders).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# torchvision's ImageFolder reads these too; a folder holding them is told they are left out.
UNREAD_EXTENSIONS = (".ppm", ".pgm", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation"),
                 "val": ("val", "validation"), "test": ("test",)}


def split_folder(path: str, split: str | None) -> str:
    """The folder holding `split` of folder source `path` (see `sources`' docstring)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise DataNotFoundError(f"image folder {path!r} does not exist (source 'folder:{path}')")
    has_splits = any(os.path.isdir(os.path.join(path, d)) for d in ("train", "val", "validation"))
    if not has_splits:
        if split in (None, "train"):
            return path
        raise BadDataError(f"folder {path!r} has no train/ or val/ sub-folders, so it is one split "
                           f"('train'), not {split!r}; add PATH/val/<class>/ for evaluation data")
    folders = SPLIT_FOLDERS.get(split or "validation")
    if folders is None:
        raise BadDataError(f"folder split {split!r} unknown: use one of {sorted(SPLIT_FOLDERS)}")
    for folder in folders:
        if os.path.isdir(os.path.join(path, folder)):
            return os.path.join(path, folder)
    if split is None:  # pictures: no validation folder, take the training one
        return os.path.join(path, "train")
    raise DataNotFoundError(f"folder {path!r} has no {folders[0]}/ sub-folder for split {split!r}: "
                            f"add PATH/{folders[0]}/<class>/<image>, or name a split it has")


def class_folders(directory: str) -> list[str]:
    """torchvision's `find_classes`: sub-folder names, sorted."""
    with os.scandir(directory) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())


def _loose_images(directory: str, extensions=IMAGE_EXTENSIONS) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(entry.name for entry in entries
                      if not entry.is_dir() and entry.name.lower().endswith(extensions))


def _walk(directory: str, with_loose: bool, unread: list[str] | None = None):
    """(path, label) in a fixed order: loose images (label -1) first, then each class folder as
    torchvision's `make_dataset` orders it (sorted(os.walk(...)), sorted names). Files of the
    UNREAD_EXTENSIONS (loose ones too, QA: a pretraining folder's were dropped without a word)
    are appended to `unread`."""
    if with_loose:
        for name in _loose_images(directory):
            yield os.path.join(directory, name), -1
        if unread is not None:
            unread.extend(os.path.join(directory, name)
                          for name in _loose_images(directory, UNREAD_EXTENSIONS))
    for label, name in enumerate(class_folders(directory)):
        for root, _, names in sorted(os.walk(os.path.join(directory, name), followlinks=True)):
            for file in sorted(names):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    yield os.path.join(root, file), label
                elif unread is not None and file.lower().endswith(UNREAD_EXTENSIONS):
                    unread.append(os.path.join(root, file))


class FolderListing(NamedTuple):
    total: int  # images in the whole split (all processes)
    paths: tuple[str, ...]  # this shard's images: every shard_count-th from shard_index on
    labels: tuple[int, ...]  # their class indices (-1: not in a class folder)
    classes: tuple[str, ...]  # class folder names, sorted; label i is classes[i]
    per_class: tuple[int, ...]  # images of each class in the whole split


def list_folder(directory: str, *, with_labels: bool, shard_index: int = 0,
                shard_count: int = 1) -> FolderListing:
    """Lists `directory` (a split folder); labelled listings leave out the loose images, and
    a folder without loose images gives one listing for both (one walk)."""
    # Loose files it cannot read count too: they are named (with no readable loose image
    # the walk yields the same paths either way, so `folder_paths_at` agrees).
    with_loose = not with_labels and bool(_loose_images(
        directory, IMAGE_EXTENSIONS + UNREAD_EXTENSIONS))
    # Keyed on the folder's mtime so that a changed folder is listed again.
    listing = _list_folder(directory, with_loose, shard_index, shard_count,
                           os.stat(directory).st_mtime_ns)
    if listing.total == 0:
        raise BadDataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in folder {directory!r}"
                           f"{' class sub-folders' if with_labels else ''}; point the source at a "
                           "folder of images (labelled data: one sub-folder per class)")
    empty = [name for name, count in zip(listing.classes, listing.per_class, strict=True)
             if not count]
    if with_labels and empty:
        raise DataNotFoundError(f"class folder(s) {empty[:5]} of {directory!r} hold no images "
                                "(torchvision refuses these too): add images or delete them")
    return listing


@functools.lru_cache(maxsize=16)
def _list_folder(directory, with_loose, shard_index, shard_count, _mtime) -> FolderListing:
    classes = tuple(class_folders(directory))
    total, paths, labels, per_class, unread = 0, [], [], [0] * len(classes), []
    for path, label in _walk(directory, with_loose, unread):
        if total % shard_count == shard_index:
            paths.append(path)
            labels.append(label)
        if label >= 0:
            per_class[label] += 1
        total += 1
    if unread:  # once per listing (cached)
        print(f"WARNING: {len(unread)} file(s) in {directory} are left out, e.g. {unread[0]}: "
              f"the pipeline decodes {'/'.join(IMAGE_EXTENSIONS)} (torchvision's ImageFolder "
              "would read them). Convert them to PNG to include them.", flush=True)
    return FolderListing(total, tuple(paths), tuple(labels), classes, tuple(per_class))


def folder_paths_at(directory: str, indices, *, with_labels: bool) -> list[str]:
    """The paths at global `indices` of the listing (one walk; no full list kept)."""
    wanted = set(indices)
    with_loose = not with_labels and bool(_loose_images(directory))
    found = {i: path for i, (path, _) in enumerate(_walk(directory, with_loose)) if i in wanted}
    return [found[i] for i in indices]
