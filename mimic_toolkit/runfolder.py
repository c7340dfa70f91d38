"""One run = one folder. While a run is in progress it lives at `<name>.partial`; it is renamed to
`<name>` only when complete, so a finished-looking folder is never half-written."""
from __future__ import annotations

import fcntl
import json
import os
import platform
import socket
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml
from PIL import Image

from .atomic import PARTIAL, PartialFolder, atomic_file, refuse_existing, write_file, writing
from .errors import UserError
from .tensorfile import read_safetensors

CHECKPOINT_FORMAT = "mimic-checkpoint/1"


class RunBusy(UserError):
    """Another live process holds the run's lock (a requeued job while the first still runs)."""


class RunFolder(PartialFolder):
    """Stays `<name>.partial` when a run stops early, so `--resume` can continue it."""

    def __init__(self, final: Path, rank: int = 0, world_size: int = 1):
        super().__init__(final)
        self.rank, self.world_size = rank, world_size
        # per-process files carry the rank only when there is more than one process
        self.tag = f".rank{rank}" if world_size > 1 else ""
        # beside the run, not in it: it must exist before the `.partial` folder does; hidden, so a
        # sweep's index (`c*`) does not list it
        self.lock_path = self.final.with_name(f".{self.final.name}.lock")
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Hold an exclusive OS lock on this run until `unlock` (or the process's end: the OS releases
        a flock when its holder dies, so a lock file a killed process left behind locks nothing)."""
        with writing(self.path):
            if not self.final.parent.exists():  # a parent that is a file: 'Not a directory' below
                self.final.parent.mkdir(parents=True)
            while True:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"
                    os.close(fd)
                    raise RunBusy(f"'{self.final}' is being run by another process ({holder})") from None
                # the last holder may have removed the file after we opened it: locking that one is no lock
                if self.lock_path.exists() and os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            self.lock_path.unlink(missing_ok=True)  # while still held, so no one else's file is removed
            os.close(self._lock_fd)
            self._lock_fd = None

    @classmethod
    def for_resume(cls, given: str | os.PathLike, rank: int = 0, world_size: int = 1, *,
                   lock: bool = False) -> "RunFolder":
        """The run to continue, checked; `lock`: locked (see `lock`) before it is checked."""
        path = Path(given)
        final = path.with_name(path.name[: -len(PARTIAL)]) if path.name.endswith(PARTIAL) else path
        run = cls(final, rank, world_size)
        if lock:
            run.lock()
        try:
            run._check_resumable(given)
        except UserError:
            if not lock:  # a live run without a checkpoint yet is busy, not broken
                run.lock()
            run.unlock()
            raise
        return run

    def _check_resumable(self, given) -> None:
        if not self.path.is_dir():
            if self.final.is_dir():
                raise UserError(f"run '{self.final}' is already complete; nothing to resume")
            raise UserError(f"resume folder '{given}' does not exist")
        if not self.checkpoint_path.is_file():  # what `check_new` restarts
            raise UserError(f"'{self.path}' is not a resumable run: it stopped before its first "
                            f"{self.checkpoint_path.name}; rerun without --resume to start it again")
        if not (self.path / "config.yaml").is_file():
            raise UserError(f"'{self.path}' is not a resumable run (no config.yaml)")

    def check_new(self) -> None:
        """Before a new run (with its lock held): refuse a finished or resumable run of this name;
        remove one that stopped before its first checkpoint (kill -9, a full disk), saying so."""
        refuse_existing(self.final, "--outputs")
        if self.checkpoint_path.is_file():
            raise UserError(f"'{self.path}' holds an unfinished run; continue it with --resume {self.path} "
                            "or remove it")
        if self.path.exists():
            print(f"'{self.path}' stopped before its first checkpoint; starting it again", file=sys.stderr)
            with writing(self.path):
                shutil.rmtree(self.path)

    def create(self) -> None:
        self.check_new()
        with writing(self.path):
            (self.path / "images").mkdir(parents=True)
            (self.path / "grids").mkdir()

    # -- files -----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.path / f"checkpoint{self.tag}.safetensors"

    @property
    def metrics_path(self) -> Path:
        return self.path / f"metrics{self.tag}.jsonl"

    def write_config(self, config: dict) -> None:
        write_file(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        path = self.path / "config.yaml"
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UserError(f"'{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(config, dict):
            raise UserError(f"'{path}' must hold a mapping of settings")
        return config

    def write_manifest(self, manifest: dict) -> None:
        write_file(self.path / "manifest.json", json.dumps(manifest, indent=2))

    def read_manifest(self) -> dict:
        path = self.path / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def append_metrics(self, row: dict) -> None:
        with writing(self.metrics_path), self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop rows logged after the checkpoint: they will be logged again."""
        if self.metrics_path.is_file():
            rows = [line for line in self.metrics_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= after_step]
            write_file(self.metrics_path, "".join(r + "\n" for r in rows))

    def save_checkpoint(self, state: dict) -> None:
        """`Inversion.state_dict()` as safetensors (a format that cannot carry code), the step in
        its metadata; written beside the last one and renamed, so that one stays intact."""
        from safetensors.torch import save

        tensors = {key: value.contiguous() for key, value in state["tensors"].items()}
        write_file(self.checkpoint_path, save(tensors, metadata={"format": CHECKPOINT_FORMAT,
                                                                 "step": str(state["step"])}))

    def load_checkpoint(self, layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict:
        """The saved state, checked to hold exactly the tensors of `layout` (name -> shape, dtype)."""
        tensors, meta = read_safetensors(self.checkpoint_path, "checkpoint", format=CHECKPOINT_FORMAT)
        where = f"'{self.checkpoint_path}'"
        if not meta.get("step", "").isdigit() or int(meta["step"]) < 1:
            raise UserError(f"{where} has no valid step (metadata 'step' is {meta.get('step')!r})")
        for name, (shape, dtype) in layout.items():
            if name not in tensors:
                raise UserError(f"{where} misses '{name}'")
            if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
                raise UserError(f"{where}: '{name}' is {tuple(tensors[name].shape)} {tensors[name].dtype}, "
                                f"this run's settings need {shape} {dtype}")
        unknown = sorted(set(tensors) - set(layout))
        if unknown:
            raise UserError(f"{where} holds '{unknown[0]}', which this run does not have")
        return {"step": int(meta["step"]), "tensors": tensors}

    def save_images(self, images01: torch.Tensor) -> list[Path]:
        prefix = f"rank{self.rank}_" if self.world_size > 1 else ""
        paths = []
        for i, image in enumerate(images01):
            path = self.path / "images" / f"{prefix}{i:02d}.png"
            with atomic_file(path) as partial:
                to_pil(image).save(partial, format="PNG")
            paths.append(path)
        return paths

    def save_grid(self, images01: torch.Tensor, step: int) -> Path:
        path = self.path / "grids" / f"step_{step:06d}{self.tag}.png"
        with atomic_file(path) as partial:
            grid(images01).save(partial, format="PNG")
        return path


def to_pil(image01: torch.Tensor) -> Image.Image:
    data = (image01.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(data.permute(1, 2, 0).contiguous().numpy())


def grid(images01: torch.Tensor, gap: int = 2) -> Image.Image:
    """The batch side by side in one row, on white."""
    b, _, h, w = images01.shape
    canvas = Image.new("RGB", (b * w + (b - 1) * gap, h), "white")
    for i, image in enumerate(images01):
        canvas.paste(to_pil(image), (i * (w + gap), 0))
    return canvas


def manifest(config: dict, adapter, device: str, world_size: int) -> dict:
    """Provenance: versions, model, seed, device, git commit, timings (filled in as the run goes)."""
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "mimic_toolkit": version("mimic-toolkit"),
        "packages": {n: version(n) for n in ("torch", "transformers", "accelerate", "pluggy")},
        "python": platform.python_version(),
        "model": config["model"], "adapter": type(adapter).__name__,
        "plugin": adapter.spec.plugin if adapter.spec else None,
        "checkpoint": adapter.checkpoint or config["checkpoint"],  # the resolved source (the model's own too)
        "revision": getattr(adapter.model.config, "_commit_hash", None) or config.get("revision"),
        "seed": config["seed"], "world_size": world_size, "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "git_commit": _git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_commit() -> str | None:
    """The toolkit's git commit when it runs from a checkout."""
    if not shutil.which("git"):
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def summary(folder: Path) -> dict:
    """A finished run in a few numbers (`--json`): where it is, what it inverted, how it ended."""
    from .jsonfile import read_json_lines

    info = json.loads((folder / "manifest.json").read_text())
    metrics = sorted(folder.glob("metrics*.jsonl"))
    last = read_json_lines(metrics[0])[-1] if metrics else {}
    return {"run_folder": str(folder), "report": str(folder / "report.html"), "model": info["model"],
            "concept": info.get("concept"), "steps": last.get("step"), "p_answer": last.get("p_answer"),
            "p_target": dict(zip(info.get("target_tokens") or [], last.get("p_target") or [])),
            "terms": last.get("terms"), "verdicts": info.get("verdicts", {}),
            "seconds": sum(t["seconds"] for t in info.get("timings", [])),
            "images": [str(p) for p in sorted((folder / "images").glob("*.png"))]}
