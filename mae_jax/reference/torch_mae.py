"""Plain-PyTorch reference of the official MAE (facebookresearch/mae), for parity tests.

Behaviour follows the official `models_mae.py` and `util/pos_embed.py`, with the timm 0.3.2
`PatchEmbed` / `Block` / `Attention` / `Mlp` it builds on re-written here (no timm, no
torchvision), so that `state_dict()` keys are exactly the official checkpoint keys:
cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
mlp.fc2}.*, norm.*, mask_token, decoder_pos_embed, decoder_embed.*, decoder_blocks.{i}.*,
decoder_norm.*, decoder_pred.*.

Generalisations over the official code (each reduces to it for square images):
- image size may be an int or (H, W); the grid is (H/P, W/P) and the sin-cos embedding keeps
  the official layout (first D/2 dims from the column, then the row);
- `random_masking` / `forward*` accept an explicit `noise` tensor instead of drawing one;
- `patchify` uses `in_chans` instead of a hard-coded 3.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mae_jax.reference.torch_vit import Attention, Block, Mlp, PatchEmbed, _pair  # noqa: F401

# ViT widths / depths / heads; every MAE variant uses the 512-wide, 8-deep, 16-head decoder.
VARIANTS = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "small": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "base": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}
DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
FIXED_KEYS = ("pos_embed", "decoder_pos_embed")  # sin-cos, requires_grad=False in the official


# ------------------------------------------------------------------------- position embedding
def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: any shape, M positions -> [M, embed_dim] as [sin | cos], float64."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)  # official: np.float (= float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False
) -> np.ndarray:
    """-> [(1 +) gh*gw, embed_dim] float64, row-major over the (gh, gw) patch grid.

    First embed_dim/2 dims encode the column (w), the second half the row (h): the official
    meshgrid(w, h) puts w in grid[0] and then names it "emb_h".
    """
    assert embed_dim % 2 == 0
    grid_h_size, grid_w_size = _pair(grid_size)
    grid_h = np.arange(grid_h_size, dtype=np.float32)
    grid_w = np.arange(grid_w_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # [2, gh, gw]; grid[0] = column
    emb_first = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_second = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    pos_embed = np.concatenate([emb_first, emb_second], axis=1)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def _resize_pos_tokens(pos_embed: torch.Tensor, num_extra: int, new_grid) -> torch.Tensor:
    """pos_embed: [1, extra + s*s, D] (square source grid) -> [1, extra + gh*gw, D]."""
    dim = pos_embed.shape[-1]
    orig_size = int((pos_embed.shape[-2] - num_extra) ** 0.5)
    new_grid = _pair(new_grid)
    if (orig_size, orig_size) == new_grid:
        return pos_embed
    extra_tokens = pos_embed[:, :num_extra]
    pos_tokens = pos_embed[:, num_extra:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, dim).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=new_grid, mode="bicubic", align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


def interpolate_pos_embed(model: MaskedAutoencoderViT, checkpoint_model: dict) -> None:
    """Official util/pos_embed.py: bicubically resize checkpoint_model['pos_embed'] in place.

    Source grid is square (as in the official); the target is the model's patch grid. Extra
    (cls) tokens are kept unchanged. Accepts torch tensors or numpy arrays.
    """
    if "pos_embed" not in checkpoint_model:
        return
    value = checkpoint_model["pos_embed"]
    as_numpy = isinstance(value, np.ndarray)
    pos_embed = torch.from_numpy(value) if as_numpy else value
    num_extra = model.pos_embed.shape[-2] - model.patch_embed.num_patches
    resized = _resize_pos_tokens(pos_embed, num_extra, model.patch_embed.grid_size)
    if resized is not pos_embed:
        checkpoint_model["pos_embed"] = resized.numpy() if as_numpy else resized


def interpolate_pos_embed_array(pos_embed: np.ndarray, new_grid) -> np.ndarray:
    """pos_embed: [1, 1 + s*s, D] -> [1, 1 + gh*gw, D] (cls kept), computed in its own dtype."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, 1+L, D], got {pos_embed.shape}")
    out = _resize_pos_tokens(torch.from_numpy(np.asarray(pos_embed)), 1, new_grid)
    return out.numpy().copy()


# ------------------------------------------------------------------------- timm 0.3.2 layers
class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        norm_pix_loss=False,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False
        )
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        for param in (self.pos_embed, self.decoder_pos_embed):
            table = get_2d_sincos_pos_embed(param.shape[-1], grid, cls_token=True)
            param.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
        # Patch embedding initialised like a Linear on its (D, C*P*P) view.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> [N, L, P*P*C], feature = (row_in_patch*P + col)*C + channel."""
        p = self.patch_embed.patch_size[0]
        n, c, height, width = imgs.shape
        assert height % p == 0 and width % p == 0
        h, w = height // p, width // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor, grid_size=None) -> torch.Tensor:
        """x: [N, L, P*P*C] -> imgs [N, C, H, W]; grid defaults to the model's patch grid."""
        p = self.patch_embed.patch_size[0]
        h, w = _pair(grid_size) if grid_size is not None else self.patch_embed.grid_size
        assert h * w == x.shape[1]
        c = x.shape[2] // (p * p)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise=None):
        """x: [N, L, D] -> x_masked [N, len_keep, D], mask [N, L] (1 = removed), ids_restore [N, L].

        noise: optional [N, L] in [0, 1); small noise is kept. Drawn with torch.rand if None.
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        noise = torch.as_tensor(noise, device=x.device)
        if tuple(noise.shape) != (n, length):
            raise ValueError(f"noise must be [N, L] = {(n, length)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise=None):
        """imgs: [N, C, H, W] -> latent [N, 1 + len_keep, D], mask [N, L], ids_restore [N, L]."""
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x: [N, 1 + len_keep, D], ids_restore: [N, L] -> pred [N, L, P*P*C]."""
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> loss target [N, L, P*P*C] (per-patch normalised if norm_pix)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as torch's default
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask):
        """imgs: [N, C, H, W], pred: [N, L, P*P*C], mask: [N, L] (1 = removed) -> scalar."""
        loss = ((pred - self.forward_target(imgs)) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio: float = 0.75, noise=None):
        """imgs: [N, C, H, W] -> (loss, pred [N, L, P*P*C], mask [N, L])."""
        loss, pred, mask, _ = self.forward_with_ids_restore(imgs, mask_ratio, noise)
        return loss, pred, mask

    def forward_with_ids_restore(self, imgs, mask_ratio: float = 0.75, noise=None):
        """Like forward, plus ids_restore [N, L]."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask, ids_restore


# ------------------------------------------------------------------------------- helpers
def build_mae(variant: str, **overrides) -> MaskedAutoencoderViT:
    """A named variant (see VARIANTS) with the official decoder; overrides win."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return MaskedAutoencoderViT(**{**VARIANTS[variant], **DECODER, **overrides})


def is_encoder_key(name: str) -> bool:
    """Keys present in encoder-only checkpoints (mae_pretrain_vit_*.pth)."""
    return not (name.startswith("decoder") or name == "mask_token")


def count_params(
    model: nn.Module, encoder_only: bool = False, include_fixed: bool = False
) -> int:
    """Parameter count; trainable only (no sin-cos pos embeds) unless include_fixed."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if (include_fixed or p.requires_grad) and (not encoder_only or is_encoder_key(name))
    )


def official_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    """state_dict in the official key format, as float32 numpy arrays."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def load_numpy_state_dict(model: nn.Module, state: dict, strict: bool = True) -> None:
    """Inverse of official_state_dict (strict=False for encoder-only checkpoints)."""
    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=strict)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Set every learned parameter to random values so parity tests exercise all of them.

    LayerNorm weights ~ 1 + N(0, 0.2), other 1-D params (biases) ~ N(0, 0.2), matrices and
    kernels ~ N(0, 1/fan_in), tokens ~ N(0, 0.5). The fixed sin-cos pos embeds are left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_prefixes = tuple(n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm))
    for name, param in model.named_parameters():
        if name in FIXED_KEYS:
            continue
        noise = torch.randn(param.shape, generator=gen)
        if name in ("cls_token", "mask_token"):
            value = 0.5 * noise
        elif param.ndim == 1:
            is_norm_weight = name.endswith(".weight") and name[: -len(".weight")] in norm_prefixes
            value = 1.0 + 0.2 * noise if is_norm_weight else 0.2 * noise
        else:
            value = noise / math.sqrt(math.prod(param.shape[1:]))
        param.copy_(value.to(param.dtype))
    return model
