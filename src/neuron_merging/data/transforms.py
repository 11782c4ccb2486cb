"""Vectorised image transforms: normalisation and the CIFAR training augmentation.

Everything works on whole ``(B, C, H, W)`` batches with torch ops (no per-image
Python loops), and all randomness is drawn from an explicit
:class:`torch.Generator` on the CPU, so augmentation is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core.errors import ConfigError


def _channel_stats(
    mean: Sequence[float], std: Sequence[float], channels: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"mean/std have {len(mean)}/{len(std)} entries but the images have {channels} channels"
        )
    m = torch.tensor(tuple(mean), dtype=torch.float32, device=device).view(1, channels, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32, device=device).view(1, channels, 1, 1)
    return m, s


def normalize_uint8(
    images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Turn uint8 ``(N, C, H, W)`` pixels into float32 ``(x / 255 - mean) / std``.

    This is what ``ToTensor()`` followed by ``Normalize(mean, std)`` computes.
    """
    if isinstance(images, np.ndarray):
        if not images.flags.writeable:
            images = images.copy()
        images = torch.from_numpy(images)
    m, s = _channel_stats(mean, std, images.shape[1], images.device)
    out = images.to(torch.float32).div_(255.0)
    return out.sub_(m).div_(s)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize_uint8` (up to rounding): back to the ``[0, 1]`` scale."""
    m, s = _channel_stats(mean, std, images.shape[1], images.device)
    return images * s + m


def pad_value(mean: Sequence[float], std: Sequence[float]) -> tuple[float, ...]:
    """Per-channel value of a raw 0 pixel after normalisation: ``(0 - mean) / std``.

    Zero-padding the raw image before normalising equals padding the normalised image
    with this value, which is how the augmentation pads.
    """
    return tuple((0.0 - m) / s for m, s in zip(mean, std, strict=True))


def crop_flip(
    images: torch.Tensor,
    offsets: torch.Tensor,
    flip: torch.Tensor,
    padding: int = 4,
    fill: Sequence[float] | torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Pad, crop and optionally mirror every image of a batch with explicit parameters.

    Args:
        images: ``(B, C, H, W)`` float batch.
        offsets: ``(B, 2)`` integer ``(top, left)`` crop offsets into the padded image,
            each in ``[0, 2 * padding]``; ``(padding, padding)`` is the identity crop.
        flip: ``(B,)`` bool mask; ``True`` mirrors that image left-right after cropping.
        padding: border added on every side before cropping.
        fill: value of the border, a scalar or one value per channel.

    Returns:
        A new ``(B, C, H, W)`` tensor. The crop and the flip are one gather, so the cost
        is a single pass over the batch regardless of ``B``.
    """
    if images.ndim != 4:
        raise ConfigError(f"expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if padding < 0:
        raise ConfigError(f"padding must be >= 0, got {padding}")
    b, c, h, w = images.shape
    device = images.device
    offsets = offsets.to(device=device, dtype=torch.long)
    flip = flip.to(device=device, dtype=torch.bool)
    if offsets.shape != (b, 2) or flip.shape != (b,):
        raise ConfigError(
            f"offsets must be ({b}, 2) and flip ({b},), got {tuple(offsets.shape)} and "
            f"{tuple(flip.shape)}"
        )
    if b and (int(offsets.min()) < 0 or int(offsets.max()) > 2 * padding):
        raise ConfigError(f"crop offsets must lie in [0, {2 * padding}]")
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=device).reshape(-1)
    if fill_t.numel() not in (1, c):
        raise ConfigError(f"fill needs 1 or {c} values, got {fill_t.numel()}")
    padded = fill_t.view(1, -1, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = images
    rows = offsets[:, :1] + torch.arange(h, device=device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # Gather on a channels-last view: index (batch, row, col) -> (B, H, W, C).
    out = padded.permute(0, 2, 3, 1)[
        torch.arange(b, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]
    ]
    return out.permute(0, 3, 1, 2).contiguous()


def random_crop_flip(
    images: torch.Tensor,
    padding: int = 4,
    fill: Sequence[float] | torch.Tensor | float = 0.0,
    flip_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CIFAR training augmentation: random crop of the original size after padding, then a
    random horizontal flip with probability ``flip_prob``, drawn independently per image.

    Randomness comes from ``generator`` (a CPU generator; the global RNG when ``None``),
    first the ``(B, 2)`` offsets, then the ``(B,)`` flip draws, so a given seed always
    yields the same batch.
    """
    b = images.shape[0]
    rng_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator, device=rng_device)
    flip = torch.rand(b, generator=generator, device=rng_device) < flip_prob
    return crop_flip(images, offsets, flip, padding=padding, fill=fill)
