"""Procedural 64x64 images of one coloured shape, with questions and answers about them.

The shape's size (circle diameter, square or triangle side, cross span) is 30-68 % of the image
side; squares, triangles and crosses are turned by a random angle; the shape lies anywhere it fits.
It is drawn at 4x and box-filtered down, so its edges are anti-aliased.

Backgrounds are solid colours or two-colour linear gradients, half of them with mild pixel noise.
Every background colour is *muted*: saturation <= 0.3, value in [0.1, 0.9] (greys, dull tints,
dark and light). The shapes are drawn in fully saturated colours, so a background never has the
shape's colour. Muted backgrounds are a deliberate choice: with backgrounds of any colour, a small VLM trained from
scratch did not learn shape; muted ones keep the outline salient while the backgrounds still vary.

Besides the filled shapes, `STYLES` draws them as outlines (1-3 px), blurred, noisy and at low
contrast, and "none" is an image with no shape at all (a background, pixel noise, a flat colour of
any saturation, smooth 1/f noise), answered "none" / "nothing". "decoy" is a saturated blob that is
none of the four shapes (overlapping discs, a wavy-rimmed disc, an ellipse), also answered "none":
the blobs an inversion makes before it finds the shape. The grounded toy model trains on them, so
its shape answer needs geometry (benchmarks/RESULTS.md, "grounded toy").

Everything is deterministic given a seed (`numpy.random.Generator`); no files are read.
"""

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
COLOUR_RGB = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
QUESTION_KINDS = ("shape", "colour", "describe", "choice")
DEFAULT_QUESTION = "Describe the image."
NO_SHAPE = len(SHAPES) * len(COLOURS)  # the label of an image with no shape (answered "none")
# Ways to draw a concept; "none" draws no shape. The grounded recipe's mix of them, as weights:
STYLES = ("filled", "outline", "blurred", "noisy", "faint", "none", "decoy")
NO_SHAPE_STYLES = ("none", "decoy")  # answered "none" / "nothing"
# (the shipped toy's first round drew outlines at 0.12, filled 0.45, none 0.15: outlines were read 64 %)
GROUNDED_MIX = {"filled": 0.35, "outline": 0.25, "blurred": 0.1, "noisy": 0.1, "faint": 0.08, "none": 0.12}
MAX_SPAN = 0.68  # of the side: the largest square still fits when turned 45 degrees
_SUPERSAMPLE = 4


def class_index(shape: str, colour: str) -> int:
    return SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def class_name(index: int) -> str:
    shape, colour = split_class(index)
    return f"{colour} {shape}"


def split_class(index: int) -> tuple[str, str]:
    return SHAPES[index // len(COLOURS)], COLOURS[index % len(COLOURS)]


def _outline(shape: str, span: float, rng: np.random.Generator) -> np.ndarray:
    """Polygon vertices [N, 2] centred on 0; `span` is the side (square, triangle) or arm span."""
    half = span / 2
    if shape == "square":
        points = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        turn = rng.uniform(0, np.pi / 2)
    elif shape == "triangle":
        angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        points = span / np.sqrt(3) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        turn = rng.uniform(0, 2 * np.pi / 3)
    elif shape == "cross":
        w = span / 6  # arms are a third of the span wide
        points = np.array([[w, half], [w, w], [half, w], [half, -w], [w, -w], [w, -half],
                           [-w, -half], [-w, -w], [-half, -w], [-half, w], [-w, w], [-w, half]])
        turn = rng.uniform(0, np.pi / 2)
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    return points @ rotation.T


def _shape_mask(shape: str, rng: np.random.Generator, outline: float = 0.0) -> np.ndarray:
    """Coverage in [0, 1] of a randomly sized, placed and turned shape, [SIZE, SIZE]; drawn as
    an outline `outline` px wide when it is > 0."""
    span = rng.uniform(0.3, MAX_SPAN) * SIZE
    if shape == "circle":
        points = np.array([[-span / 2, -span / 2], [span / 2, span / 2]])
    else:
        points = _outline(shape, span, rng)
    low, high = points.min(axis=0), points.max(axis=0)
    # Place the shape anywhere its bounding box stays inside the image (with a 1 px margin).
    centre = rng.uniform(1 - low, SIZE - 1 - high)
    big = Image.new("L", (SIZE * _SUPERSAMPLE, SIZE * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    scaled = ((points + centre) * _SUPERSAMPLE).tolist()
    width = round(outline * _SUPERSAMPLE)
    if shape == "circle":
        draw.ellipse([tuple(p) for p in scaled], **({"outline": 255, "width": width} if width else {"fill": 255}))
    elif width:
        draw.line([tuple(p) for p in scaled + scaled[:1]], fill=255, width=width, joint="curve")
    else:
        draw.polygon([tuple(p) for p in scaled], fill=255)
    return np.asarray(big.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255


def _decoy_mask(rng: np.random.Generator) -> np.ndarray:
    """Coverage [SIZE, SIZE] of a blob that is none of the four shapes: two or three overlapping
    discs, a disc with a wavy rim, or an ellipse clearly longer than it is wide."""
    big = Image.new("L", (SIZE * _SUPERSAMPLE, SIZE * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    centre = rng.uniform(0.35, 0.65, 2) * SIZE
    kind = rng.integers(3)
    if kind == 0:
        radii = rng.uniform(0.08, 0.2, rng.integers(2, 4)) * SIZE
        centres = [centre]
        for radius in radii[1:]:  # each disc overlaps the one before
            angle = rng.uniform(0, 2 * np.pi)
            step = (radii[0] + radius) * rng.uniform(0.5, 0.85)
            centres.append(centres[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
        for c, radius in zip(centres, radii):
            draw.ellipse([tuple((c - radius) * _SUPERSAMPLE), tuple((c + radius) * _SUPERSAMPLE)], fill=255)
        return np.asarray(big.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    if kind == 1:
        rim = np.ones_like(theta)
        for k in rng.choice(np.arange(2, 6), 2, replace=False):
            rim += rng.uniform(0.08, 0.2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        points = rng.uniform(0.15, 0.3) * SIZE * rim[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)
    else:
        long = rng.uniform(0.15, 0.32) * SIZE
        points = np.stack([long * np.cos(theta), long * rng.uniform(0.35, 0.65) * np.sin(theta)], 1)
        turn = rng.uniform(0, np.pi)
        points = points @ np.array([[np.cos(turn), np.sin(turn)], [-np.sin(turn), np.cos(turn)]])
    draw.polygon([tuple(p) for p in (points + centre) * _SUPERSAMPLE], fill=255)
    return np.asarray(big.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.1, 0.9)))


def background(rng: np.random.Generator) -> np.ndarray:
    """[SIZE, SIZE, 3] float in [0, 1]: a solid colour or a gradient, half of them noisy."""
    first = _muted_colour(rng)
    if rng.uniform() < 0.5:
        image = np.broadcast_to(first, (SIZE, SIZE, 3))
    else:
        angle = rng.uniform(0, 2 * np.pi)
        grid = (np.arange(SIZE) - (SIZE - 1) / 2) / SIZE
        ramp = np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None] + 0.5
        image = first + ramp[..., None] * (_muted_colour(rng) - first)
    if rng.uniform() < 0.5:
        image = image + rng.normal(0, rng.uniform(0.01, 0.05), (SIZE, SIZE, 3))
    return np.clip(image, 0, 1)


def render(shape: str, colour: str, rng: np.random.Generator, style: str = "filled") -> np.ndarray:
    """One image, [SIZE, SIZE, 3] float32 in [0, 1], of the concept drawn in `style` (see STYLES)."""
    if style == "none":
        return shapeless(rng)
    ground = background(rng)
    if style == "decoy":
        mask = _decoy_mask(rng)[..., None]
    else:
        mask = _shape_mask(shape, rng, outline=rng.uniform(1, 3) if style == "outline" else 0.0)[..., None]
    if style == "faint":  # low contrast: the colour only partly over the background
        mask = mask * rng.uniform(0.35, 0.6)
    image = ground * (1 - mask) + np.array(COLOUR_RGB[colour]) * mask
    if style == "blurred":
        image = _blur(image, rng.uniform(0.8, 2.0))
    elif style == "noisy":
        image = image + rng.normal(0, rng.uniform(0.05, 0.15), image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    pil = Image.fromarray((image * 255).round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(sigma))
    return np.asarray(pil, dtype=np.float32) / 255


def shapeless(rng: np.random.Generator) -> np.ndarray:
    """An image with no shape: a generator background, uniform pixel noise, a flat colour of any
    saturation (a flat red frame is not a red square), or smooth 1/f noise behind a sigmoid (what a
    random Fourier-parameterised image looks like)."""
    kind = rng.integers(4)
    if kind == 0:
        image = background(rng)
    elif kind == 1:
        image = rng.uniform(0, 1, (SIZE, SIZE, 3))
    elif kind == 2:
        hsv = (rng.uniform(), rng.uniform(0, 1), rng.uniform(0.1, 1))
        image = np.broadcast_to(colorsys.hsv_to_rgb(*hsv), (SIZE, SIZE, 3)) + rng.normal(0, 0.02, (SIZE, SIZE, 3))
    else:
        frequencies = np.sqrt(np.fft.fftfreq(SIZE)[:, None] ** 2 + np.fft.rfftfreq(SIZE)[None] ** 2)
        scale = 1 / np.maximum(frequencies, 1 / SIZE) ** rng.uniform(1, 2)
        spectrum = (rng.normal(size=(3, *scale.shape)) + 1j * rng.normal(size=(3, *scale.shape))) * scale
        field = np.fft.irfft2(spectrum, s=(SIZE, SIZE))
        field = field / field.std() * rng.uniform(0.5, 2)
        image = 1 / (1 + np.exp(-(field.transpose(1, 2, 0) + rng.normal(0, 0.5, 3))))
    return np.clip(image, 0, 1).astype(np.float32)


def sample(seed: int | Sequence[int], n: int, mix: dict[str, float] | None = None):
    """`n` random images [n, 3, SIZE, SIZE] in [0, 1] and their class indices [n] (NO_SHAPE for a
    "none" image). Filled shapes only, unless `mix` gives each style's weight (e.g. GROUNDED_MIX);
    then also the style of each image. `seed` is anything `numpy.random.default_rng` takes, e.g.
    (run seed, stream, step)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES) * len(COLOURS), n)
    if mix is None:
        images = np.stack([render(*split_class(label), rng) for label in labels])
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
    names = list(mix)
    weights = np.array([mix[name] for name in names], dtype=float)
    styles = [names[k] for k in rng.choice(len(names), n, p=weights / weights.sum())]
    images = np.stack([render(*split_class(label), rng, style) for label, style in zip(labels, styles)])
    labels = np.where([style in NO_SHAPE_STYLES for style in styles], NO_SHAPE, labels)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), styles


def question_answer(kind: str, index: int, rng: np.random.Generator) -> tuple[str, str]:
    """A question of the given kind about class `index`, and its one correct answer ("none", or
    "nothing" to describe, for NO_SHAPE)."""
    shape, colour = ("none", "none") if index == NO_SHAPE else split_class(index)
    if kind == "shape":
        return "What shape is in the image?", shape
    if kind == "colour":
        return "What colour is the shape?", colour
    if kind == "describe":
        return DEFAULT_QUESTION, "nothing" if index == NO_SHAPE else f"a {colour} {shape}"
    if kind == "choice":
        options = [] if index == NO_SHAPE else [shape]  # with no shape, three wrong options
        options += list(rng.choice([s for s in SHAPES if s != shape], 3 - len(options), replace=False))
        rng.shuffle(options)
        return f"Is it a {options[0]}, a {options[1]} or a {options[2]}?", shape
    raise ValueError(f"unknown question kind {kind!r}")
