"""Train a small VLM from scratch on the shapes of `shapes.py`, on CPU, in one of two layouts
(`--layout`): `llava` (CLIP tower + Llama: `toy-shapes`) or `qwen2-vl` (Qwen2-VL's tower with its
2 x 2 patch merge + Qwen2 with M-RoPE: `toy-shapes-qwen`), each run through its real adapter.

Two stages, as a real VLM is built on a pretrained CLIP:
1. vision: the CLIP tower plus a linear head learn to classify the 24 concepts;
2. language: the whole LLaVA (tower at a lower learning rate) learns to answer the questions.
Prompts come from the toolkit's prompt formatting (`format_prompt`: the LLaVA adapter's template),
so training and inversion see the same sequences; the model learns the answer plus `<eos>`. Pixels are CLIP-normalised, as the
adapter normalises them.

The images mix every style of `shapes.STYLES` (`shapes.GROUNDED_MIX`: filled shapes, outlines,
blurred, noisy, faint, and images with no shape at all, answered "none" / "nothing"; `mix` sets
each style's share; `decoys` adds blobs that are none of the four shapes, also "none"), so the
model's answers depend on the shape's geometry rather than on colour or texture (issue 10). With
`adversarial_eps`, half of each batch is attacked first (FGSM, or PGD with `adversarial_steps`),
so the input gradient an inversion climbs follows the shape too; with `adversarial_l2`, every other
step's attack is bounded in L2 instead, which may change a few pixels a lot (a spot, a stub).

    mimic toy train --out my-toy                      # the LLaVA layout, from scratch
    mimic toy train --init plugins/toy_shapes/checkpoint-v1 --out my-toy   # on from a trained toy
    mimic toy train --init my-toy --adversarial-eps 0.0627 --vision-lr 1e-3 --out my-robust-toy
    mimic toy train --init my-robust-toy --adversarial-eps 0.0627 --adversarial-l2 3 --vision-lr 1e-3 --out my-l2-toy
    mimic toy train --layout qwen2-vl --out my-toy-qwen
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration)

from mimic_toolkit.atomic import atomic_folder, check_replaceable
from mimic_toolkit.adapter.chat import Prompt
from mimic_toolkit.engine import format_prompt
from mimic_toolkit.errors import UserError

from ..llava_llama3.adapter import LlavaLlama3Adapter
from ..qwen2_vl.adapter import QWEN2_VL_TEMPLATE, SYSTEM_PROMPT, Qwen2VLAdapter
from . import shapes

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", IMAGE_TOKEN, "<system>", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<' + message['role'] + '>' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
PATCH_SIZE = 8
IMAGE_TOKENS = (shapes.SIZE // PATCH_SIZE) ** 2
# Qwen2-VL's own special tokens (pad, end of turn, image wrappers) and the words its template adds
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE_TEXT = f"system user assistant {SYSTEM_PROMPT}"
# Independent random streams, so held-out images never repeat training ones, whatever the seed.
VISION_STREAM, LANGUAGE_STREAM, HELD_OUT_STREAM = 0, 1, 2


def _all_questions_and_answers() -> list[str]:
    rng = np.random.default_rng(0)
    texts = []
    for index in range(shapes.NO_SHAPE + 1):
        for kind in shapes.QUESTION_KINDS:
            for _ in range(20 if kind == "choice" else 1):  # enough draws to meet every option
                texts.extend(shapes.question_answer(kind, index, rng))
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word the questions and answers use (the LLaVA layout)."""
    return _word_tokenizer(SPECIAL_TOKENS, [], CHAT_TEMPLATE, pad_token="<pad>", unk_token="<unk>",
                           bos_token="<bos>", eos_token="<eos>", additional_special_tokens=SPECIAL_TOKENS[4:])


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The same words plus those of Qwen's ChatML template, with Qwen's special tokens (no BOS)."""
    return _word_tokenizer(QWEN_SPECIAL_TOKENS, [QWEN_TEMPLATE_TEXT], QWEN2_VL_TEMPLATE, pad_token="<|endoftext|>",
                           unk_token="<unk>", eos_token="<|im_end|>", additional_special_tokens=QWEN_SPECIAL_TOKENS[2:])


def _word_tokenizer(specials: list[str], extra_texts: list[str], chat_template: str, **tokens) -> PreTrainedTokenizerFast:
    splitter = pre_tokenizers.Whitespace()
    texts = _all_questions_and_answers() + extra_texts
    words = sorted({w for text in texts for w, _ in splitter.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **tokens)
    tokenizer.chat_template = chat_template
    return tokenizer


def build_model(tokenizer, *, vision_width=64, vision_layers=4, text_width=128, text_layers=2,
                heads=4) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        image_size=shapes.SIZE, patch_size=PATCH_SIZE, hidden_size=vision_width,
        intermediate_size=4 * vision_width, num_hidden_layers=vision_layers, num_attention_heads=heads,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=4 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=IMAGE_TOKENS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.copy_(
            _grid_position_embeddings(shapes.SIZE // PATCH_SIZE, vision_width))
    return model


def build_qwen_model(tokenizer, *, vision_width=64, vision_layers=4, text_width=128, text_layers=2,
                     heads=4) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL's layout at toy size: 8 px patches (3-D patch embedding over 2 frames), rotary
    vision positions, 2 x 2 merge to 16 image tokens at 64 px, Qwen2 with M-RoPE."""
    token = tokenizer.convert_tokens_to_ids
    head_dim = text_width // heads
    unit = head_dim // 16  # M-RoPE splits the head's rotary frequencies 2:3:3 over (time, height, width)
    config = Qwen2VLConfig(
        vision_config=dict(depth=vision_layers, embed_dim=vision_width, hidden_size=text_width, num_heads=heads,
                           mlp_ratio=4, patch_size=PATCH_SIZE, temporal_patch_size=2, spatial_merge_size=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2 * unit, 3 * unit, 3 * unit]}),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return Qwen2VLForConditionalGeneration(config)


def clip_features(adapter, images: torch.Tensor) -> list[torch.Tensor]:
    """The features LLaVA reads (layer -2, patch tokens, mean-pooled) and the pooled CLS."""
    out = adapter.vision_tower(adapter.normalise(images), output_hidden_states=True)
    return [out.hidden_states[-2][:, 1:].mean(dim=1), out.pooler_output]


def qwen_features(adapter, images: torch.Tensor) -> list[torch.Tensor]:
    """The merged tokens the LM reads and the last block's patch tokens, each mean-pooled per image."""
    inputs = adapter.pixel_inputs(adapter.normalise(images))
    out = adapter.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    pooled = lambda packed: packed.reshape(len(images), -1, packed.shape[-1]).mean(dim=1)
    return [pooled(out.pooler_output), pooled(out.last_hidden_state)]


# layout -> (tokenizer, model, adapter class, tower of the adapter, pooled tower features for stage 1)
LAYOUTS = {
    "llava": (build_tokenizer, build_model, LlavaLlama3Adapter, lambda a: a.vision_tower, clip_features),
    "qwen2-vl": (build_qwen_tokenizer, build_qwen_model, Qwen2VLAdapter, lambda a: a.visual, qwen_features),
}


def _grid_position_embeddings(side: int, width: int) -> torch.Tensor:
    """2-D sine-cosine positions (CLS first, at zero) as the start of the learned embeddings, the
    usual choice for a ViT trained from scratch (in a 400-step trial it neither helped nor hurt)."""
    quarter = width // 4
    frequencies = 1.0 / 100 ** (torch.arange(quarter) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = [f(axis.reshape(-1, 1).float() * frequencies) for axis in (rows, cols) for f in (torch.sin, torch.cos)]
    grid = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, width), grid], dim=0) * 0.5


def question_batch(adapter, labels: torch.Tensor, seed: tuple[int, ...], kinds=shapes.QUESTION_KINDS) -> dict:
    """One random question per label, prompted exactly as the toolkit's adapter prompts an
    inversion, right-padded; loss only on the answer and the <eos> after it."""
    rng = np.random.default_rng([*seed, 1])
    eos = torch.tensor([adapter.tokenizer.eos_token_id])
    rows = []
    for label in labels.tolist():
        prompt = format_prompt(adapter, [shapes.question_answer(kinds[rng.integers(len(kinds))], label, rng)])
        prompt = Prompt(torch.cat([prompt.input_ids, eos]), torch.cat([prompt.labels, eos]), prompt.image_positions)
        # the adapter's own text inputs (Qwen's add the token types its M-RoPE positions come from)
        rows.append({**adapter.text_inputs(prompt, 1), "labels": prompt.labels[None]})
    length = max(row["input_ids"].shape[1] for row in rows)
    fill = {"input_ids": adapter.tokenizer.pad_token_id, "labels": -100}
    return {key: torch.cat([F.pad(row[key], (0, length - row[key].shape[1]), value=fill.get(key, 0)) for row in rows])
            for key in rows[0]}


def make_batch(adapter, seed: tuple[int, ...], size: int, kinds=shapes.QUESTION_KINDS,
               mix=shapes.GROUNDED_MIX) -> dict:
    """Fresh images (styles drawn from `mix`) with one random question each (`question_batch`)."""
    images, labels, _ = shapes.sample(seed, size, mix)
    return {**adapter.pixel_inputs(adapter.normalise(images)), **question_batch(adapter, labels, seed, kinds)}


def adversarial(images: torch.Tensor, loss_of, eps: float, steps: int = 1) -> torch.Tensor:
    """`images` moved by at most `eps` per pixel to raise `loss_of(images)`, by signed-gradient
    steps from a random start: one step of 1.25 eps is FGSM-RS (Wong et al. 2020), the training
    attack; more steps of 2.5 eps / steps are PGD (Madry et al. 2018), the stronger test. A model
    trained on such images has input gradients that follow the shape rather than texture, and
    inversion follows those gradients."""
    step = 1.25 * eps if steps == 1 else 2.5 * eps / steps
    delta = torch.empty_like(images).uniform_(-eps, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        grad, = torch.autograd.grad(loss_of((images + delta).clamp(0, 1)), delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
    return (images + delta).clamp(0, 1).detach()


def _per_image_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))


def adversarial_l2(images: torch.Tensor, loss_of, eps: float, steps: int = 2) -> torch.Tensor:
    """`images` moved by at most `eps` in L2 norm per image (0-1 scale) to raise `loss_of(images)`:
    PGD with normalised-gradient steps of 2.5 eps / steps from a random start inside the ball. An
    L-inf bound of 16/255 cannot draw a saturated spot or stub; eps 3 can (about nine pixels fully
    changed), the cues the L-inf-robust toy took for a shape (a circle's notch, a cross's stubs; RESULTS.md, "L2 rounds")."""
    step = 2.5 * eps / steps
    delta = torch.randn_like(images)
    delta = delta / _per_image_norm(delta) * eps * torch.rand(len(images), *[1] * (images.dim() - 1))
    for _ in range(steps):
        delta.requires_grad_(True)
        grad, = torch.autograd.grad(loss_of((images + delta).clamp(0, 1)), delta)
        delta = delta.detach() + step * grad / _per_image_norm(grad)
        delta = delta * (eps / _per_image_norm(delta)).clamp(max=1)
    return (images + delta).clamp(0, 1).detach()


def _attack_half(images: torch.Tensor, loss_of, eps: float, steps: int = 1, l2: float = 0.0,
                 step: int = 0) -> torch.Tensor:
    """The first half of the batch made adversarial (the other half stays clean, for clean accuracy):
    within `eps` per pixel, or on odd steps when `l2` > 0, within `l2` per image (PGD-2)."""
    if eps <= 0:
        return images
    half = len(images) // 2
    rest = lambda x: loss_of(torch.cat([x, images[half:]]))
    attacked = adversarial_l2(images[:half], rest, l2) if l2 > 0 and step % 2 else \
        adversarial(images[:half], rest, eps, steps)
    return torch.cat([attacked, images[half:]])


def train_step(loss, optimizer, scheduler, params) -> float:
    """One update of every toy training (gradient clipped at norm 1); returns the loss."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    return loss.item()


def _schedule(optimizer, total_steps: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pretrain_vision(adapter, *, seed: int, steps: int, batch: int, lr: float, log_every: int = 50,
                    layout: str = "llava", adversarial_eps: float = 0.0, adversarial_steps: int = 1,
                    adversarial_l2: float = 0.0, mix=shapes.GROUNDED_MIX) -> list[float]:
    """Stage 1: tower + linear heads classify the 24 concepts, from the features the LM reads
    (LLaVA: layer -2's patch tokens; Qwen: the merged tokens) and from a second pooling of the
    tower (the CLS; the last block's patches), mean-pooled, as CLIP itself is trained."""
    _, _, _, tower_of, features_of = LAYOUTS[layout]
    tower = tower_of(adapter)
    classes = shapes.NO_SHAPE + 1  # the 24 concepts and "no shape"
    with torch.no_grad():
        widths = [f.shape[-1] for f in features_of(adapter, torch.zeros(1, 3, shapes.SIZE, shapes.SIZE))]
    heads = torch.nn.ModuleList([torch.nn.Linear(width, classes) for width in widths])
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    scheduler = _schedule(optimizer, steps, warmup=steps // 20)
    losses = []
    for step in range(steps):
        images, labels, _ = shapes.sample((seed, VISION_STREAM, step), batch, mix)
        loss_of = lambda x: sum(F.cross_entropy(head(f), labels) for head, f in zip(heads, features_of(adapter, x)))
        images = _attack_half(images, loss_of, adversarial_eps, adversarial_steps, adversarial_l2, step)
        features = features_of(adapter, images)
        patch_features = features[0]
        loss = sum(F.cross_entropy(head(f), labels) for head, f in zip(heads, features))
        losses.append(train_step(loss, optimizer, scheduler, params))
        if log_every and step % log_every == 0:
            shape_right = heads[0](patch_features).argmax(-1) // len(shapes.COLOURS) == labels // len(shapes.COLOURS)
            print(f"vision {step:5d} loss {losses[-1]:.3f} batch shape accuracy {shape_right.float().mean():.2f}",
                  flush=True)
    return losses


def train_language(adapter, *, seed: int, steps: int, batch: int, lr: float, tower_lr: float,
                   log_every: int = 50, layout: str = "llava", adversarial_eps: float = 0.0, adversarial_steps: int = 1,
                   adversarial_l2: float = 0.0, mix=shapes.GROUNDED_MIX) -> list[float]:
    """Stage 2: the whole VLM answers the questions; the pretrained tower moves slowly."""
    model = adapter.model
    tower = list(LAYOUTS[layout][3](adapter).parameters())
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": tower, "lr": tower_lr}],
                                  weight_decay=0.01)
    scheduler = _schedule(optimizer, steps, warmup=steps // 20)
    losses = []
    for step in range(steps):
        stream = (seed, LANGUAGE_STREAM, step)
        images, labels, _ = shapes.sample(stream, batch, mix)
        text = question_batch(adapter, labels, stream)
        loss_of = lambda x: model(**adapter.pixel_inputs(adapter.normalise(x)), **text).loss
        loss = loss_of(_attack_half(images, loss_of, adversarial_eps, adversarial_steps, adversarial_l2, step))
        losses.append(train_step(loss, optimizer, scheduler, model.parameters()))
        if log_every and step % log_every == 0:
            print(f"language {step:5d} loss {losses[-1]:.3f}", flush=True)
    return losses


@torch.no_grad()
def answers_right(adapter, inputs: dict) -> torch.Tensor:
    """Per row of a question batch (with `labels`): whether the whole answer + <eos> is the argmax
    at every answer position, what greedy decoding produces for these 1-3 token answers."""
    inputs = dict(inputs)
    targets = inputs.pop("labels")[:, 1:]
    predicted = adapter.model(**inputs).logits[:, :-1].argmax(-1)
    return ((predicted == targets) | (targets == -100)).all(dim=1)


@torch.no_grad()
def evaluate(adapter, *, seed: int = 0, n: int = 400, batch: int = 100, styles=None) -> dict[str, dict[str, float]]:
    """Per image style and question kind: the fraction of fresh images whose whole answer + <eos>
    is the argmax at every answer position (what greedy decoding produces for these 1-3 token answers).
    `styles`: default every style of shapes.STYLES whose answers the model has words for (a toy
    trained before "none" existed is not asked about shapeless images)."""
    if styles is None:
        styles = [s for s in shapes.STYLES if s not in shapes.NO_SHAPE_STYLES or "none" in adapter.tokenizer.get_vocab()]
    accuracy = {}
    for style in styles:
        s = shapes.STYLES.index(style)  # each style its own image stream, whichever are asked
        accuracy[style] = {}
        for k, kind in enumerate(shapes.QUESTION_KINDS):
            correct = 0
            for start in range(0, n, batch):
                inputs = make_batch(adapter, (seed, HELD_OUT_STREAM, s, k, start), min(batch, n - start),
                                    kinds=(kind,), mix={style: 1.0})
                correct += answers_right(adapter, inputs).sum().item()
            accuracy[style][kind] = correct / n
    return accuracy


@torch.no_grad()
def warm_start(model, tokenizer, init_dir) -> None:
    """Copy a trained toy of the same layout and sizes into `model`: every weight, and the token
    embeddings word by word, so words new to the vocabulary (e.g. "none") start from scratch."""
    old_tokenizer = PreTrainedTokenizerFast.from_pretrained(init_dir)
    old = type(model).from_pretrained(init_dir)
    new_state = model.state_dict()
    same = {key: value for key, value in old.state_dict().items()
            if key in new_state and value.shape == new_state[key].shape}
    embedding = model.get_input_embeddings().weight
    if set(new_state) - set(same) - {key for key, value in new_state.items() if value.shape == embedding.shape}:
        raise UserError(f"--init {init_dir}: not a toy of this layout and these sizes")
    model.load_state_dict(same, strict=False)
    old_embedding, old_vocab = old.get_input_embeddings().weight, old_tokenizer.get_vocab()
    for token, index in tokenizer.get_vocab().items():
        if token in old_vocab:
            embedding[index] = old_embedding[old_vocab[token]]


def _init_record(init) -> dict | None:
    """Where the training went on from, with that checkpoint's own training.json, so the whole
    chain of recipes stays readable beside the final checkpoint."""
    if init is None:
        return None
    record = Path(init) / "training.json"
    return {"checkpoint": str(init), "training": json.loads(record.read_text()) if record.is_file() else None}


def trainable_adapter(tokenizer, model, layout: str = "llava"):
    """The toolkit's adapter around a model to train (the adapter freezes its model for inversion)."""
    adapter = LAYOUTS[layout][2](model, tokenizer)
    adapter.use_resolution(shapes.SIZE)
    model.train().requires_grad_(True)
    return adapter


def parse_mix(text: str) -> dict[str, float]:
    """`"outline:0.4,filled:0.3"` -> {"outline": 0.4, "filled": 0.3} (`--mix`; `train` checks the styles)."""
    mix = {}
    for part in text.split(","):
        style, _, weight = part.partition(":")
        try:
            mix[style.strip()] = float(weight)
        except ValueError:
            raise UserError(f"--mix {text!r}: each part is STYLE:WEIGHT, e.g. outline:0.4, not {part!r}") from None
    return mix


def check_mix(mix: dict[str, float]) -> dict[str, float]:
    unknown = [style for style in mix if style not in shapes.STYLES]
    if unknown:
        raise UserError(f"--mix: unknown style {unknown[0]!r} (styles: {', '.join(shapes.STYLES)})")
    if any(weight < 0 for weight in mix.values()) or sum(mix.values()) <= 0:
        raise UserError("--mix: weights are >= 0 and not all 0")
    total = sum(mix.values())
    return {style: weight / total for style, weight in mix.items()}


def _final_loss(losses: list[float]) -> float | None:
    """The mean of the last 20 steps; None (JSON null, not NaN) for a stage that was skipped."""
    return float(np.mean(losses[-20:])) if losses else None


def train(out_dir, *, seed: int = 0, vision_steps: int = 5000, language_steps: int = 600, batch: int = 64,
          vision_lr: float = 3e-3, language_lr: float = 1e-3, tower_lr: float = 3e-4, eval_images: int = 400,
          model_sizes: dict | None = None, log_every: int = 50, layout: str = "llava", init=None,
          adversarial_eps: float = 0.0, adversarial_steps: int = 1, adversarial_l2: float = 0.0,
          mix: dict[str, float] | None = None, decoys: float = 0.0) -> dict:
    """Train (from scratch, or on from the checkpoint `init`), evaluate on fresh images and save
    the checkpoint plus `training.json` in `out_dir`. `mix`: each style's share of a batch
    (default GROUNDED_MIX); `decoys`: the share of each batch drawn as a decoy blob (answered
    "none"), the other styles keeping their proportions."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout takes one of {', '.join(LAYOUTS)}, not '{layout}'")
    check_replaceable(out_dir, lambda folder: (folder / "training.json").is_file(), "--out")  # before the long part
    if init is not None and not (Path(init) / "config.json").is_file():
        raise UserError(f"--init {init}: no checkpoint there (config.json missing)")
    mix = check_mix(mix or shapes.GROUNDED_MIX)
    torch.manual_seed(seed)
    started = time.time()
    make_tokenizer, make_model, _, _, _ = LAYOUTS[layout]
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, **(model_sizes or {}))
    if init is not None:
        warm_start(model, tokenizer, init)
    adapter = trainable_adapter(tokenizer, model, layout)
    if decoys:
        mix = {style: weight * (1 - decoys) for style, weight in mix.items()} | {"decoy": decoys}
    vision_losses = pretrain_vision(adapter, seed=seed, steps=vision_steps, batch=batch, lr=vision_lr,
                                    log_every=log_every, layout=layout, adversarial_eps=adversarial_eps,
                                    adversarial_steps=adversarial_steps, adversarial_l2=adversarial_l2, mix=mix)
    language_losses = train_language(adapter, seed=seed, steps=language_steps, batch=batch, lr=language_lr,
                                     tower_lr=tower_lr, log_every=log_every, layout=layout,
                                     adversarial_eps=adversarial_eps, adversarial_steps=adversarial_steps,
                                     adversarial_l2=adversarial_l2, mix=mix)
    minutes = (time.time() - started) / 60
    adapter.model.eval()
    accuracy = evaluate(adapter, n=eval_images)
    report = {
        "layout": layout, "seed": seed, "init": _init_record(init), "minutes": round(minutes, 2),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in adapter.model.parameters()),
        "recipe": {"vision_steps": vision_steps, "language_steps": language_steps, "batch": batch,
                   "vision_lr": vision_lr, "language_lr": language_lr, "tower_lr": tower_lr,
                   "model_sizes": model_sizes or {}, "adversarial_eps": adversarial_eps,
                   "adversarial_steps": adversarial_steps, "adversarial_l2": adversarial_l2,
                   "optimizer": "AdamW, linear warmup 5 %, cosine",
                   "image_styles": mix,
                   "pixel_mean": adapter.image_mean, "pixel_std": adapter.image_std},
        "held_out_accuracy": accuracy, "held_out_images_per_kind": eval_images,
        "final_loss": {"vision": _final_loss(vision_losses), "language": _final_loss(language_losses)},
    }
    with atomic_folder(out_dir, replace=True) as out:  # the old checkpoint stays whole until the new one is
        adapter.model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report

