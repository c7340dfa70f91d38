"""Vision-tower feature statistics: recording them during a forward pass, computing the targets
from a folder of real images, and storing them content-addressed with their metadata."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .adapter import VLMAdapter
from .atomic import write_file
from .errors import UserError, shown
from .hooks import SiteHooks
from .tensorfile import read_safetensors

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
FORMAT = "mimic-feature-stats/1"


class FeatureRecorder(SiteHooks):
    """Forward hooks on vision sites (default: the adapter's default feature sites); after a forward
    pass `stats[site]` holds (mean [B, D], var [B, D]) over each image's tokens, in fp32, still
    attached to the graph."""

    def __init__(self, adapter: VLMAdapter, batch_size: int, sites: dict | None = None):
        super().__init__(adapter.feature_sites() if sites is None else sites)
        self.adapter, self.batch_size = adapter, batch_size
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_output(self, site, output):
        tokens = self.adapter.site_tokens(site, output, self.batch_size).float()
        self.stats[site] = (tokens.mean(1), tokens.var(1, unbiased=False))


@dataclass
class FeatureStats:
    """Target mean and variance per site, with the metadata that says what they belong to."""

    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    meta: dict[str, str]
    path: Path | None = None  # the file it was read from

    def record(self) -> dict:
        """What a run's manifest says of its statistics: the file and a hash of its bytes."""
        if self.path is None:
            return {"path": None, "sha256": None, "meta": self.meta}
        return {"path": str(self.path.resolve()), "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
                "meta": self.meta}

    @property
    def sites(self) -> list[str]:
        return list(self.mean)

    def targets(self, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {s: (self.mean[s].to(device, torch.float32), self.var[s].to(device, torch.float32))
                for s in self.mean}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write under a name derived from the content; an existing file is never edited."""
        from safetensors.torch import save

        tensors = {}
        for site in self.mean:
            tensors[f"{site}/mean"] = self.mean[site].contiguous()
            tensors[f"{site}/var"] = self.var[site].contiguous()
        blob = save(tensors, metadata=self.meta)
        digest = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
        for key in sorted(tensors):  # the header's byte order is not canonical; the content is
            digest.update(key.encode() + tensors[key].numpy().tobytes())
        digest = digest.hexdigest()[:16]
        name = self.meta["model"].replace("/", "_")
        if "class_index" in self.meta:
            name += f"-c{self.meta['class_index']}"
        path = Path(folder) / f"{name}-{self.meta['resolution']}px-{self.meta['image_count']}img-{digest}.safetensors"
        if not path.exists():
            write_file(path, blob)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """The file's metadata and tensors, checked once here: the rest of the toolkit relies on them."""
        tensors, meta = read_safetensors(path, "feature-statistics file", format=FORMAT)
        where = f"'{path}'"
        for key in ("model", "sites", "resolution"):
            if key not in meta:
                raise UserError(f"{where} misses its '{key}' metadata")
        try:
            sites = json.loads(meta["sites"])
        except json.JSONDecodeError:
            sites = None
        if not isinstance(sites, list) or not sites or not all(isinstance(s, str) for s in sites):
            raise UserError(f"{where}: its 'sites' metadata must be a JSON list of site names, not {meta['sites']!r}")
        if not meta["resolution"].isdigit() or int(meta["resolution"]) < 1:
            raise UserError(f"{where}: its 'resolution' metadata must be a positive integer, not {meta['resolution']!r}")
        for site in sites:
            for part in ("mean", "var"):
                tensor = tensors.get(f"{site}/{part}")
                if tensor is None:
                    raise UserError(f"{where} misses the tensor '{site}/{part}'")
                if tensor.ndim != 1 or tensor.shape != tensors[f"{site}/mean"].shape:  # finite: read_safetensors
                    raise UserError(f"{where}: '{site}/{part}' must hold one number per channel "
                                    f"(is {tuple(tensor.shape)})")
        return cls({s: tensors[f"{s}/mean"] for s in sites}, {s: tensors[f"{s}/var"] for s in sites}, meta,
                   Path(path))

    @classmethod
    def find(cls, source: str | os.PathLike, model_id: str, class_index: int) -> "FeatureStats":
        """`source` is a statistics file, or a folder of them: then the one made for this model
        and concept (`mimic stats --class-index N`) is used."""
        folder = Path(source)
        if not folder.is_dir():
            return cls.load(folder)
        matches = []
        for path in sorted(folder.glob("*.safetensors")):
            # only the header: the tensors are not needed to choose
            _, meta = read_safetensors(path, "feature-statistics file", tensors=False)
            if meta.get("model") == model_id and meta.get("class_index") == str(class_index):
                matches.append(path)
        if len(matches) > 1:
            raise UserError(f"statistics folder '{source}' has {len(matches)} files for class index {class_index} "
                            f"({matches[0].name}, {matches[1].name}, ...): pass one with --stats FILE")
        if matches:
            return cls.load(matches[0])
        raise UserError(f"statistics folder '{source}' has no file for model '{model_id}' and "
                        f"class index {class_index} (make one with `mimic stats --class-index {class_index}`)")

    def check_matches(self, adapter: VLMAdapter, model_id: str, resolution: int, source: str = "",
                      sites: dict | None = None) -> None:
        """Refuse statistics of another model, without the run's `sites` (default: the adapter's
        default feature sites) or of another resolution, naming the field. A file may hold more
        sites than the run matches: statistics of every layer serve any selection of them."""
        where = f"statistics file {source}" if source else "the statistics"
        if self.meta["model"] != model_id:
            raise UserError(f"{where} were computed for model '{self.meta['model']}', not '{model_id}'")
        sites = adapter.feature_sites() if sites is None else sites
        missing = [s for s in sites if s not in self.mean]
        if missing:
            made_with = self.meta.get("feature_sites") or ", ".join(self.sites[:3]) + ", ..."
            raise UserError(f"{where} lack {len(missing)} of the run's feature sites ({', '.join(missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''}); they were made with sites '{made_with}' "
                            "(make statistics with the same --feature-sites)")
        if int(self.meta["resolution"]) != resolution:
            raise UserError(f"{where} were computed at resolution {self.meta['resolution']}, this run uses {resolution}")
        revision = adapter_revision(adapter)
        if self.meta.get("revision") and revision and self.meta["revision"] != revision:
            raise UserError(f"{where} were computed on model revision {self.meta['revision']}, this checkpoint is {revision}")
        with torch.no_grad(), FeatureRecorder(adapter, 1, sites) as recorder:
            # a dim grey: exactly 0 after normalisation would read as padding to some models
            grey = torch.full((1, 3, resolution, resolution), 0.25, device=adapter.device)
            adapter.vision_forward(adapter.normalise(grey))
        for site, (mean, _) in recorder.stats.items():
            if mean.shape[-1] != self.mean[site].shape[-1]:
                raise UserError(f"{where}: site {site} has {self.mean[site].shape[-1]} channels, "
                                f"the model has {mean.shape[-1]} (another checkpoint size?)")


def adapter_revision(adapter: VLMAdapter) -> str:
    """The checkpoint revision if it came from the hub with one ("" for local folders)."""
    return getattr(adapter.model.config, "_commit_hash", None) or ""


def find_images(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"image folder '{folder}' does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"image folder '{folder}' has no images (.jpg, .jpeg, .png, .webp)")
    return files


def open_rgb(path: Path) -> Image.Image:
    """The image at `path` in RGB; an unreadable one is a UserError naming it. A decompression bomb
    (more pixels than PIL's limit, even at the level PIL only warns) is unreadable too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UserError(f"unreadable image '{shown(path)}': {type(exc).__name__}") from exc


def compute_stats(adapter: VLMAdapter, model_id: str, folder: str | os.PathLike, *,
                  resolution: int | None = None, batch_size: int = 32, class_index: int | None = None,
                  feature_sites: str | None = None, on_skip=print) -> FeatureStats:
    """Targets from real images at the sites `feature_sites` selects (`--feature-sites`; through
    the `mimic_vision_sites` hook): only the vision tower runs; per-image token statistics are
    averaged over images (accumulated in fp64). Unreadable images are skipped and reported."""
    from .engine import vision_sites
    from .sites import DEFAULT_FEATURE_SITES

    sites = vision_sites(adapter, feature_sites)
    files = find_images(folder)
    side = resolution or adapter.resolution
    sums: dict[str, list[torch.Tensor]] = {}
    used = 0
    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start:start + batch_size]:
            try:
                images.append(open_rgb(path))
            except UserError as exc:
                on_skip(f"skipped {exc}")
        if not images:
            continue
        with torch.no_grad(), FeatureRecorder(adapter, len(images), sites) as recorder:
            adapter.vision_forward(adapter.preprocess(images, side))
        for site, (mean, var) in recorder.stats.items():
            acc = sums.setdefault(site, [0, 0])
            acc[0] = acc[0] + mean.double().sum(0).cpu()
            acc[1] = acc[1] + var.double().sum(0).cpu()
        used += len(images)
    if not used:
        raise UserError(f"no readable images in '{folder}'")
    listing = b"\n".join(os.fsencode(p.relative_to(folder)) for p in files)
    meta = {"format": FORMAT, "model": model_id, "revision": adapter_revision(adapter),
            "sites": json.dumps(list(sums)), "feature_sites": feature_sites or DEFAULT_FEATURE_SITES,
            "resolution": str(side), "image_count": str(used),
            "files_sha256": hashlib.sha256(listing).hexdigest()}
    if class_index is not None:
        meta["class_index"] = str(class_index)
    return FeatureStats({s: (m / used).float() for s, (m, _) in sums.items()},
                        {s: (v / used).float() for s, (_, v) in sums.items()}, meta)
