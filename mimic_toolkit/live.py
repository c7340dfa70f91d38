"""The live panel users watch while an inversion runs: step, speed, ETA, every loss term and
P(target) per target token with the model's current top guess."""
from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.table import Table


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
    step, total = event["step"], event["iterations"]
    done = step - event["first_step"]
    rate = done / event["elapsed_s"] if event["elapsed_s"] > 0 else 0.0
    eta = (total - step) / rate if rate else 0.0
    table = Table(title=f"mimic invert  step {step}/{total}  {rate:.2f} it/s  ETA {_duration(eta)}",
                  show_header=True, expand=False)
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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
