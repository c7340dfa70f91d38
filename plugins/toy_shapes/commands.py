"""`mimic toy ...` and `mimic evaluate`. Imports stay inside the commands: registering them must
not import torch (listing models never does)."""
from pathlib import Path
from typing import List, Optional

import typer

toy = typer.Typer(no_args_is_help=True)
HERE = Path(__file__).parent


@toy.command("train")
def train_command(
    out: Path = typer.Option(Path("toy-checkpoint"), help="Checkpoint folder to write (a new one; the bundled "
                             "model stays as it is unless named here)."),
    seed: int = typer.Option(0),
    vision_steps: Optional[int] = typer.Option(None, help="Steps of the vision-tower pre-training (default: the recipe's)."),
    language_steps: Optional[int] = typer.Option(None, help="Steps of the whole-VLM stage (default: the recipe's)."),
    threads: int = typer.Option(1, help="1 is fastest when other work shares the cores."),
    layout: str = typer.Option("llava", help="llava (CLIP + Llama: toy-shapes) or qwen2-vl (Qwen2-VL's tower "
                               "with its 2x2 merge + Qwen2: toy-shapes-qwen)."),
    batch: Optional[int] = typer.Option(None, min=1, help="Images per step (default: the recipe's)."),
    vision_lr: Optional[float] = typer.Option(None, help="Peak learning rate of the vision stage (default: the "
                                              "recipe's, 3e-3; lower it to go on from --init)."),
    language_lr: Optional[float] = typer.Option(None, min=0.0, help="Peak learning rate of the whole-VLM stage for "
                                                "everything but the tower (default: the recipe's, 1e-3)."),
    tower_lr: Optional[float] = typer.Option(None, min=0.0, help="Peak learning rate of the tower in the whole-VLM "
                                             "stage (default: the recipe's, 3e-4; 0 holds the tower as it is)."),
    init: Optional[Path] = typer.Option(None, help="Start from this trained toy checkpoint (same layout and "
                                        "sizes) instead of from scratch; new words start fresh."),
    adversarial_eps: Optional[float] = typer.Option(None, min=0.0, max=0.25, help="Train half of each batch on "
                                                    "attacked images this far (per pixel, 0-1 scale; 0.024 is about "
                                                    "6/255) from the clean ones (default: the recipe's, 0 = off)."),
    adversarial_steps: Optional[int] = typer.Option(None, min=1, help="Attack steps: 1 is FGSM with a random "
                                                    "start; more is PGD, stronger and that many times slower "
                                                    "(default: the recipe's, 1)."),
    adversarial_l2: Optional[float] = typer.Option(None, min=0.0, help="With --adversarial-eps: every other "
                                                   "step's attack is PGD-2 within this L2 norm per image instead "
                                                   "(0-1 scale; 3 changes about nine pixels fully) (default: 0 = off)."),
    eval_images: Optional[int] = typer.Option(None, min=1, help="Held-out images per style and question type "
                                              "(default: the recipe's, 400)."),
    mix: Optional[str] = typer.Option(None, help="Each image style's share of a batch, STYLE:WEIGHT,... e.g. "
                                      "\"filled:0.3,outline:0.4,none:0.1\" (weights are normalised; default: "
                                      "the grounded recipe's, shapes.GROUNDED_MIX)."),
    decoys: Optional[float] = typer.Option(None, min=0.0, max=0.5, help="Share of each batch drawn as a blob that "
                                           "is none of the four shapes, answered \"none\" (default: the recipe's, 0)."),
):
    """Train the toy VLM on CPU (seeded), from scratch or on from --init; prints held-out accuracy
    per image style and question type and writes it to training.json beside the checkpoint."""
    import torch

    from .train import parse_mix, train

    torch.set_num_threads(threads)
    steps = {"vision_steps": vision_steps, "language_steps": language_steps, "batch": batch, "vision_lr": vision_lr,
             "language_lr": language_lr, "tower_lr": tower_lr, "adversarial_eps": adversarial_eps,
             "adversarial_steps": adversarial_steps, "adversarial_l2": adversarial_l2, "eval_images": eval_images,
             "decoys": decoys, "mix": parse_mix(mix) if mix else None}
    train(out, seed=seed, layout=layout, init=init, **{k: v for k, v in steps.items() if v is not None})


@toy.command("train-icl")
def train_icl_command(
    out: Path = typer.Option(HERE / "checkpoint-icl", help="Checkpoint folder to write."),
    base: Path = typer.Option(HERE / "checkpoint-v1", help="The toy checkpoint to start from (the shipped "
                              "toy-shapes-icl went on from toy-shapes-v1)."),
    seed: int = typer.Option(0),
    steps: Optional[int] = typer.Option(None, help="Fine-tuning steps (default: the recipe's)."),
    threads: int = typer.Option(1, help="1 is fastest when other work shares the cores."),
):
    """Fine-tune toy-shapes into toy-shapes-icl, which learns from text demonstrations in context
    (seeded); prints held-out accuracy per shot count and task and writes it to training.json."""
    import torch

    from .train_icl import train_icl

    torch.set_num_threads(threads)
    train_icl(out, base, seed=seed, **({"steps": steps} if steps else {}))


@toy.command("icl-dataset")
def icl_dataset_command(
    out: Path = typer.Option(..., help="Folder to write (images/ and icl.jsonl)."),
    n: int = typer.Option(1000, help="Number of images."),
    seed: int = typer.Option(0),
    task: str = typer.Option("shape", help="The answer: the image's shape or colour."),
    question: str = typer.Option("What is it?", help="The question of every entry."),
):
    """Generated images with a question and answer each, for `mimic icl` (capture format)."""
    from .train_icl import write_icl_dataset

    typer.echo(str(write_icl_dataset(out, n=n, seed=seed, task=task, question=question) / "icl.jsonl"))


@toy.command("images")
def images_command(
    out: Path = typer.Option(..., help="Folder to write (a new one): PNGs for `mimic stats --images`."),
    n: int = typer.Option(64, help="Number of images."),
    class_index: Optional[int] = typer.Option(None, help="One concept, 0-23 (the prompt file's); default: random ones."),
    seed: int = typer.Option(0),
    style: str = typer.Option("filled", help="How to draw: filled, outline, blurred, noisy, faint, none (no "
                              "shape) or decoy (a blob that is none of the four shapes)."),
):
    """Generated images of one toy concept (or of random ones), as files."""
    from .dataset import write_images

    typer.echo(str(write_images(out, n=n, seed=seed, class_index=class_index, style=style)))


@toy.command("dataset")
def dataset_command(
    out: Path = typer.Option(..., help="Folder to write (a new one): images/ and dataset.jsonl."),
    n: int = typer.Option(200, help="Number of images."),
    kind: str = typer.Option("describe", help="The generator's question and answer: shape | colour | describe."),
    question: Optional[str] = typer.Option(None, help="Ask this instead of the kind's question."),
    answer: Optional[str] = typer.Option(None, help="Answer this attribute instead: shape | colour | describe."),
    seed: int = typer.Option(0),
):
    """Generated images with a question and answer each, in the capture format (image, question,
    answer, id, labels) that `mimic capture`, `mimic concepts` and `mimic icl` read."""
    from .dataset import write_dataset

    typer.echo(str(write_dataset(out, n=n, seed=seed, kind=kind, question=question, answer=answer)))


@toy.command("train-verifier")
def train_verifier_command(out: Path = typer.Option(HERE / "verifier.safetensors"), seed: int = typer.Option(0),
                           steps: Optional[int] = typer.Option(None, help="Training steps (default: the recipe's)."),
                           threads: int = typer.Option(1)):
    """Train the independent CNN that scores inverted images (shape and colour)."""
    import torch

    from .verifier import train_verifier

    torch.set_num_threads(threads)
    typer.echo(train_verifier(out, seed=seed, **({"steps": steps} if steps else {})))


@toy.command("train-guide")
def train_guide_command(out: Path = typer.Option(HERE / "guide.safetensors", help="Weights file to write "
                                                 "(guide_training.json is written beside it)."),
                        seed: int = typer.Option(0),
                        steps: Optional[int] = typer.Option(None, min=1, help="Training steps (default: the recipe's)."),
                        threads: int = typer.Option(1, help="1 is fastest when other work shares the cores.")):
    """Train toy-shapes-guide, the BatchNorm CNN whose running statistics the guide term (R_V) matches."""
    import json

    import torch

    from .guide import train_guide

    torch.set_num_threads(threads)
    typer.echo(json.dumps(train_guide(out, seed=seed, **({"steps": steps} if steps else {}))))


@toy.command("stats")
def stats_command(out: Path = typer.Option(HERE / "stats", help="Folder for the 24 statistics files."),
                  images_per_concept: int = typer.Option(64), seed: int = typer.Option(0),
                  model: str = typer.Option("toy-shapes", help="toy-shapes, or toy-shapes-qwen (then pass its --out)."),
                  checkpoint: Optional[str] = typer.Option(None, help="A toy you trained (`mimic toy train --out`) "
                                                           "instead of the model's bundled checkpoint.")):
    """Feature statistics of generated images for each of the 24 concepts (through `mimic stats`'s code)."""
    from .prepare import write_concept_stats

    for path in write_concept_stats(out, images_per_concept=images_per_concept, seed=seed, model=model,
                                    checkpoint=checkpoint):
        typer.echo(str(path))


def evaluate(runs: List[Path] = typer.Argument(..., help="Run folders or sweep folders of toy-shapes runs."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Score toy-shapes runs: the verifier's top-1 for shape, colour and both, and P(target) under
    the VLM for questions phrased differently from the inverted one."""
    import json

    from .evaluation import evaluate as score

    rows, summary = score(runs)
    if as_json:
        typer.echo(json.dumps({"runs": rows, "summary": summary}, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['run']}: shape {row['shape_top1']:.2f}  colour {row['colour_top1']:.2f}  "
                   f"both {row['both_top1']:.2f}  P(shape answer) {row['vlm_p_shape']:.3f}  "
                   f"P(colour answer) {row['vlm_p_colour']:.3f}")
    typer.echo("mean: " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
