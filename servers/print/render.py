"""The virtual printer: film layout and the grayscale pipeline, rendered with Pillow.

Pipeline per image (digest §13.3): decode -> polarity / MONOCHROME1 inversion ->
Presentation LUT (IDENTITY, LIN OD or an explicit LUT) -> P-value to optical density
through the Grayscale Standard Display Function (PS3.14) for the illumination and
reflected ambient light in effect -> density quantized to the printing bit depth ->
output gray. Each film yields an 8-bit PNG "as viewed" (perceptually linear: equal
steps of the GSDF's JND index are equal gray steps), a 16-bit PNG density map holding
round(D x 1000), and a JSON sidecar with the effective attributes.

>>> round(optical_density(0.0, 1.0, 2000, 10, 0.20, 3.00), 3)
2.999
>>> round(optical_density(1.0, 1.0, 2000, 10, 0.20, 3.00), 3)
0.2
"""

from __future__ import annotations

import math
import sys
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from servers.print.tables import FILM_INCHES, FILM_MATRIX

# PS3.14 §7.1: L(j) as a rational polynomial in ln j, yielding log10 L.
_A, _B, _C, _D, _E = -1.3011877, -2.5840191e-2, 8.0242636e-2, -1.0320229e-1, 1.3646699e-1
_F, _G, _H, _K, _M = 2.8745620e-2, -2.5468404e-2, -3.1978977e-3, 1.2992634e-4, 1.3635334e-3
# Inverse: j(L) as a polynomial in log10 L.
_INV = (
    71.498068,
    94.593053,
    41.912053,
    9.8247004,
    0.28175407,
    -1.1878455,
    -0.18014349,
    0.14710899,
    -0.017046845,
)

DEFAULT_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)


def gsdf_luminance(j: float) -> float:
    """Luminance (cd/m²) of JND index ``j`` (1..1023)."""
    j = min(max(j, 1.0), 1023.0)
    x = math.log(j)
    num = _A + _C * x + _E * x**2 + _G * x**3 + _M * x**4
    den = 1 + _B * x + _D * x**2 + _F * x**3 + _H * x**4 + _K * x**5
    return float(10 ** (num / den))


def gsdf_index(luminance: float) -> float:
    """JND index of ``luminance`` (cd/m²), clamped to 1..1023."""
    x = math.log10(min(max(luminance, 0.05), 4000.0))
    j = sum(c * x**i for i, c in enumerate(_INV))
    return min(max(j, 1.0), 1023.0)


def luminance_of_density(density: float, illumination: float, ambient: float) -> float:
    return ambient + illumination * 10 ** (-density)


@lru_cache(maxsize=64)
def _index_range(
    illumination: float, ambient: float, d_min: float, d_max: float
) -> tuple[float, float]:
    """JND indices of the darkest and the lightest density (constant for a film)."""
    return (
        gsdf_index(luminance_of_density(d_max, illumination, ambient)),
        gsdf_index(luminance_of_density(d_min, illumination, ambient)),
    )


def optical_density(
    p: float, p_max: float, illumination: float, ambient: float, d_min: float, d_max: float
) -> float:
    """Density for P-value ``p`` of ``p_max`` (PS3.14 §7.2, D.2.2)."""
    j_min, j_max = _index_range(illumination, ambient, d_min, d_max)
    j = j_min + (p / p_max) * (j_max - j_min) if p_max else j_min
    lum = gsdf_luminance(j)
    if lum <= ambient:
        return d_max
    d = -math.log10((lum - ambient) / illumination)
    return min(max(d, d_min), d_max)


@dataclass(frozen=True)
class Tone:
    """The film's density frame: Min/Max Density (OD), light, and printing depth."""

    d_min: float
    d_max: float
    illumination: float
    ambient: float
    printing_bits: int = 12

    def quantize(self, d: float) -> float:
        levels = (1 << self.printing_bits) - 1
        if self.d_max <= self.d_min:
            return self.d_min
        step = (self.d_max - self.d_min) / levels
        return self.d_min + round((d - self.d_min) / step) * step

    def gray(self, d: float) -> int:
        """8-bit gray of density ``d`` as viewed: linear in the GSDF JND index."""
        j_dark, j_light = _index_range(self.illumination, self.ambient, self.d_min, self.d_max)
        if j_light <= j_dark:
            return 255
        j = gsdf_index(luminance_of_density(d, self.illumination, self.ambient))
        return max(0, min(255, round(255 * (j - j_dark) / (j_light - j_dark))))


@dataclass(frozen=True)
class Lut:
    """A Presentation LUT: a shape, or explicit data with its output bit depth."""

    shape: str = "IDENTITY"
    data: tuple[int, ...] = ()
    bits: int = 12


@dataclass
class ImageSpec:
    """One image box's content, already validated."""

    position: int
    rows: int
    columns: int
    bits_stored: int
    signed: bool
    # Stored values 0 .. 2^BitsStored - 1, row by row: two bytes a pixel, not a list of
    # Python ints (a 512x512 image is 0.5 MB instead of ~9 MB).
    values: array[int]
    monochrome1: bool
    polarity: str
    magnification: str
    smoothing: int
    aspect: tuple[int, int] = (1, 1)
    requested_size_mm: float | None = None
    lut: Lut | None = None


@dataclass
class FilmSpec:
    """One film sheet: layout and density parameters, plus the images and annotations."""

    film_box_uid: str
    display_format: str
    orientation: str
    film_size: str
    magnification: str
    smoothing: int
    border_density: str
    trim: str
    tone: Tone
    annotation_format: str = "NONE"
    lut: Lut | None = None
    images: dict[int, ImageSpec] = field(default_factory=dict)
    annotations: dict[int, str] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)


def parse_display_format(text: str) -> tuple[str, tuple[int, ...]] | None:
    """``("STANDARD", (C, R))``, ``("ROW", (R1, ...))`` or ``("COL", (C1, ...))``.

    >>> parse_display_format("STANDARD\\\\2,3")
    ('STANDARD', (2, 3))
    >>> parse_display_format("ROW\\\\1,2")
    ('ROW', (1, 2))
    >>> parse_display_format("SLIDE") is None
    True
    """
    parts = text.strip().split("\\")
    if len(parts) != 2 or parts[0] not in ("STANDARD", "ROW", "COL"):
        return None
    try:
        counts = tuple(int(v) for v in parts[1].split(","))
    except ValueError:
        return None
    if not counts or any(c < 1 for c in counts):
        return None
    if parts[0] == "STANDARD" and len(counts) != 2:
        return None
    return parts[0], counts


def positions(fmt: tuple[str, tuple[int, ...]]) -> int:
    kind, counts = fmt
    if kind == "STANDARD":
        return counts[0] * counts[1]
    return sum(counts)


def cells(
    fmt: tuple[str, tuple[int, ...]], x0: int, y0: int, width: int, height: int
) -> list[tuple[int, int, int, int]]:
    """Box rectangles ``(left, top, width, height)`` in Image Box Position order.

    STANDARD and ROW are numbered row by row, COL column by column (PS3.3 C.13.5.1).
    """
    kind, counts = fmt
    out: list[tuple[int, int, int, int]] = []

    def split(start: int, total: int, n: int) -> list[tuple[int, int]]:
        edges = [start + round(total * i / n) for i in range(n + 1)]
        return [(edges[i], edges[i + 1] - edges[i]) for i in range(n)]

    if kind == "STANDARD":
        cols, rows = counts
        for top, h in split(y0, height, rows):
            for left, w in split(x0, width, cols):
                out.append((left, top, w, h))
    elif kind == "ROW":
        for (top, h), n in zip(split(y0, height, len(counts)), counts, strict=True):
            for left, w in split(x0, width, n):
                out.append((left, top, w, h))
    else:
        for (left, w), n in zip(split(x0, width, len(counts)), counts, strict=True):
            for top, h in split(y0, height, n):
                out.append((left, top, w, h))
    return out


def film_matrix(film_size: str, orientation: str) -> tuple[int, int]:
    """Printable matrix (columns, rows) of a film size in an orientation."""
    cols, rows = FILM_MATRIX[film_size]
    return (rows, cols) if orientation == "LANDSCAPE" else (cols, rows)


def pixel_spacing_mm(film_size: str, orientation: str) -> tuple[float, float]:
    """Printer pixel spacing (row spacing, column spacing) in mm."""
    cols, rows = film_matrix(film_size, orientation)
    w_in, h_in = FILM_INCHES[film_size]
    if orientation == "LANDSCAPE":
        w_in, h_in = h_in, w_in
    return (h_in * 25.4 / rows, w_in * 25.4 / cols)


def density_table(image: ImageSpec, film: FilmSpec) -> list[float]:
    """Density for every stored value 0 .. 2^BitsStored - 1 of ``image`` on ``film``."""
    tone = film.tone
    v_max = (1 << image.bits_stored) - 1
    invert = image.monochrome1 != (image.polarity == "REVERSE")
    lut = image.lut or film.lut or Lut()
    out: list[float] = []
    for v in range(v_max + 1):
        vv = v_max - v if invert else v
        if lut.data:
            p = float(lut.data[min(vv, len(lut.data) - 1)])
            d = optical_density(
                p, (1 << lut.bits) - 1, tone.illumination, tone.ambient, tone.d_min, tone.d_max
            )
        elif lut.shape == "LIN OD":
            d = tone.d_max - (vv / v_max) * (tone.d_max - tone.d_min)
        else:
            d = optical_density(vv, v_max, tone.illumination, tone.ambient, tone.d_min, tone.d_max)
        out.append(tone.quantize(d))
    return out


# Stored values as a Pillow image of 16-bit pixels in the machine's byte order.
_NATIVE_16 = "I;16" if sys.byteorder == "little" else "I;16B"
_TABLE_SIZE = 1 << 16  # Pillow maps a mode "I" image through a 65,536-entry table
# Pixels mapped in one stack: bounds the stack's memory (~10 bytes a pixel while mapped).
STACK_PIXELS = 1 << 21


@dataclass(frozen=True)
class _Tables:
    """Per stored value: the 8-bit gray as viewed, and the density in 1/1000 OD split
    into its low and high bytes (Pillow's lookups on mode "I" images yield 8 bits)."""

    gray: list[int]
    milli_low: list[int]
    milli_high: list[int]


def _tables(image: ImageSpec, film: FilmSpec) -> _Tables:
    densities = density_table(image, film)
    grays: dict[float, int] = {}
    gray, low, high = [], [], []
    for d in densities:
        g = grays.get(d)
        if g is None:
            g = grays[d] = film.tone.gray(d)
        milli = round(d * 1000)
        if not 0 <= milli < _TABLE_SIZE:
            raise ValueError(f"density {d} outside the density map's range")
        gray.append(g)
        low.append(milli & 0xFF)
        high.append(milli >> 8)
    pad = [0] * (_TABLE_SIZE - len(densities))
    return _Tables(gray + pad, low + pad, high + pad)


def _map_images(
    images: dict[int, ImageSpec], tables: _Tables
) -> dict[int, tuple[Image.Image, Image.Image]]:
    """Each image as viewed (mode "L") and as densities (mode "I;16", 1/1000 OD), by
    position. Pillow applies the tables, not Python pixel by pixel; the images sharing
    them are stacked into one so that each table is prepared once per film (Pillow
    converts a 65,536-entry table value by value on every call)."""
    narrow = all(i.bits_stored <= 8 for i in images.values())
    width = max(i.columns for i in images.values())
    height = sum(i.rows for i in images.values())
    stack = Image.new("L" if narrow else "I", (width, height))
    top = 0
    for image in images.values():
        size = (image.columns, image.rows)
        if narrow:
            # Values below 256: the low byte of each little-endian pair.
            raw = image.values.tobytes()[0 if sys.byteorder == "little" else 1 :: 2]
            stack.paste(Image.frombytes("L", size, raw), (0, top))
        else:
            stored = Image.frombytes(_NATIVE_16, size, image.values.tobytes())
            stack.paste(stored.convert("I"), (0, top))
        top += image.rows
    entries = 256 if narrow else _TABLE_SIZE
    view = stack.point(tables.gray[:entries], "L")
    pairs = bytearray(2 * width * height)
    pairs[0::2] = stack.point(tables.milli_low[:entries], "L").tobytes()
    pairs[1::2] = stack.point(tables.milli_high[:entries], "L").tobytes()
    del stack
    dens = Image.frombytes("I;16", (width, height), pairs)
    del pairs
    out: dict[int, tuple[Image.Image, Image.Image]] = {}
    top = 0
    for position, image in images.items():
        box = (0, top, image.columns, top + image.rows)
        out[position] = (view.crop(box), dens.crop(box))
        top += image.rows
    return out


RESAMPLE = {
    "REPLICATE": Image.Resampling.NEAREST,
    "BILINEAR": Image.Resampling.BILINEAR,
    "CUBIC": Image.Resampling.BICUBIC,
    "NONE": Image.Resampling.NEAREST,
}


def _font(path: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for candidate in (path, *DEFAULT_FONTS):
        if candidate and Path(candidate).is_file():
            return ImageFont.truetype(candidate, size)
    return ImageFont.load_default(size)


@dataclass
class Placement:
    """Where an image landed on the rendered film, for the sidecar and the tests."""

    position: int
    box: tuple[int, int, int, int]
    image: tuple[int, int, int, int]


@dataclass
class RenderedFilm:
    view: Image.Image
    density: Image.Image
    placements: list[Placement]
    sidecar: dict[str, Any]


def render_film(
    film: FilmSpec, scale: float, oversize_policy: str, font_path: str = ""
) -> RenderedFilm:
    """Render ``film`` at ``scale`` times the printer's matrix."""
    tone = film.tone
    full_w, full_h = film_matrix(film.film_size, film.orientation)
    width, height = max(1, round(full_w * scale)), max(1, round(full_h * scale))
    border = tone.d_max if film.border_density == "BLACK" else tone.d_min
    opposite = tone.d_min if film.border_density == "BLACK" else tone.d_max
    dens = Image.new("I", (width, height), round(border * 1000))
    view = Image.new("L", (width, height), tone.gray(border))
    font_size = max(8, round(height / 60))
    font = _font(font_path, font_size)
    band = round(font_size * 1.6)
    fmt = parse_display_format(film.display_format)
    assert fmt is not None
    top = band if film.annotation_format in ("LABEL", "COMBINED") else 0
    boxes = cells(fmt, 0, top, width, height - top)
    text_band = band if film.annotation_format in ("BOTTOM", "COMBINED") else 0
    spacing = pixel_spacing_mm(film.film_size, film.orientation)
    draw_v = ImageDraw.Draw(view)
    draw_d = ImageDraw.Draw(dens)
    placements: list[Placement] = []
    # Images sharing depth, polarity and LUT share their tables (one per film, usually).
    groups: dict[tuple[int, bool, Lut], dict[int, ImageSpec]] = {}
    for position, spec in film.images.items():
        if not 1 <= position <= len(boxes):
            continue
        key = (
            spec.bits_stored,
            spec.monochrome1 != (spec.polarity == "REVERSE"),
            spec.lut or film.lut or Lut(),
        )
        groups.setdefault(key, {})[position] = spec
    mapped: dict[int, tuple[Image.Image, Image.Image]] = {}
    for members in groups.values():
        table = _tables(next(iter(members.values())), film)
        batch: dict[int, ImageSpec] = {}
        pixels = 0
        for position, spec in members.items():
            batch[position] = spec
            pixels += spec.rows * spec.columns
            if pixels >= STACK_PIXELS:
                mapped.update(_map_images(batch, table))
                batch, pixels = {}, 0
        if batch:
            mapped.update(_map_images(batch, table))
    for index, (bx, by, bw, bh) in enumerate(boxes, start=1):
        image = film.images.get(index)
        ih = max(1, bh - text_band)
        if image is not None:
            view_img, dens_img = mapped.pop(index)
            dens_img = dens_img.convert("I")
            tw, th = _target_size(image, film, bw, ih, scale, spacing, oversize_policy)
            magnification = image.magnification or film.magnification
            smoothing = image.smoothing if image.magnification else film.smoothing
            resample = RESAMPLE.get(magnification, Image.Resampling.BILINEAR)
            if magnification == "CUBIC" and smoothing == 0:
                resample = Image.Resampling.NEAREST
            if oversize_policy == "DECIMATE" and (tw, th) != (image.columns, image.rows):
                resample = Image.Resampling.NEAREST
            full_box = (round(bw / scale), round(ih / scale))
            if oversize_policy == "CROP" and oversize(image.columns, image.rows, full_box):
                # Clipped at magnification 1: the centre of the image, one printer pixel
                # per image pixel.
                crop_w, crop_h = min(image.columns, full_box[0]), min(image.rows, full_box[1])
                cx, cy = (image.columns - crop_w) // 2, (image.rows - crop_h) // 2
                view_img = view_img.crop((cx, cy, cx + crop_w, cy + crop_h))
                dens_img = dens_img.crop((cx, cy, cx + crop_w, cy + crop_h))
                tw = min(bw, max(1, round(crop_w * scale)))
                th = min(ih, max(1, round(crop_h * scale)))
            view_img = view_img.resize((tw, th), resample)
            dens_img = dens_img.resize((tw, th), Image.Resampling.NEAREST)
            if magnification == "CUBIC" and smoothing > 0:
                view_img = view_img.filter(ImageFilter.GaussianBlur(0.1 * smoothing))
            px, py = bx + (bw - tw) // 2, by + (ih - th) // 2
            view.paste(view_img, (px, py))
            dens.paste(dens_img, (px, py))
            placements.append(Placement(index, (bx, by, bw, bh), (px, py, tw, th)))
            if film.trim == "YES":
                rect = (px - 1, py - 1, px + tw, py + th)
                draw_v.rectangle(rect, outline=tone.gray(opposite))
                draw_d.rectangle(rect, outline=round(opposite * 1000))
        text = film.annotations.get(index)
        if text and text_band:
            _text(draw_v, draw_d, (bx + 2, by + bh - text_band), text, font, tone, opposite)
    label = film.annotations.get(0)
    if label and top:
        _text(draw_v, draw_d, (2, 1), label, font, tone, opposite)
    sidecar = {
        "film_box_uid": film.film_box_uid,
        "width": width,
        "height": height,
        "scale": scale,
        "attributes": film.attributes,
        "placements": [
            {"position": p.position, "box": list(p.box), "image": list(p.image)} for p in placements
        ],
        "annotations": {str(k): v for k, v in film.annotations.items()},
    }
    return RenderedFilm(view, dens.convert("I;16"), placements, sidecar)


def _text(
    draw_v: ImageDraw.ImageDraw,
    draw_d: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    text: str,
    font: Any,
    tone: Tone,
    density: float,
) -> None:
    draw_v.text(xy, text, fill=tone.gray(density), font=font)
    draw_d.text(xy, text, fill=round(density * 1000), font=font)


def _target_size(
    image: ImageSpec,
    film: FilmSpec,
    box_w: int,
    box_h: int,
    scale: float,
    spacing: tuple[float, float],
    oversize_policy: str,
) -> tuple[int, int]:
    """Printed size of ``image`` in a ``box_w`` x ``box_h`` cell (rendered pixels)."""
    aspect = image.aspect[0] / image.aspect[1] if image.aspect[1] else 1.0
    magnification = image.magnification or film.magnification
    if image.requested_size_mm:
        width = image.requested_size_mm / spacing[1] * scale
        factor = width / image.columns
    elif magnification == "NONE":
        factor = scale
    else:
        factor = min(box_w / image.columns, box_h / (image.rows * aspect))
    w, h = image.columns * factor, image.rows * aspect * factor
    if w > box_w or h > box_h:
        shrink = min(box_w / w, box_h / h)
        w, h = w * shrink, h * shrink
    return max(1, round(w)), max(1, round(h))


def oversize(image_cols: int, image_rows: int, box: tuple[int, int]) -> bool:
    """Whether an image at magnification 1 is larger than its box (printer pixels)."""
    return image_cols > box[0] or image_rows > box[1]
