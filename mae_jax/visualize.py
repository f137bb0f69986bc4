"""Reconstruction figures: masked | reconstruction | reconstruction + visible | original.

As a command, from any checkpoint (an official `.pth`, e.g. mae_visualize_vit_large.pth, or a
train.py workdir) on your own images, one row per image and mask ratio:

    python -m mae_jax.visualize --checkpoint=mae_visualize_vit_base.pth \
        --images=cat.jpg,dog.png --mask_ratios=0.75,0.85,0.95 --out=reconstructions.png
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.core.errors import BadDataError, BadInputError, WeightsError
from mae_jax.data.constants import IMAGENET_MEAN, IMAGENET_STD, denormalize
from mae_jax.models.mae import MAE, num_visible


def reconstruct(
    model: MAE, images: jax.Array, *, noise: jax.Array, mask_ratio: float
) -> dict[str, jax.Array]:
    """images: normalised [N, H, W, C] -> dict of [N, H, W, C] images in the same space.

    With norm_pix_loss the predictions are per-patch normalised, so they are mapped back with
    each patch's own mean and variance (what a viewer expects to see).
    """
    out = model.forward(images, noise=noise, mask_ratio=mask_ratio)
    pred, mask = out["pred"].astype(jnp.float32), out["mask"]
    if model.norm_pix_loss:
        target = model.patchify(images)
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        pred = pred * jnp.sqrt(var + 1.0e-6) + mean
    patch_mask = model.unpatchify(jnp.broadcast_to(mask[..., None], pred.shape))
    reconstruction = model.unpatchify(pred)
    return {
        "masked": images * (1 - patch_mask),
        "reconstruction": reconstruction,
        "pasted": images * (1 - patch_mask) + reconstruction * patch_mask,
        "original": images,
        "mask": patch_mask,
    }


def to_uint8(images) -> np.ndarray:
    return np.clip(np.asarray(denormalize(np.asarray(images))) * 255.0, 0, 255).astype(np.uint8)


def figure_rows(parts: dict[str, jax.Array], *, min_height: int = 96) -> np.ndarray:
    """uint8 [N*H', 4*W', C]: one row per image, masked | reconstruction | pasted | original.

    Removed patches of the masked view are grey; small images are enlarged (nearest) to
    `min_height` so that a figure of 32x32 inputs can be read.
    """
    masked = to_uint8(parts["masked"])
    mask = np.asarray(parts["mask"]) > 0.5
    masked = np.where(mask, np.uint8(128), masked)
    row = [masked] + [to_uint8(parts[k]) for k in ("reconstruction", "pasted", "original")]
    rows = np.concatenate(row, axis=2)
    scale = max(1, min_height // rows.shape[1])
    rows = rows.repeat(scale, axis=1).repeat(scale, axis=2)
    return rows.reshape(-1, *rows.shape[2:])


def load_images(paths: list[str], size: int | tuple[int, int]) -> np.ndarray:
    """Image files (any format PIL reads) -> normalised float32 [N, H, W, 3] (resize + crop)."""
    from PIL import Image

    size = (size, size) if isinstance(size, int) else tuple(size)  # QA: an int was a TypeError
    out = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                if opened.mode.startswith("I;16") or opened.mode == "I":  # 16-bit grey
                    # Its high byte, as TensorFlow decodes it for training (PIL's
                    # convert("RGB") clips it to white).
                    wide = np.clip(np.asarray(opened, np.int64), 0, 65535) >> 8
                    opened = Image.fromarray(wide.astype(np.uint8))
                image = opened.convert("RGB")  # reads every pixel: a truncated file fails here
        except (OSError, SyntaxError, ValueError) as error:  # PIL's unreadable / truncated
            raise BadDataError(f"image {path} cannot be read ({error}); give an image file "
                               "PIL opens (JPEG, PNG, ...)") from None
        scale = max(size[0] / image.height, size[1] / image.width)
        width = max(size[1], round(image.width * scale))
        height = max(size[0], round(image.height * scale))
        resized = image.resize((width, height), Image.BICUBIC)
        top = (resized.height - size[0]) // 2
        left = (resized.width - size[1]) // 2
        crop = resized.crop((left, top, left + size[1], top + size[0]))
        out.append(np.asarray(crop, np.float32) / 255.0)
    images = np.stack(out)
    return ((images - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)).astype(np.float32)


def load_model(checkpoint: str, **overrides) -> MAE:
    """An MAE from an official .pth file, a train.py workdir (newest checkpoint) or an export.

    overrides: for .pth files, model arguments the weights cannot tell (num_heads and
    decoder_num_heads of unnamed sizes, norm_pix_loss).
    """
    from mae_jax.weights.load import load_model as load

    model = load(checkpoint, **overrides)  # what the file holds, so a wrong kind is named
    if not isinstance(model, MAE):
        raise WeightsError(
            f"{checkpoint} holds a {type(model).__name__}, not an MAE with its decoder: "
            "reconstructions need a full MAE (a train.py run or an mae_visualize_*.pth)."
        )
    return model


def render(
    model: MAE, images: np.ndarray, *, mask_ratios: list[float], seed: int = 0
) -> np.ndarray:
    """uint8 figure: for each image, one row per mask ratio."""
    model.eval()
    rows = []
    forward = nnx.jit(reconstruct, static_argnames="mask_ratio")
    for index, ratio in enumerate(mask_ratios):
        noise = model.make_noise(jax.random.key(seed + index), images.shape[0])
        rows.append(figure_rows(forward(model, jnp.asarray(images), noise=noise, mask_ratio=ratio)))
    # Interleave: image 0 at every ratio, then image 1, ...
    per_image = [np.split(r, images.shape[0], axis=0) for r in rows]
    return np.concatenate([rows_of[i] for i in range(images.shape[0]) for rows_of in per_image])


def main(argv=None) -> None:
    import argparse

    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official .pth (mae_visualize_*), "
                        "Hugging Face ViTMAE folder or train.py workdir")
    parser.add_argument("--images", required=True, help="comma-separated image files")
    parser.add_argument("--mask_ratios", default="0.75,0.85,0.95")
    parser.add_argument("--out", default="reconstructions.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                        help="the .pth was (not) trained on normalised pixels (default: what "
                             "the file records, else not)")
    parser.add_argument("--num_heads", type=int, default=0, help="for unnamed encoder sizes")
    parser.add_argument("--decoder_num_heads", type=int, default=0)
    args = parser.parse_args(argv)
    paths = [p for p in args.images.split(",") if p]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        parser.error(f"image file(s) not found: {', '.join(missing)}")
    try:
        ratios = [float(r) for r in args.mask_ratios.split(",")]
    except ValueError:
        parser.error(f"--mask_ratios={args.mask_ratios}: give numbers, e.g. 0.75,0.9")
    if not all(0 < r < 1 for r in ratios):
        parser.error(f"--mask_ratios={args.mask_ratios}: each must be in (0, 1) (0 removes no "
                     "patch: nothing to reconstruct; 1 removes every patch: nothing left to "
                     "reconstruct from)")
    if not os.path.exists(args.checkpoint):
        parser.error(f"checkpoint not found: {args.checkpoint}")
    # --out is checked before the model is loaded and run (minutes for a large one on a CPU).
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        parser.error(f"--out={args.out}: give an image file name, e.g. reconstructions.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out={args.out}: the folder {os.path.dirname(args.out)} does not exist")
    overrides = {} if args.norm_pix_loss is None else {"norm_pix_loss": args.norm_pix_loss}
    for name in ("num_heads", "decoder_num_heads"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    try:
        model = load_model(args.checkpoint, **overrides)
    except (BadInputError, ValueError) as error:  # incl. official-only options for a run
        parser.error(f"--checkpoint={args.checkpoint}: {error}")
    for ratio in ratios:
        try:
            num_visible(model.num_patches, ratio)
        except ValueError as error:
            parser.error(f"--mask_ratios={args.mask_ratios}: {error}")
    try:
        images = load_images(paths, model.encoder.image_size)
    except BadDataError as error:
        parser.error(f"--images: {error}")
    figure = render(model, images, mask_ratios=ratios, seed=args.seed)
    Image.fromarray(figure).save(args.out)
    print(json.dumps({"out": args.out, "rows": len(paths) * len(ratios), "mask_ratios": ratios}))


if __name__ == "__main__":
    main()
