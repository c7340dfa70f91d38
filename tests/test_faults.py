"""Hostile inputs and faults (issue 12): each ends in exactly one `error:` line and exit code 2, with
no traceback, and leaves every file as it was; a resumable run stays resumable to the bit-identical end."""
import errno
import re
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mimic_toolkit.cli import app
from mimic_toolkit.registry import build_registry
from mimic_toolkit.session import Interrupted, build_config, run_inversion

RUN = ["invert", "--iterations", "4", "--batch-size", "1", "--quiet"]  # the bundled toy model, on CPU


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def fails(result, *fragments):
    """Exit 2 with one `error:` line naming the problem, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every resumed one must match."""
    folder = tmp_path_factory.mktemp("straight") / "run"
    assert invoke(*RUN, "--outputs", folder).exit_code == 0
    return folder


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped (Ctrl-C) after step 2: its `.partial` folder with a checkpoint."""
    folder = tmp_path_factory.mktemp("interrupted") / "run"
    registry = build_registry()
    config = build_config(registry, {"iterations": 4, "batch_size": 1, "outputs": str(folder)})
    calls = []
    with pytest.raises(Interrupted):
        run_inversion(registry, config, stop_requested=lambda: calls.append(1) or len(calls) == 2)
    return folder.with_name("run.partial")


@pytest.fixture
def partial(interrupted, tmp_path):
    copy = tmp_path / "run.partial"
    shutil.copytree(interrupted, copy)
    return copy


def resumes_to_the_same_end(partial: Path, straight: Path):
    assert invoke("invert", "--resume", partial, "--quiet").exit_code == 0
    final = partial.with_name("run")
    for image in (straight / "images").iterdir():
        assert (final / "images" / image.name).read_bytes() == image.read_bytes()


class Payload:
    """Unpickling it would run code (it must never be)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _rewrite(drop=(), replace=None, step="2"):
    def corrupt(path: Path):
        tensors = {k: v for k, v in load_file(path).items() if k not in drop}
        tensors.update(replace or {})
        save_file(tensors, path, metadata={"format": "mimic-checkpoint/1", "step": step})
    return corrupt


CHECKPOINT_FAULTS = {
    "pickle": (lambda path: path.write_bytes(pickle.dumps(Payload(path.parent / "pwned"))), "truncated or damaged"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:1000]), "truncated or damaged"),
    "empty": (lambda path: path.write_bytes(b""), "truncated or damaged"),
    "garbage-header": (lambda path: path.write_bytes((40).to_bytes(8, "little") + b"{" * 40), "truncated or damaged"),
    "missing-images": (_rewrite(drop=("images",)), "misses 'images'"),
    "wrong-shape": (_rewrite(replace={"exp_avg": torch.zeros(3)}), "'exp_avg' is (3,)"),
    "extra-tensor": (_rewrite(replace={"code": torch.zeros(1)}), "holds 'code'"),
    "bad-step": (_rewrite(step="two"), "no valid step"),
    "other-format": (lambda path: save_file({"images": torch.zeros(1)}, path), "is not a checkpoint"),
}


@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS)
def test_a_bad_checkpoint_is_one_line_and_nothing_runs(partial, fault):
    corrupt, message = CHECKPOINT_FAULTS[fault]
    corrupt(partial / "checkpoint.safetensors")
    before = snapshot(partial)
    fails(invoke("invert", "--resume", partial, "--quiet"), message, "checkpoint.safetensors")
    assert snapshot(partial) == before and not (partial / "pwned").exists()


CONFIG_FAULTS = {
    "python-tag": ("!!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),
    "not-yaml": ("model: [unclosed\n", "not valid YAML"),
    "not-a-mapping": ("- 1\n- 2\n", "mapping of settings"),
}


@pytest.mark.parametrize("fault", CONFIG_FAULTS)
def test_a_bad_run_config_is_one_line(partial, straight, fault):
    text, message = CONFIG_FAULTS[fault]
    good = (partial / "config.yaml").read_text()
    (partial / "config.yaml").write_text(text)
    fails(invoke("invert", "--resume", partial, "--quiet"), message, "config.yaml")
    assert not (partial / "pwned").exists()
    (partial / "config.yaml").write_text(good)
    resumes_to_the_same_end(partial, straight)


def test_an_old_pickled_checkpoint_is_not_resumable(partial):
    (partial / "checkpoint.safetensors").rename(partial / "checkpoint.pt")
    fails(invoke("invert", "--resume", partial, "--quiet"), "not a resumable run", "checkpoint.safetensors")


def _stats_file(tmp_path, meta=None, drop=(), replace=None):
    """A copy of the toy model's class-0 statistics with its metadata or tensors changed."""
    good = next(Path(build_registry().default_model().stats).glob("toy-shapes-c0-*.safetensors"))
    tensors = {k: v for k, v in load_file(good).items() if k not in drop}
    tensors.update(replace or {})
    with safe_open(good, "pt") as f:
        metadata = {k: v for k, v in {**f.metadata(), **(meta or {})}.items() if v is not None}
    path = tmp_path / "stats" / good.name
    path.parent.mkdir()
    save_file(tensors, path, metadata=metadata)
    return path


STATS_FAULTS = {
    "no-sites": (dict(meta={"sites": None}), "misses its 'sites' metadata"),
    "sites-not-a-list": (dict(meta={"sites": '{"a": 1}'}), "'sites' metadata must be a JSON list"),
    "sites-not-json": (dict(meta={"sites": "vision.patch_embedding"}), "'sites' metadata must be a JSON list"),
    "resolution-not-an-integer": (dict(meta={"resolution": "64px"}), "'resolution' metadata must be a positive integer"),
    "missing-tensor": (dict(drop=("vision.patch_embedding/mean",)), "misses the tensor 'vision.patch_embedding/mean'"),
    "nan-tensor": (dict(replace={"vision.patch_embedding/var": torch.full((64,), float("nan"))}),
                   "'vision.patch_embedding/var' holds NaN or infinite values"),
}


@pytest.mark.parametrize("fault", STATS_FAULTS)
@pytest.mark.parametrize("given", ["file", "folder"])
def test_a_bad_statistics_file_is_one_line(tmp_path, fault, given):
    change, message = STATS_FAULTS[fault]
    path = _stats_file(tmp_path, **change)
    fails(invoke(*RUN, "--stats", path if given == "file" else path.parent, "--outputs", tmp_path / "run"), message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_a_statistics_folder_with_a_garbage_header_is_one_line(tmp_path):
    path = _stats_file(tmp_path)
    path.write_bytes((20).to_bytes(8, "little") + b'"just a json string"')
    fails(invoke(*RUN, "--stats", path.parent, "--outputs", tmp_path / "run"), "truncated or damaged", path.name)


@pytest.fixture
def image_folder(tmp_path, monkeypatch):
    """A good image, a decompression bomb (and one at PIL's warning level) and a broken image whose
    name is not valid UTF-8; PIL's pixel limit is lowered so that the bombs stay small."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (30, 30), "red").save(folder / "good.png")
    Image.new("RGB", (64, 64)).save(folder / "bomb.png")  # over twice the limit: PIL's error
    Image.new("RGB", (40, 40)).save(folder / "bomb-warning.png")  # over the limit: PIL's warning
    (folder / os.fsdecode(b"broken-\xff.png")).write_bytes(b"not a png")
    return folder


def test_unreadable_images_are_skipped_and_named(image_folder, tmp_path):
    result = invoke("stats", "--images", image_folder, "--out", tmp_path / "stats")
    assert result.exit_code == 0, result.output
    assert "1 images" in result.stdout and "Traceback" not in result.output + result.stderr
    assert sorted(line.rsplit("/", 1)[-1] for line in result.stderr.splitlines()) == [
        "bomb-warning.png': DecompressionBombWarning", "bomb.png': DecompressionBombError",
        "broken-\\xff.png': UnidentifiedImageError"]


def test_a_folder_of_only_unreadable_images_is_one_line(image_folder, tmp_path):
    (image_folder / "good.png").unlink()
    result = invoke("stats", "--images", image_folder, "--out", tmp_path / "stats")
    assert result.exit_code == 2 and result.stderr.splitlines()[-1].startswith("error: no readable images")
    assert "Traceback" not in result.output + result.stderr and not (tmp_path / "stats").exists()


def test_capture_names_an_unreadable_image(image_folder):
    from mimic_toolkit.errors import UserError
    from mimic_toolkit.lm_capture import load_samples, open_images

    samples = {sample.image.name: sample for sample in load_samples(images=image_folder)}
    assert len(open_images([samples["good.png"]])) == 1
    for name in ("bomb.png", "bomb-warning.png", os.fsdecode(b"broken-\xff.png")):
        with pytest.raises(UserError, match="unreadable image") as error:
            open_images([samples[name]])
        str(error.value).encode("utf-8")  # printable


SETTING_FAULTS = {
    "lr-nan": (["--lr", "nan"], "lr must be a finite number"),
    "lr-inf": (["--lr", "inf", "--min-lr", "0"], "lr must be a finite number"),
    "min-lr-nan": (["--min-lr", "nan"], "min-lr must be a finite number"),
    "scale-nan": (["--scale", "main=nan"], "the scale of 'main' must be a finite number"),
    "term-scale-inf": (["--tv-l1-loss-scale", "inf"], "the scale of 'tv_l1' must be a finite number"),
    "jitter-too-large": (["--jitter", "64"], "jitter must be smaller than the image side 64"),
    "seed-negative": (["--seed", "-1"], "seed must be from 0 to"),
    "seed-beyond-64-bits": (["--seed", str(2 ** 64)], "seed must be from 0 to"),
    "resolution-zero": (["--resolution", "0"], "resolution must be at least 1"),
    "resolution-negative": (["--resolution", "-32"], "resolution must be at least 1"),
    "batch-size-zero": (["--batch-size", "0"], "batch-size must be at least 1"),
    "yaml-nan": ("lr: .nan\n", "lr must be a finite number"),
    "yaml-inf-scale": ("scales: {feature: .inf}\n", "the scale of 'feature' must be a finite number"),
    "yaml-scales-list": ("scales: [1, 2]\n", "'scales' must be a mapping"),
    "yaml-scales-number": ("scales: 3\n", "'scales' must be a mapping"),
}


@pytest.mark.parametrize("fault", SETTING_FAULTS)
def test_a_setting_out_of_its_range_is_one_line(tmp_path, fault):
    given, message = SETTING_FAULTS[fault]
    if isinstance(given, str):  # a config file
        (tmp_path / "run.yaml").write_text(given)
        given = ["--config", tmp_path / "run.yaml"]
    fails(invoke(*RUN, *given, "--outputs", tmp_path / "run"), message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_an_edited_run_config_is_checked_on_resume(partial):
    config = partial / "config.yaml"
    config.write_text(re.sub(r"(?m)^lr: .*$", "lr: .nan", config.read_text()))
    fails(invoke("invert", "--resume", partial, "--quiet"), "lr must be a finite number")


def _failing(original, errno_, when):
    """`original` (Path.mkdir, Path.write_text/bytes, Image.save) failing with `errno_` on the calls
    `when(path)` picks, after writing part of the file, as a full disk does."""
    def write(self, *args, **kwargs):
        path = self if isinstance(self, Path) else Path(args[0])
        if when(path):
            if original.__name__ != "mkdir":
                path.write_bytes(b"half a file")
            raise OSError(errno_, os.strerror(errno_))
        return original(self, *args, **kwargs)
    return write


def _nth(name: str, n: int):
    calls = []
    return lambda path: name in path.name and (calls.append(path) or len(calls) == n)


def test_the_outputs_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("mine")
    fails(invoke(*RUN, "--outputs", tmp_path / "file" / "run"), "cannot write", "Not a directory", "file/run")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("errno_", [errno.EROFS, errno.EACCES])
def test_a_read_only_file_system(tmp_path, monkeypatch, errno_):
    monkeypatch.setattr(Path, "mkdir", _failing(Path.mkdir, errno_, lambda path: path.is_relative_to(tmp_path)))
    fails(invoke(*RUN, "--outputs", tmp_path / "out" / "run"), "cannot write", os.strerror(errno_))
    assert not list(tmp_path.iterdir())


DISK_FULL = {  # what fills the disk; the step of the checkpoint left to resume from (None: no folder left)
    "config": ((Path, "write_text", "config.yaml", 1), None),
    "second-checkpoint": ((Path, "write_bytes", "checkpoint", 2), "2"),
    "final-images": ((Image.Image, "save", "00.png", 1), "4"),
}


@pytest.mark.parametrize("fault", DISK_FULL)
def test_a_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch, straight, fault):
    (owner, method, name, n), step = DISK_FULL[fault]
    monkeypatch.setattr(owner, method, _failing(getattr(owner, method), errno.ENOSPC, _nth(name, n)))
    fails(invoke(*RUN, "--checkpoint-every", "2", "--outputs", tmp_path / "run"),
          "cannot write", "No space left on device", name)
    monkeypatch.undo()
    partial = tmp_path / "run.partial"
    assert not (tmp_path / "run").exists()
    if step is None:
        assert not partial.exists()
        return
    assert not [p for p in partial.rglob("*") if p.name.endswith(".partial")]  # no half-written file
    assert safe_open(partial / "checkpoint.safetensors", "pt").metadata()["step"] == step
    resumes_to_the_same_end(partial, straight)


def test_a_run_that_died_before_its_first_checkpoint_is_restarted(partial, straight):
    """kill -9 or a full disk before the first checkpoint: --resume and a rerun agree (restart it)."""
    (partial / "checkpoint.safetensors").rename(partial / "checkpoint.safetensors.partial")  # half-written
    fails(invoke("invert", "--resume", partial, "--quiet"), "not a resumable run", "rerun without --resume")
    result = invoke(*RUN, "--outputs", partial.with_name("run"))
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [f"'{partial}' stopped before its first checkpoint; starting it again"]
    for image in (straight / "images").iterdir():
        assert (partial.with_name("run") / "images" / image.name).read_bytes() == image.read_bytes()


def test_a_rerun_of_a_run_with_a_checkpoint_says_resume(partial):
    before = snapshot(partial)
    fails(invoke(*RUN, "--outputs", partial.with_name("run")), "holds an unfinished run", f"--resume {partial}")
    assert snapshot(partial) == before


# -- checkpoint folders --------------------------------------------------------------------------
def _config_with(folder: Path, **text_config):
    import json

    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(text_config)
    (folder / "config.json").write_text(json.dumps(config))


MODEL_FAULTS = {
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
                          "weights of", "damaged"),
    "zero-byte weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "damaged"),
    "garbage header": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), "damaged"),
    "weights of other shapes": (lambda d: _config_with(d, hidden_size=128), "do not fit its config.json"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "could not load the tokenizer"),
    "corrupt tokenizer": (lambda d: (d / "tokenizer.json").write_text("{garbage"), "could not load the tokenizer"),
    "only pickled weights": (lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(
        pickle.dumps({"weights": 1}))), "only pickled weights", "convert them to safetensors"),
    "no config.json": (lambda d: (d / "config.json").unlink(), "not a model folder"),
}


@pytest.mark.parametrize("fault", MODEL_FAULTS)
def test_a_damaged_checkpoint_folder_is_one_line(tiny_checkpoint, tmp_path, fault):
    damage, *fragments = MODEL_FAULTS[fault]
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    damage(folder)
    result = invoke(*RUN, "--model", "llava-llama3", "--checkpoint", folder, "--question", "What is in the image?",
                    "--answer", "red", "--feature-loss-scale", 0, "--outputs", tmp_path / "run")
    fails(result, str(folder), *fragments)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


# -- the command line itself ------------------------------------------------------------------------
USAGE_FAULTS = {
    "not-an-integer": (["invert", "--iterations", "abc"], "Invalid value for '--iterations'", "invert --help)"),
    "unknown-option": (["invert", "--bogus"], "No such option: --bogus", "invert --help)"),
    "missing-option": (["concepts", "fit"], "Missing option '--features'", "concepts fit --help)"),
    "unknown-command": (["nosuch"], "No such command 'nosuch'", "--help)"),
}


@pytest.mark.parametrize("fault", USAGE_FAULTS)
def test_a_usage_error_is_one_line_with_a_hint(fault):
    args, *fragments = USAGE_FAULTS[fault]
    fails(invoke(*args), *fragments)


def test_help_still_shows_the_usage():
    result = invoke("invert", "--help")
    assert result.exit_code == 0 and "Usage:" in result.output and "--iterations" in result.output


COUNT_FAULTS = {
    "stats-batch-size": (["stats", "--images", "x", "--batch-size", 0], "'--batch-size'"),
    "concepts-k": (["concepts", "fit", "--features", "x", "--k", 0], "'--k'"),
    "concepts-words": (["concepts", "fit", "--features", "x", "--words", 0], "'--words'"),
    "concepts-images": (["concepts", "fit", "--features", "x", "--images", 0], "'--images'"),
    "project-top": (["concepts", "project", "--concepts", "x", "--features", "x", "--top", 0], "'--top'"),
    "capture-batch-size": (["capture", "--site", "lm.0", "--tokens", "all", "--batch-size", 0], "'--batch-size'"),
    "capture-max-new-tokens": (["capture", "--site", "lm.0", "--tokens", "all", "--max-new-tokens", -1],
                               "'--max-new-tokens'"),
    "steer-batch-size": (["steer", "apply", "--vector", "x", "--batch-size", 0], "'--batch-size'"),
    "shift-k": (["shift", "--original", "x", "--finetuned", "x", "--k", 0], "'--k'"),
}


@pytest.mark.parametrize("fault", COUNT_FAULTS)
def test_a_count_below_one_is_one_line(fault):
    args, option = COUNT_FAULTS[fault]
    fails(invoke(*args), option, "greater than or equal to 1")


def test_k_below_one_is_refused_by_the_library_too():
    from mimic_toolkit.decompose import fit
    from mimic_toolkit.errors import UserError

    with pytest.raises(UserError, match="K must be at least 1"):
        fit(torch.zeros(3, 2), "pca", 0)


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_a_non_finite_steering_alpha_is_one_line(alpha):
    fails(invoke("steer", "apply", "--vector", "x", "--images", "x", "--alpha", alpha), "--alpha must be a finite number")


# -- features folders, dataset files and steering vectors ---------------------------------------------
@pytest.fixture(scope="module")
def features(tiny_checkpoint, tmp_path_factory):
    """A good features folder of two images, captured from a dataset file beside them."""
    from lm_helpers import colour_images

    folder = tmp_path_factory.mktemp("features")
    colour_images(folder / "images", ["red", "blue"])
    (folder / "data.jsonl").write_text("".join(json.dumps({"image": f"images/{n}.png"}) + "\n" for n in range(2)))
    result = invoke("capture", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint, "--dataset",
                    folder / "data.jsonl", "--site", "lm.1", "--tokens", "last-prompt", "--out", folder / "f")
    assert result.exit_code == 0, result.output
    return folder / "f"


def _edit_json(name, change, lines=False):
    def edit(folder: Path):
        path = folder / name
        if lines:
            values = [json.loads(line) for line in path.read_text().splitlines()]
            path.write_text("".join(json.dumps(change(n, value)) + "\n" for n, value in enumerate(values)))
        else:
            path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return edit


def _without(key):
    return lambda value: {k: v for k, v in value.items() if k != key}


FEATURES_FAULTS = {
    "meta-without-rows": (_edit_json("meta.json", _without("rows")), "meta.json needs 'rows'"),
    "meta-without-checkpoint": (_edit_json("meta.json", _without("checkpoint")), "meta.json needs 'checkpoint'"),
    "meta-hidden-size-a-string": (_edit_json("meta.json", lambda meta: {**meta, "hidden_size": "64"}),
                                  "meta.json needs 'hidden_size' (int), has '64'"),
    "meta-not-json": (lambda d: (d / "meta.json").write_text("{oops"), "meta.json' is not valid JSON"),
    "entry-without-rows": (_edit_json("index.jsonl", lambda n, e: _without("rows")(e) if n == 1 else e, lines=True),
                           "index.jsonl line 2 needs", '"rows"'),
    "index-not-utf8": (lambda d: (d / "index.jsonl").write_bytes(b'{"id": "\xff"}\n'), "cannot read", "index.jsonl"),
    "index-not-json": (lambda d: (d / "index.jsonl").open("a").write("{oops\n"), "index.jsonl' line 3 is not valid JSON"),
    "shard-truncated": (lambda d: (d / "shard-00000.safetensors").write_bytes(b"\x10"), "shard-00000", "truncated"),
    "shard-without-hidden": (lambda d: save_file({"other": torch.zeros(2)}, d / "shard-00000.safetensors",
                                                 metadata={"format": "mimic-features/1"}), "misses the tensor 'hidden'"),
}


@pytest.mark.parametrize("words", [True, False], ids=["words", "no-words"])
@pytest.mark.parametrize("fault", FEATURES_FAULTS)
def test_a_damaged_features_folder_is_one_line(features, tmp_path, fault, words):
    damage, *fragments = FEATURES_FAULTS[fault]
    folder = tmp_path / "f"
    shutil.copytree(features, folder)
    damage(folder)
    before = snapshot(folder)
    args = ["concepts", "fit", "--features", folder, "--method", "kmeans", "--k", 1, "--out", tmp_path / "c"]
    fails(invoke(*args, *([] if words else ["--no-words"])), *fragments)
    assert snapshot(folder) == before and not list(tmp_path.glob("c*"))


def test_a_dataset_image_may_not_leave_its_folder(features, tiny_checkpoint, tmp_path):
    dataset = tmp_path / "data" / "d.jsonl"
    dataset.parent.mkdir()
    capture = ["capture", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint, "--site", "lm.1",
               "--tokens", "last-prompt", "--dataset", dataset, "--out", tmp_path / "f"]
    dataset.write_text(json.dumps({"image": "../../../../etc/passwd"}) + "\n")
    fails(invoke(*capture), "entry 0", "'../../../../etc/passwd' is outside the dataset's folder", "--allow-outside")
    dataset.write_text(json.dumps({"image": str(features.parent / "images" / "0.png")}) + "\n")
    fails(invoke(*capture), "entry 0", "is outside the dataset's folder")
    assert not (tmp_path / "f").exists()
    assert invoke(*capture, "--allow-outside").exit_code == 0


def test_a_dataset_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"image": "\xff.png"}\n')
    fails(invoke("capture", "--site", "lm.1", "--tokens", "all", "--dataset", tmp_path / "d.jsonl"),
          "cannot read dataset file", "d.jsonl")


VECTOR_FAULTS = {
    "meta-a-list": ('["mimic-steering/1"]', "is not a steering vector file"),
    "meta-without-site": ('{"format": "mimic-steering/1", "model": "llava-llama3"}', "its meta needs 'site'"),
}


@pytest.mark.parametrize("fault", VECTOR_FAULTS)
def test_a_damaged_steering_vector_is_one_line(tmp_path, fault):
    meta, message = VECTOR_FAULTS[fault]
    save_file({"vector": torch.zeros(8)}, tmp_path / "v.safetensors", metadata={"meta": meta})
    fails(invoke("steer", "apply", "--vector", tmp_path / "v.safetensors", "--images", tmp_path), message, "v.safetensors")


REPORT_FAULTS = {
    "metrics-truncated-line": ("metrics.jsonl", lambda text: text + '{"step": 5, "lo', "metrics.jsonl' line 3 is not valid JSON"),
    "metrics-not-an-object": ("metrics.jsonl", lambda text: "[1, 2]\n" + text, "metrics.jsonl' line 1 is not a JSON object"),
    "manifest-truncated": ("manifest.json", lambda text: text[:20], "manifest.json' is not valid JSON"),
    "manifest-a-list": ("manifest.json", lambda text: "[]", "manifest.json' is not a JSON object"),
}


@pytest.mark.parametrize("fault", REPORT_FAULTS)
def test_a_report_of_a_damaged_run_folder_is_one_line(straight, tmp_path, fault):
    name, damage, message = REPORT_FAULTS[fault]
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / name).write_text(damage((run / name).read_text()))
    before = snapshot(run)
    fails(invoke("report", run), message)
    assert snapshot(run) == before


def test_a_loaded_tensor_with_nan_is_one_line(tmp_path):
    """Every file of tensors the toolkit reads (statistics, checkpoints, features, vectors, concepts)."""
    from mimic_toolkit.steer import FORMAT, load_vector
    from mimic_toolkit.errors import UserError


    path = tmp_path / "v.safetensors"
    save_file({"vector": torch.tensor([1.0, float("nan")])}, str(path),
              metadata={"meta": json.dumps({"format": FORMAT, "model": "toy-shapes", "site": "lm.0"})})
    with pytest.raises(UserError, match="'vector' holds NaN or infinite values"):
        load_vector(path)
    from mimic_toolkit.tensorfile import read_safetensors

    save_file({"images": torch.tensor([float("inf")])}, str(tmp_path / "c.safetensors"))
    with pytest.raises(UserError, match="'images' holds NaN or infinite values"):
        read_safetensors(tmp_path / "c.safetensors", "checkpoint")


@pytest.mark.parametrize("device, fragment", [("cuda:7", "device 'cuda:7' does not exist on this machine (it has: cpu"),
                                              ("tpu", "device must be auto, cpu, cuda or cuda:N, not 'tpu'")])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, device, fragment):
    if torch.cuda.is_available():
        pytest.skip("the message lists this machine's GPUs")
    fails(invoke(*RUN, "--device", device, "--outputs", tmp_path / "run"), fragment)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
