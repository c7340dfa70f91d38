"""Shared by the language-model tests: an in-memory BPE tokenizer whose words split into pieces,
and features folders written straight from tensors (hand-made cases for the analyses)."""
import torch
from PIL import Image

from mimic_toolkit.lm_capture import Features, FeatureWriter


def bpe_tokenizer():
    """A SentencePiece-style BPE where "blue" is two pieces ("▁bl" + "ue") and "blueberry" four."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<eos>", "▁", *"abcdehilnorstuy", "▁a", "▁b", "▁bl", "ue", "▁r", "▁re", "▁red", "er", "ry",
              "▁c", "ir", "cl", "le", "ber", "▁t", "he", "▁the"]
    merges = [("▁", "a"), ("▁", "b"), ("▁b", "l"), ("u", "e"), ("▁", "r"), ("▁r", "e"), ("▁re", "d"), ("e", "r"),
              ("r", "y"), ("▁", "c"), ("i", "r"), ("c", "l"), ("l", "e"), ("b", "er"), ("▁", "t"), ("h", "e"), ("▁t", "he")]
    core = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")


def write_features(folder, rows, *, labels=None, model="llava-llama3", site="lm.1", ids=None, images=None):
    """A features folder with one sample per row of `rows` [N, D] (or per tensor of a list)."""
    writer = FeatureWriter(folder)
    for n, sample_rows in enumerate(rows):
        sample_rows = sample_rows.reshape(-1, sample_rows.shape[-1])
        entry = {"id": ids[n] if ids else f"s{n}", "image": str(images[n]) if images else "",
                 "question": "q", "labels": labels[n] if labels else {}, "positions": list(range(len(sample_rows)))}
        writer.add(entry, sample_rows)
    width = rows[0].shape[-1]
    meta = {"model": model, "checkpoint": "", "revision": "", "site": site, "selector": "last-prompt",
            "hidden_size": width}
    return Features.load(writer.finish(meta))


def colour_images(folder, colours):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, colour in enumerate(colours):
        paths.append(folder / f"{n}.png")
        Image.new("RGB", (32, 32), colour).save(paths[-1])
    return paths


def clusters(centres: torch.Tensor, per_cluster: int, noise: float = 0.05, seed: int = 0):
    """Rows around each centre ([K, D] -> [K * per_cluster, D]) and each row's cluster."""
    generator = torch.Generator().manual_seed(seed)
    owner = torch.arange(len(centres)).repeat_interleave(per_cluster)
    return centres[owner] + noise * torch.randn(len(owner), centres.shape[1], generator=generator), owner
