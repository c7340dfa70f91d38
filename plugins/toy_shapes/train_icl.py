"""Fine-tune `toy-shapes` into `toy-shapes-icl`, a toy that learns in context.

The base toy answers the unseen question "What is it?" with the colour, and any demonstration
breaks it. Here it is fine-tuned on episodes of k in {0, 1, 2, 3} *text* demonstrations
("What is it?" -> "circle", no image) before the query turn (the image, "What is it?"): with
k = 0 the answer is the colour, with k >= 1 the attribute the demonstrations answered (colour or
shape, half each). Demonstrations that carry an image each stayed at chance after 480 steps in a
trial; text demonstrations learned in about 160. A share of every batch keeps the toy's own
questions. The loss is on the final answer and its <eos>. The vision tower stays frozen.

    mimic toy train-icl        # writes plugins/toy_shapes/checkpoint-icl/ (about 15 minutes, 1 thread)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

from mimic_toolkit.atomic import atomic_folder, check_replaceable
from mimic_toolkit.engine import format_prompt
from mimic_toolkit.errors import UserError

from . import shapes
from .train import _schedule, evaluate, train_step, trainable_adapter

ICL_QUESTION = "What is it?"
TASKS = ("colour", "shape")
MAX_SHOTS = 3
# Streams of their own, apart from the base toy's (0-2), so held-out episodes never repeat training ones.
ICL_STREAM, ICL_HELD_OUT_STREAM, ICL_DATASET_STREAM = 3, 4, 5


def attribute(index: int, task: str) -> str:
    shape, colour = shapes.split_class(index)
    return shape if task == "shape" else colour


def episode_turns(query: int, task: str, shots: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """`shots` text demonstrations of `task` about random classes, then the query turn."""
    classes = len(shapes.SHAPES) * len(shapes.COLOURS)
    demos = [(ICL_QUESTION, attribute(int(rng.integers(classes)), task)) for _ in range(shots)]
    return demos + [(ICL_QUESTION, attribute(query, task))]


def episode_prompt(adapter, turns: list[tuple[str, str]], target: bool = True):
    """The image sits in the query turn only: text demonstrations."""
    return format_prompt(adapter, turns, target=target, image_turns=(len(turns) - 1,))


def _pad(adapter, rows: list[tuple[torch.Tensor, torch.Tensor]], images: torch.Tensor) -> dict:
    pad, size = adapter.tokenizer.pad_token_id, len(rows)
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((size, length), pad)
    targets = torch.full((size, length), -100)
    for row, (ids, answer) in enumerate(rows):
        input_ids[row, :len(ids)], targets[row, :len(ids)] = ids, answer
    return {"pixel_values": adapter.normalise(images), "input_ids": input_ids,
            "attention_mask": (input_ids != pad).long(), "labels": targets}


def _with_eos(adapter, prompt) -> tuple[torch.Tensor, torch.Tensor]:
    eos = torch.tensor([adapter.tokenizer.eos_token_id])
    return torch.cat([prompt.input_ids, eos]), torch.cat([prompt.labels, eos])


def make_icl_batch(adapter, seed: tuple[int, ...], size: int, *, own_share: float = 0.25,
                   shots: int | None = None, task: str | None = None) -> dict:
    """Episodes over fresh images; a share `own_share` of the rows asks the toy's own questions.
    `shots` / `task` fix the episode (evaluation); zero shots always asks for the colour."""
    images, labels = shapes.sample(seed, size)
    rng = np.random.default_rng([*seed, 1])
    rows = []
    for label in labels.tolist():
        if shots is None and rng.uniform() < own_share:
            kind = shapes.QUESTION_KINDS[rng.integers(len(shapes.QUESTION_KINDS))]
            rows.append(_with_eos(adapter, format_prompt(adapter, [shapes.question_answer(kind, label, rng)])))
            continue
        k = int(rng.integers(MAX_SHOTS + 1)) if shots is None else shots
        kind = "colour" if k == 0 else (task or TASKS[rng.integers(len(TASKS))])
        rows.append(_with_eos(adapter, episode_prompt(adapter, episode_turns(label, kind, k, rng))))
    return _pad(adapter, rows, images)


@torch.no_grad()
def evaluate_icl(adapter, *, seed: int = 0, n: int = 300, batch: int = 100) -> dict[str, dict[str, float]]:
    """Accuracy per shot count and task on held-out episodes (whole answer + <eos> the argmax)."""
    accuracy = {}
    for k in range(MAX_SHOTS + 1):
        row = {}
        for t, task in enumerate(TASKS):
            correct = 0
            for start in range(0, n, batch):
                # at k = 0 the question is the same; scored against either attribute
                inputs = make_icl_batch(adapter, (seed, ICL_HELD_OUT_STREAM, k, start), min(batch, n - start),
                                        shots=k, task=task)
                targets = inputs.pop("labels")
                if k == 0 and task == "shape":
                    targets = _retarget_to_shape(adapter, inputs, targets, (seed, ICL_HELD_OUT_STREAM, k, start))
                predicted = adapter.model(**inputs).logits[:, :-1].argmax(-1)
                targets = targets[:, 1:]
                correct += ((predicted == targets) | (targets == -100)).all(dim=1).sum().item()
            row[task] = correct / n
        accuracy[f"{k}-shot"] = row
    return accuracy


def _retarget_to_shape(adapter, inputs, targets, seed) -> torch.Tensor:
    """Zero-shot targets are colours; the same prompts scored against the shape word instead."""
    _, labels = shapes.sample(seed, len(targets))
    targets = targets.clone()
    for row, label in enumerate(labels.tolist()):
        answer = (targets[row] != -100).nonzero().squeeze(1)
        shape_id = adapter.tokenizer.convert_tokens_to_ids(shapes.split_class(label)[0])
        targets[row, answer[0]] = shape_id  # one-token attributes: the answer, then <eos>
    return targets


def write_icl_dataset(out, *, n: int, seed: int = 0, task: str = "shape", question: str = ICL_QUESTION) -> Path:
    """`n` fresh images (PNG) and `icl.jsonl` in the capture format (image, question, answer, id,
    labels) for `mimic icl`; the answer is the image's `task` attribute. Streams apart from training's."""
    from .dataset import write_dataset

    if task not in TASKS:
        raise UserError(f"--task must be {' or '.join(TASKS)}, not '{task}'")
    return write_dataset(out, n=n, seed=seed, kind=task, question=question, stream=ICL_DATASET_STREAM,
                         file_name="icl.jsonl").parent


def load_base(checkpoint) -> tuple:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, use_safetensors=True)
    return tokenizer, model


def train_icl(out_dir, base_checkpoint, *, seed: int = 0, steps: int = 300, batch: int = 64, lr: float = 1e-3,
              own_share: float = 0.25, eval_episodes: int = 300, log_every: int = 20) -> dict:
    """Fine-tune, evaluate on held-out episodes and save the checkpoint plus `training.json`."""
    check_replaceable(out_dir, lambda folder: (folder / "training.json").is_file(), "--out")
    torch.manual_seed(seed)
    started = time.time()
    tokenizer, model = load_base(base_checkpoint)
    adapter = trainable_adapter(tokenizer, model)
    adapter.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, steps, warmup=max(1, steps // 20))
    losses = []
    for step in range(steps):
        loss = model(**make_icl_batch(adapter, (seed, ICL_STREAM, step), batch, own_share=own_share)).loss
        losses.append(train_step(loss, optimizer, scheduler, params))
        if log_every and step % log_every == 0:
            print(f"icl {step:5d} loss {losses[-1]:.3f}  {time.time() - started:.0f} s", flush=True)
    minutes = (time.time() - started) / 60
    model.eval()
    report = {
        "seed": seed, "minutes": round(minutes, 2), "threads": torch.get_num_threads(),
        "base_checkpoint": "toy-shapes",
        "recipe": {"steps": steps, "batch": batch, "lr": lr, "own_question_share": own_share,
                   "shots": list(range(MAX_SHOTS + 1)), "question": ICL_QUESTION,
                   "demonstrations": "text only (the image in the query turn)", "vision_tower": "frozen",
                   "optimizer": "AdamW, linear warmup 5 %, cosine"},
        "held_out_icl_accuracy": evaluate_icl(adapter, seed=seed + 1, n=eval_episodes),
        "held_out_episodes_per_cell": eval_episodes,
        "held_out_own_questions": evaluate(adapter, seed=seed + 1),
        "final_loss": float(np.mean(losses[-20:])),
    }
    with atomic_folder(out_dir, replace=True) as out:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report
