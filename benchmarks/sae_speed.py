"""SAE training cost per row, measured on this machine and scaled to a GPU-sized run (README
"mimic sae", RESULTS.md "SAEs on visual tokens"). One training step is three matrix products of
[batch, d_in] x [d_in, d_sae] forwards and twice that backwards (the decoder is a dense product
here), about 12 * d_in * d_sae FLOPs per row; memory is the weights, their gradients and Adam's two
moments (4 copies of 2 * d_in * d_sae floats) plus the [batch, d_sae] activations (about 6 live).

    python benchmarks/sae_speed.py                  # CPU, one thread
    python benchmarks/sae_speed.py --device cuda    # measured instead of estimated, where there is one
"""
from __future__ import annotations

import argparse
import time

import torch

from mimic_toolkit.sae import SparseAutoencoder


def step_seconds(d_in: int, d_sae: int, k: int, batch: int, steps: int, device: str) -> float:
    sae = SparseAutoencoder(d_in, d_sae, "topk", k).to(device)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.02)
    optimiser = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d_in, device=device)
    for n in range(steps + 2):  # two warm-up steps
        if n == 2:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = (sae(x) - x).pow(2).sum(-1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rates = []
    for d_in, d_sae, batch in [(128, 512, 256), (512, 4096, 256), (1024, 8192, 256)]:
        seconds = step_seconds(d_in, d_sae, 32, batch, args.steps, args.device)
        flops = 12 * d_in * d_sae * batch
        rates.append(flops / seconds)
        print(f"d_in {d_in:>5}, d_sae {d_sae:>6}, batch {batch}: {1e3 * seconds:8.1f} ms/step, "
              f"{batch / seconds:9.0f} rows/s, {flops / seconds / 1e9:6.1f} GFLOP/s")
    d_in, d_sae, batch = 4096, 16 * 4096, 4096
    per_row = 12 * d_in * d_sae
    memory = (4 * 2 * d_in * d_sae + 6 * batch * d_sae) * 4 / 2**30
    print(f"GPU-sized run: d_in {d_in}, d_sae {d_sae} (16x), batch {batch}: {per_row / 1e9:.1f} GFLOP per row, "
          f"{memory:.1f} GiB (fp32 weights, gradients, Adam, activations)")
    print(f"  at this machine's best rate ({max(rates) / 1e9:.1f} GFLOP/s): {1e6 * per_row / max(rates) / 3600:.0f} h "
          "per million rows")
    for name, tflops in [("H100/H200 TF32 tensor cores at 40 % of 495 TFLOP/s", 0.4 * 495),
                         ("plain fp32 at 50 % of 67 TFLOP/s", 0.5 * 67)]:
        print(f"  {name}: {1e6 * per_row / (tflops * 1e12):.0f} s per million rows")


if __name__ == "__main__":
    main()
