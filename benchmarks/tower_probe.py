"""What a toy's vision tower alone can tell apart: a linear probe (logistic regression) on the
features the LM reads (layer -2's patch tokens, mean-pooled) names the shape of held-out images,
per drawing style. When the probe is as low as the toy's own answers, the tower loses the shape,
not the LM (issue 10: outlines).

    python benchmarks/tower_probe.py                             # the shipped toy-shapes
    python benchmarks/tower_probe.py --checkpoint my-toy --styles outline
"""

import argparse

import torch
import torch.nn.functional as F

from mimic_toolkit.engine import load_model
from mimic_plugins.toy_shapes import shapes, train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--checkpoint", help="a trained toy's folder (default: the shipped toy-shapes)")
parser.add_argument("--styles", default="filled,outline,blurred,noisy,faint", help="drawing styles to probe")
parser.add_argument("--train", type=int, default=4000, help="probe training images per style")
parser.add_argument("--test", type=int, default=1000, help="held-out images per style")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
shape_styles = [style for style in shapes.STYLES if style not in shapes.NO_SHAPE_STYLES]
styles = args.styles.split(",")
for style in styles:  # all checked before the model loads
    if style not in shape_styles:
        parser.error(f"--styles: {style!r} is not a style with a shape ({', '.join(shape_styles)})")
torch.set_num_threads(args.threads)
adapter = load_model("toy-shapes", checkpoint=args.checkpoint, device="cpu")


@torch.no_grad()
def features(stream: tuple, n: int, style: str):
    """Mean-pooled layer -2 patch tokens [n, D] and shape labels [n] of fresh images of `style`."""
    rows, labels = [], []
    for start in range(0, n, 200):
        images, classes, _ = shapes.sample((*stream, start), min(200, n - start), {style: 1.0})
        rows.append(train.clip_features(adapter, images)[0])
        labels.append(classes // len(shapes.COLOURS))
    return torch.cat(rows), torch.cat(labels)


print("| style | probe: shape accuracy (held-out) |\n|---|---|")
for s, style in enumerate(styles):
    x, y = features((0, train.HELD_OUT_STREAM, 50, s), args.train, style)
    x_test, y_test = features((0, train.HELD_OUT_STREAM, 51, s), args.test, style)
    mean, std = x.mean(0), x.std(0) + 1e-5
    x, x_test = (x - mean) / std, (x_test - mean) / std
    probe = torch.nn.Linear(x.shape[1], len(shapes.SHAPES))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(300):  # full-batch steps; the features are fixed, so this converges in seconds
        optimizer.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        print(f"| {style} | {(probe(x_test).argmax(1) == y_test).float().mean().item():.3f} |")
