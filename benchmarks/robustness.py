"""How far a toy's answers survive small pixel changes made to flip them: the held-out describe
accuracy of filled shapes, clean and under FGSM-RS and PGD attacks of a few sizes (per pixel, 0-1
scale). A model whose answers survive is one whose input gradients follow the shape, which is
what inversion climbs (issue 10).

    python benchmarks/robustness.py --model toy-shapes --model toy-shapes-v1
    python benchmarks/robustness.py --checkpoint my-toy      # a toy you trained
"""

import argparse

import torch

from mimic_toolkit.engine import load_model
from mimic_plugins.toy_shapes import shapes, train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", action="append", help="toy model id (repeatable; default toy-shapes)")
parser.add_argument("--checkpoint", action="append", default=[], help="a trained toy's folder (repeatable)")
parser.add_argument("--n", type=int, default=128, help="held-out images")
parser.add_argument("--eps", default="4,8,16", help="attack sizes, in 1/255")
parser.add_argument("--pgd-steps", type=int, default=7)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)

sources = [(name, dict(name=name)) for name in args.model or ([] if args.checkpoint else ["toy-shapes"])]
sources += [(folder, dict(name="toy-shapes", checkpoint=folder)) for folder in args.checkpoint]
sizes = [int(e) for e in args.eps.split(",")]
print("| model | clean | " + " | ".join(f"FGSM {e}/255 | PGD-{args.pgd_steps} {e}/255" for e in sizes) + " |")
print("|---|---|" + "---|---|" * len(sizes))
for label, source in sources:
    adapter = load_model(**source, device="cpu")
    stream = (0, train.HELD_OUT_STREAM, 99)  # held-out images, a stream no training reads
    images, labels, _ = shapes.sample(stream, args.n, {"filled": 1.0})
    text = train.question_batch(adapter, labels, stream, kinds=("describe",))

    def loss_of(x):
        return adapter.model(**adapter.pixel_inputs(adapter.normalise(x)), **text).loss

    def accuracy(x):
        return train.answers_right(adapter, {**adapter.pixel_inputs(adapter.normalise(x)), **text}).float().mean().item()

    torch.manual_seed(0)
    row = [accuracy(images)]
    for e in sizes:
        row += [accuracy(train.adversarial(images, loss_of, e / 255, steps)) for steps in (1, args.pgd_steps)]
    print(f"| {label} | " + " | ".join(f"{value:.2f}" for value in row) + " |", flush=True)
