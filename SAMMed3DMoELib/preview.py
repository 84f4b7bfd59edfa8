"""A three-plane preview PNG of a mask over its image (radiological display, as 3D Slicer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import SAMMed3DError
from .files import temp_name

CT_DISPLAY_WINDOW = (-160.0, 240.0)
"""Soft-tissue window (level 40, width 400 HU) for CT previews."""

PREVIEW_LONGEST_MM_PX = 384
"""The image's longest physical extent spans this many preview pixels."""

OVERLAY_RGB = (255, 40, 40)
OVERLAY_ALPHA = 0.45
MARKER_RGB = (40, 255, 40)
LETTER_RGB = (255, 220, 0)


def render_preview(volume, mask, centre_ras, *, ct: bool, prompts: Sequence[dict] = ()):
    """A PIL image with the axial, coronal and sagittal planes through ``centre_ras`` (RAS mm), the
    mask as a semi-transparent overlay with its outline, and a list describing each panel.

    Display convention (3D Slicer's, the radiological one): axial and coronal show the patient's
    right on the viewer's left; axial has anterior up, coronal and sagittal superior up; sagittal
    has anterior on the left. The volume is first brought to the closest RAS axis order (axes
    permuted and flipped only, so an oblique scan is shown along its own axes), and each panel is
    scaled so that one pixel is the same number of millimetres in both directions.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from . import geometry

    P, axes, flips = geometry.canonical_transform(volume.affine, volume.shape)

    def canonical(array):
        a = np.transpose(np.asarray(array), axes)
        for axis in range(3):
            if flips[axis]:
                a = np.flip(a, axis)
        return a

    image = canonical(volume.array)
    labels = canonical(mask).astype(bool)
    affine = volume.affine @ P
    inverse = np.linalg.inv(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shape = np.asarray(image.shape)
    centre_index = inverse[:3, :3] @ np.asarray(centre_ras, dtype=float) + inverse[:3, 3]
    slice_index = np.clip(np.floor(centre_index + 0.5), 0, shape - 1).astype(int)

    if ct:
        low, high = CT_DISPLAY_WINDOW
    else:
        flat = np.asarray(volume.array).reshape(-1)
        sample = flat[:: max(1, flat.size // 2_000_000)].astype(np.float64)
        low, high = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    if not high > low:
        high = low + 1.0

    scale = PREVIEW_LONGEST_MM_PX / float(np.max(shape * spacing))  # pixels per mm
    letters = {2: ("R", "L", "A", "P"), 1: ("R", "L", "S", "I"), 0: ("A", "P", "S", "I")}
    specs = [("axial", 2, 0, 1), ("coronal", 1, 0, 2), ("sagittal", 0, 1, 2)]  # (name, fixed, col, row)
    font = ImageFont.load_default()
    margin, header = 8, 20

    def to_panel(index, col_axis, row_axis, width, height):
        """Canonical (fractional) index -> panel pixel (x, y); columns and rows run reversed."""
        x = (shape[col_axis] - 0.5 - index[col_axis]) * width / shape[col_axis]
        y = (shape[row_axis] - 0.5 - index[row_axis]) * height / shape[row_axis]
        return x, y

    tiles = []
    for name, fixed, col_axis, row_axis in specs:
        plane = np.take(image, slice_index[fixed], axis=fixed).astype(np.float64)
        plane_mask = np.take(labels, slice_index[fixed], axis=fixed)
        plane = plane.T[::-1, ::-1]  # rows: row_axis high -> low; columns: col_axis high -> low
        plane_mask = plane_mask.T[::-1, ::-1]
        width = max(1, int(round(shape[col_axis] * spacing[col_axis] * scale)))
        height = max(1, int(round(shape[row_axis] * spacing[row_axis] * scale)))
        gray = np.clip((plane - low) / (high - low), 0.0, 1.0) * 255.0
        gray_img = Image.fromarray(np.ascontiguousarray(gray.astype(np.uint8)), mode="L").resize(
            (width, height), Image.BILINEAR)
        mask_img = Image.fromarray(np.ascontiguousarray(plane_mask.astype(np.uint8) * 255), mode="L").resize(
            (width, height), Image.NEAREST)
        rgb = np.repeat(np.asarray(gray_img, dtype=np.float64)[:, :, None], 3, axis=2)
        inside = np.asarray(mask_img) > 127
        colour = np.asarray(OVERLAY_RGB, dtype=np.float64)
        rgb[inside] = (1.0 - OVERLAY_ALPHA) * rgb[inside] + OVERLAY_ALPHA * colour
        padded = np.pad(inside, 1, mode="constant")
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        rgb[inside & ~interior] = colour
        tile = Image.fromarray(np.ascontiguousarray(rgb.round().astype(np.uint8)), mode="RGB")
        draw = ImageDraw.Draw(tile)
        # prompt marks: the centre as a cross, a box as its outline
        cx, cy = to_panel(centre_index, col_axis, row_axis, width, height)
        arm = max(4, min(width, height) // 30)
        draw.line([(cx - arm, cy), (cx + arm, cy)], fill=MARKER_RGB)
        draw.line([(cx, cy - arm), (cx, cy + arm)], fill=MARKER_RGB)
        for p in prompts:
            if p.get("type") == "box":
                corners = np.array([[a, b, c] for a in (p["ras_min"][0], p["ras_max"][0])
                                    for b in (p["ras_min"][1], p["ras_max"][1])
                                    for c in (p["ras_min"][2], p["ras_max"][2])])
                idx = corners @ inverse[:3, :3].T + inverse[:3, 3]
                pts = [to_panel(i, col_axis, row_axis, width, height) for i in idx]
                xs, ys = [q[0] for q in pts], [q[1] for q in pts]
                draw.rectangle([min(xs), min(ys), max(xs), max(ys)], outline=MARKER_RGB)
        left, right, top, bottom = letters[fixed]
        for xy, letter in (((3, height / 2 - 5), left), ((width - 10, height / 2 - 5), right),
                           ((width / 2 - 3, 2), top), ((width / 2 - 3, height - 13), bottom)):
            _outlined_text(draw, xy, letter, font)
        plane_ras = affine[:3, :3] @ slice_index + affine[:3, 3]
        axis_letter = "RAS"[fixed]
        title = f"{name.capitalize()}  {axis_letter} {plane_ras[fixed]:.1f} mm"
        tiles.append((name, tile, title, int(slice_index[fixed]), int(np.count_nonzero(plane_mask))))

    total_width = margin + sum(t[1].width + margin for t in tiles)
    total_height = header + max(t[1].height for t in tiles) + margin
    canvas = Image.new("RGB", (total_width, total_height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    panels = []
    x = margin
    for name, tile, title, index, count in tiles:
        canvas.paste(tile, (x, header))
        draw.text((x, 4), title, fill=(255, 255, 255), font=font)
        panels.append({"name": name, "box": [x, header, x + tile.width, header + tile.height],
                       "slice_index": index, "mask_pixels_in_slice": count, "mm_per_pixel": round(1.0 / scale, 6)})
        x += tile.width + margin
    return canvas, panels


def _outlined_text(draw, xy, text: str, font) -> None:
    """Yellow text with a dark outline, readable on bright and dark image parts alike."""
    try:
        draw.text(xy, text, fill=LETTER_RGB, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    except (TypeError, ValueError):  # bitmap fonts without stroke support
        draw.text(xy, text, fill=LETTER_RGB, font=font)


def write_preview(path: Path, volume, mask, centre_ras, *, ct: bool, prompts: Sequence[dict] = ()) -> dict:
    """Render the preview and write it as a PNG (atomically); returns {path, size, panels}."""
    canvas, panels = render_preview(volume, mask, centre_ras, ct=ct, prompts=prompts)
    tmp = temp_name(path)
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        raise SAMMed3DError(f"could not write the preview {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": os.path.abspath(path), "size": [canvas.width, canvas.height], "panels": panels}

