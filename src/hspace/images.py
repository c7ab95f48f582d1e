"""Images: tensors in [-1, 1] to PNG, and labelled grids (rows: directions, columns: scales)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import HspaceError
from .files import safe_name, save_image, unique_names


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[..., C, H, W] in [-1, 1] -> [..., H, W, C] uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image [C, H, W] in [-1, 1] (1 or 3 channels)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise HspaceError(f"expected an image [C, H, W] with 1 or 3 channels, got shape {tuple(image.shape)}")
    array = to_uint8(image)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_images(images: torch.Tensor, folder: str | Path, names: Sequence[str]) -> list[Path]:
    """Write each image [B, C, H, W] to ``folder/name.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(names) != len(images):
        raise HspaceError(f"{len(names)} names for {len(images)} images")
    names = unique_names([safe_name(n, "image", ".png")[: -len(".png")] for n in names])  # two images of one name: both kept
    return [save_image(to_pil(image), folder / f"{name}.png") for image, name in zip(images, names)]


def labelled_grid(
    images: torch.Tensor,
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    min_cell: int = 96,
    pad: int = 2,
) -> Image.Image:
    """A grid of images [R, C, 3, H, W] with labels left of the rows and above the columns.

    Small images are enlarged (nearest neighbour) to at least ``min_cell`` pixels so labels fit.
    """
    if images.ndim != 5:
        raise HspaceError(f"a grid takes images [rows, cols, C, H, W], got shape {tuple(images.shape)}")
    rows, cols = images.shape[:2]
    for labels, n, what in ((row_labels, rows, "row"), (col_labels, cols, "column")):
        if labels and len(labels) != n:
            raise HspaceError(f"{len(labels)} {what} labels for {n} {what}s")
    h, w = images.shape[-2:]
    zoom = max(1, -(-min_cell // max(h, w)))
    ch, cw = h * zoom, w * zoom
    font = ImageFont.load_default()
    text_h = 14
    left = 8 + max((int(font.getlength(s)) for s in row_labels), default=-8)
    top = text_h + 4 if col_labels else 0
    canvas = Image.new("RGB", (left + cols * (cw + pad) + pad, top + rows * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = to_uint8(images)
    for r in range(rows):
        y = top + pad + r * (ch + pad)
        if row_labels:
            draw.text((4, y + ch // 2 - text_h // 2), row_labels[r], fill="black", font=font)
        for c in range(cols):
            x = left + pad + c * (cw + pad)
            tile = Image.fromarray(pixels[r, c] if pixels.shape[-1] == 3 else pixels[r, c, ..., 0])
            canvas.paste(tile.resize((cw, ch), Image.NEAREST), (x, y))
    for c, label in enumerate(col_labels):
        x = left + pad + c * (cw + pad) + cw // 2 - int(font.getlength(label)) // 2
        draw.text((x, 2), label, fill="black", font=font)
    return canvas
