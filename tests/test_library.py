"""The library front door: `import mimic_toolkit as mt` does the commands' main jobs."""
import json

import mimic_toolkit as mt
from mimic_plugins.toy_shapes import shapes
from PIL import Image


def test_load_invert_stats_and_capture_from_python(in_tmp):
    adapter = mt.load_model(device="cpu")  # no name: the bundled default model
    assert adapter.model_id == "toy-shapes" and adapter.checkpoint

    run = mt.invert(adapter, class_index=3, iterations=4, batch_size=2, log_every=2, outputs=in_tmp / "run")
    assert run.folder == in_tmp / "run" and (run.folder / "report.html").is_file()
    assert tuple(run.images.shape) == (2, 3, 64, 64) and 0 <= run.images.min() and run.images.max() <= 1
    assert [row["step"] for row in run.metrics] == [1, 2, 4]
    assert json.loads((run.folder / "manifest.json").read_text())["concept"]["class_index"] == 3

    images, _ = shapes.sample(1, 3)
    (in_tmp / "images").mkdir()
    for i, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(in_tmp / "images" / f"{i}.png")
    stats = mt.compute_stats(adapter, in_tmp / "images", class_index=3, feature_sites="last:2")
    assert stats.meta["image_count"] == "3" and stats.sites == ["vision.layers.2.mlp", "vision.layers.3.mlp"]
    assert stats.save(in_tmp / "stats").is_file()

    features = mt.capture(adapter, images=in_tmp / "images", site="lm.1", tokens="last-prompt", out=in_tmp / "f")
    assert features.meta["samples"] == 3 and features.meta["rows"] == 3 and features.site == "lm.1"


def test_importing_the_package_stays_cheap():
    import subprocess
    import sys

    code = "import sys, mimic_toolkit as mt; mt.hookimpl; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
