"""What users watch while an inversion runs: step, speed, ETA, every loss term and P(target) per
target token with the model's current top guess; a live panel on a terminal, plain lines elsewhere
(a Slurm log, `tee`, a notebook), where a redrawn panel would show nothing until the end."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table


def progress_display(quiet: bool = False, stream=None):
    """The display for this output (standard error): None when quiet, the panel on a terminal,
    else plain lines."""
    stream = stream or sys.stderr
    if quiet:
        return None
    return LivePanel() if stream.isatty() else PlainProgress(stream)


class PlainProgress:
    """One line per logged step, at most every `every_s` seconds (the first and last always)."""

    def __init__(self, stream, every_s: float = 10.0):
        self.stream, self.every_s, self.last = stream, every_s, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, event: dict) -> None:
        now = time.monotonic()
        final = event["step"] == event["iterations"]
        if self.last is not None and now - self.last < self.every_s and not final:
            return
        self.last = now
        print(line(event), file=self.stream, flush=True)


def line(event: dict) -> str:
    rate, eta = _speed(event)
    p_target = " ".join(f"P({token})={p:.3f}" for token, p in zip(event["target_tokens"], event["p_target"]))
    return (f"step {event['step']}/{event['iterations']}  {rate:.2f} it/s  ETA {_duration(eta)}  "
            f"loss {event['loss']:.4g}  {p_target}  P(answer)={event['p_answer']:.4f}")


class LivePanel:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, auto_refresh=False, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        self.live.__exit__(*exc)

    def update(self, event: dict) -> None:
        self.live.update(render(event), refresh=True)


def render(event: dict) -> Table:
    rate, eta = _speed(event)
    title = f"mimic invert  step {event['step']}/{event['iterations']}  {rate:.2f} it/s  ETA {_duration(eta)}"
    # as wide as its title, so the title never wraps (it is under 80 columns)
    table = Table(title=title, show_header=True, expand=False, min_width=len(title) + 4)
    table.add_column("term")
    table.add_column("value", justify="right")
    for name, value in event["terms"].items():
        table.add_row(name, f"{value:.4g}")
    table.add_row("[b]loss (scaled sum)", f"[b]{event['loss']:.4g}")
    table.add_row("lr / grad norm", f"{event['lr']:.3g} / {event['grad_norm']:.3g}")
    for token, p, top in zip(event["target_tokens"], event["p_target"], event["top5"]):
        guess, guess_p = top[0]
        table.add_row(f"P({token})", f"{p:.3f}  [dim](top: {guess} {guess_p:.2f})")
    table.add_row("[b]P(answer)", f"[b]{event['p_answer']:.4f}")
    return table


def _speed(event: dict) -> tuple[float, float]:
    """(steps per second in this process, seconds left)."""
    done = event["step"] - event["first_step"]
    rate = done / event["elapsed_s"] if event["elapsed_s"] > 0 else 0.0
    return rate, (event["iterations"] - event["step"]) / rate if rate else 0.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
