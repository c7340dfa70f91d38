"""Inside the bundled toy-shapes-v1 model, where the truth is known (issue 6's checks): concepts of
colour words separate the generator's colours, a red-to-blue steering vector flips the colour and
leaves the shape, and inverting a colour concept paints that colour.

The toy LM has two decoder layers. At the last prompt token of "What colour is the shape?" the
colour is already decided after layer 0 (lm.0); the shape only after layer 1 (shape-word features
at lm.0 still group by colour). Measured values are in the README (Inside the language model)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimic_plugins.toy_shapes import shapes
from mimic_toolkit.lm_capture import Features, Sample, Selector, capture
from mimic_toolkit.concepts import fit_concepts
from mimic_toolkit.decompose import fit, purity
from mimic_toolkit.lm import PositionPolicy
from mimic_toolkit.steer import build_vector, steer_answers

CHECKPOINT = Path(shapes.__file__).with_name("checkpoint-v1")
# The first toy, where these values were measured (README). On the grounded toy-shapes the same
# red-to-blue vector at lm.0 flips the colour but also every shape answer (kept 0.00 at alpha 0.8).
MODEL = "toy-shapes-v1"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").is_file(), reason="no toy checkpoint")]
COLOUR_Q, SHAPE_Q, DESCRIBE_Q = "What colour is the shape?", "What shape is in the image?", shapes.DEFAULT_QUESTION
COLOUR_WORDS = Selector("word", shapes.COLOURS)
HUES = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}


@pytest.fixture(scope="module")
def toy():
    from mimic_toolkit.engine import load_model

    return load_model(MODEL, device="cpu")


def draw(folder: Path, colours, question: str, per_shape: int, seed: int) -> list[Sample]:
    """Generator images of every shape in the given colours, saved as PNGs, with their labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for colour in colours:
        for shape in shapes.SHAPES:
            for i in range(per_shape):
                path = folder / f"{colour}-{shape}-{i}.png"
                Image.fromarray((shapes.render(shape, colour, rng) * 255).round().astype(np.uint8)).save(path)
                samples.append(Sample(path.stem, path, question, {"colour": colour, "shape": shape}))
    return samples


def hue_shares(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image [B, 3, H, W] in [0, 1]: the fraction of its pixels that are saturated (S > 0.5,
    V > 0.3) and nearest in hue to each of the generator's colours."""
    high, channel = images.max(1)
    low = images.min(1).values
    spread = (high - low).clamp_min(1e-6)
    r, g, b = images.unbind(1)
    hue = 60 * torch.where(channel == 0, ((g - b) / spread) % 6,
                           torch.where(channel == 1, (b - r) / spread + 2, (r - g) / spread + 4))
    saturated = (spread / high.clamp_min(1e-6) > 0.5) & (high > 0.3)
    centres = torch.tensor(list(HUES.values()), dtype=torch.float32)
    nearest = ((hue[..., None] - centres + 180) % 360 - 180).abs().argmin(-1)
    return {name: ((nearest == k) & saturated).float().mean((1, 2)) for k, name in enumerate(HUES)}


@pytest.fixture(scope="module")
def colour_words(toy, tmp_path_factory):
    """Colour-word features at lm.0: 72 images (6 colours x 4 shapes x 3), the position that
    predicts the colour word of the answer."""
    folder = tmp_path_factory.mktemp("toy-colours")
    samples = draw(folder / "images", shapes.COLOURS, COLOUR_Q, 3, seed=0)
    return Features.load(capture(toy, MODEL, samples, "lm.0", COLOUR_WORDS, folder / "features"))


@pytest.mark.parametrize("method", ["snmf", "kmeans"])
def test_colour_word_concepts_are_pure_and_grounded_in_their_colour(toy, colour_words, method, tmp_path):
    assert len(colour_words.index) == 72 and not colour_words.meta["skipped"]
    folder = fit_concepts(colour_words, method, len(shapes.COLOURS), tmp_path / method, adapter=toy)
    summary = json.loads((folder / "concepts.json").read_text())
    purity_ = summary["meta"]["metrics"]["purity"]
    print(f"{method}: purity {purity_}, words {[c['words'][:2] for c in summary['concepts']]}")
    assert purity_["colour"] >= 0.9
    top_words = [card["words"][0] for card in summary["concepts"]]
    assert sorted(top_words) == sorted(shapes.COLOURS)  # each concept's first word is its own colour


def test_shape_word_concepts_separate_the_shapes_after_layer_1(toy, tmp_path):
    samples = draw(tmp_path / "images", shapes.COLOURS, SHAPE_Q, 3, seed=5)
    features = Features.load(capture(toy, MODEL, samples, "lm.1", Selector("word", shapes.SHAPES),
                                     tmp_path / "features"))
    rows, labels = features.matrix(), [e["labels"]["shape"] for e in features.index]
    for method in ("snmf", "kmeans"):
        value = purity(fit(rows, method, len(shapes.SHAPES)).activations(rows).argmax(1).tolist(), labels)
        print(f"shape purity {method}: {value:.3f}")
        assert value >= 0.9


def test_a_red_to_blue_vector_flips_the_colour_and_keeps_the_shape(toy, tmp_path):
    red = draw(tmp_path / "red", ["red"], COLOUR_Q, 6, seed=1)
    blue = draw(tmp_path / "blue", ["blue"], COLOUR_Q, 6, seed=2)
    base = Features.load(capture(toy, MODEL, red, "lm.0", Selector("word", ("red",)), tmp_path / "fr"))
    target = Features.load(capture(toy, MODEL, blue, "lm.0", Selector("word", ("blue",)), tmp_path / "fb"))
    vector, _ = build_vector(base, target)
    held_out = draw(tmp_path / "test", ["red"], COLOUR_Q, 12, seed=3)  # 48 red shapes

    def answers(question, positions):
        samples = [Sample(s.id, s.image, question, s.labels) for s in held_out]
        # alpha 0.8: at 1 the vector overshoots in this 2-layer model (shape answers 81 % unchanged)
        return steer_answers(toy, samples, "lm.0", vector, 0.8, PositionPolicy.parse(positions), max_new_tokens=5,
                             batch_size=48)

    colour = answers(COLOUR_Q, "last-prompt")
    shape = answers(SHAPE_Q, "last-prompt")
    described = answers(DESCRIBE_Q, "generated")  # "a red circle": the colour is the second answer token
    flipped = np.mean([r["before"] == "red" and r["after"] == "blue" for r in colour])
    kept = np.mean([r["after"] == r["before"] for r in shape])
    described_blue = np.mean([r["after"].split()[1:2] == ["blue"] for r in described])
    described_kept = np.mean([r["after"].split()[2:] == r["before"].split()[2:] for r in described])
    print(f"colour flipped {flipped:.3f}, shape answers kept {kept:.3f}; "
          f"described: blue {described_blue:.3f}, shape kept {described_kept:.3f}")
    assert flipped >= 0.8 and kept >= 0.9
    assert described_blue >= 0.8 and described_kept >= 0.9


def test_inverting_a_colour_concept_paints_that_colour(toy, colour_words, tmp_path):
    """Each colour concept inverted from noise (600 steps, one image) with the image priors of the
    toy's own inversion defaults and no feature statistics: class statistics would carry the colour
    themselves, and all-colour ones held the toy's inversions (answer or concept) at noise."""
    from mimic_toolkit.registry import default_registry
    from mimic_toolkit.session import build_config, run_inversion

    rng = np.random.default_rng(0)
    for colour in HUES:  # the measure names the colour of generator images
        shares = hue_shares(torch.from_numpy(shapes.render("circle", colour, rng)).permute(2, 0, 1)[None])
        assert max(HUES, key=lambda name: shares[name][0]) == colour
    folder = fit_concepts(colour_words, "kmeans", len(shapes.COLOURS), tmp_path / "concepts", adapter=toy)
    cards = json.loads((folder / "concepts.json").read_text())["concepts"]
    registry = default_registry()
    dominated = 0
    for card in cards:
        colour = card["words"][0]
        config = build_config(registry, {"model": MODEL, "objective": f"concept:{folder}:{card['concept']}",
                                         "question": COLOUR_Q, "answer": colour, "iterations": 600, "batch_size": 1,
                                         "seed": 0, "outputs": str(tmp_path / colour),
                                         # the first toy's inversion settings, which the README's values used
                                         "lr": 0.05, "jitter": 4, "views": 1,
                                         "scales": {"feature": 0.0, "tv_l1": 0.05, "tv_l2": 0.05}})
        run = run_inversion(registry, config)
        image = torch.from_numpy(np.array(Image.open(run / "images" / "00.png").convert("RGB"))).permute(2, 0, 1)
        shares = {name: float(value[0]) for name, value in hue_shares(image[None].float() / 255).items()}
        print(f"{colour} concept: {', '.join(f'{n} {v:.2f}' for n, v in sorted(shares.items(), key=lambda x: -x[1]))}")
        dominated += max(shares, key=shares.get) == colour
        assert shares[colour] >= 0.15  # noise gives each hue about 0.1
    assert dominated >= 5  # measured: 5 of 6; the red concept paints orange (red and yellow pixels)
