"""Figures logged with every run: the attention-map grid (tracking draws it in ``on_end``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAP_MAX_SIDE = 64  # attention map cells a side in the PNG


def save_attention_maps(maps: Any, path: Path, max_side: int = MAP_MAX_SIDE) -> None:
    """A grid of attention maps (rows: layers, columns: heads), mean-pooled to at most ``max_side`` cells a side,
    each query row scaled to its own maximum: where each query looks stays visible in long, diffuse or causal maps
    (a causal map's first row, weight 1, would otherwise wash out the rest). Drawn with a colormap lookup and PIL,
    not a matplotlib figure: a few ms, paid once per run."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    maps = np.asarray(maps, dtype=np.float32)  # (L, H, T, T)
    layers, heads, t, _ = maps.shape
    pool = -(-t // max_side)  # ceil: T=256 -> 4x4 blocks of 64 x 64 cells
    if pool > 1:
        side = -(-t // pool) * pool
        maps = np.pad(maps, [(0, 0), (0, 0), (0, side - t), (0, side - t)])
        maps = maps.reshape(layers, heads, side // pool, pool, side // pool, pool).mean(axis=(3, 5))
        t = side // pool
    maps = maps / np.maximum(maps.max(axis=3, keepdims=True), 1e-12)
    gap = max(1, t // 16)
    tiles = np.full((layers, heads, t + gap, t + gap), np.nan, dtype=np.float32)
    tiles[:, :, :t, :t] = maps
    grid = tiles.transpose(0, 2, 1, 3).reshape(layers * (t + gap), heads * (t + gap))[:-gap, :-gap]  # (L*T', H*T')
    zoom = max(1, min(4, 800 // grid.shape[1]))  # screen pixels per cell
    rgb = (colormaps["viridis"](np.nan_to_num(grid))[..., :3] * 255).astype(np.uint8)  # (L*T', H*T', 3)
    rgb[np.isnan(grid)] = 255  # white gaps between maps
    image = Image.fromarray(rgb.repeat(zoom, axis=0).repeat(zoom, axis=1))
    pooled = f", {pool}x{pool} mean-pooled" if pool > 1 else ""
    title = f"attention of one validation sample (rows: queries, each / its max{pooled})"
    left, top, bottom = 52, 18, 16  # room for the labels
    canvas = Image.new("RGB", (max(image.width + left + 4, 8 * len(title)), image.height + top + bottom), "white")
    canvas.paste(image, (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 3), title, fill="black")
    for j in range(heads):
        draw.text((left + int((j * (t + gap) + t / 2) * zoom) - 6, top + image.height + 2), f"h{j}", fill="black")
    for i in range(layers):
        draw.text((2, top + int((i * (t + gap) + t / 2) * zoom) - 5), f"layer {i}", fill="black")
    canvas.save(path)
