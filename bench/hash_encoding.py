"""The hash encoding's two backends side by side on a GPU (issue 28): the Triton kernels and plain PyTorch.

    python -m bench.hash_encoding                  # 2^18 points, instant-ngp's default 16 levels
    python -m bench.hash_encoding --points 22      # 2^22 points

Prints one table: forward, and forward + backward, in ms for the encoding alone, then the whole hash-grid
field (encoding, density and colour MLPs, bf16 autocast) per backend, and the largest differences
between the backends' features and table gradients (relative to the largest value). CUDA only.
"""
from __future__ import annotations

import argparse
import time

import torch

from lightning_modules.nerf.hashgrid import HashEncoding, HashGridField

BACKENDS = ("torch", "triton")


def timed_ms(step, repeats: int = 20) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / repeats


def encoding_rows(points: torch.Tensor) -> list[str]:
    encoding = HashEncoding().cuda()
    with torch.no_grad():
        for table in encoding.tables:
            table.uniform_(-1, 1)  # values of the size training reaches, so a difference shows
    grad = torch.randn(points.shape[0], encoding.out_dim, device="cuda")
    rows, outputs = [], {}

    def train_step():
        encoding.zero_grad(set_to_none=True)
        encoding(points).backward(grad)

    for backend in BACKENDS:
        encoding.backend = backend
        train_step()
        outputs[backend] = (encoding(points).detach(), [t.grad.clone() for t in encoding.tables])
        rows.append(f"| encoding | {backend} | {timed_ms(lambda: encoding(points)):.3f} | {timed_ms(train_step):.3f} |")
    (a, grads_a), (b, grads_b) = outputs["torch"], outputs["triton"]
    feature_gap = float((a - b).abs().max() / a.abs().max())
    grad_gap = max(float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)) for x, y in zip(grads_a, grads_b, strict=True))
    rows.append(f"| largest difference, features / table gradients | | {feature_gap:.1e} | {grad_gap:.1e} |")
    return rows


def field_rows(count: int) -> list[str]:
    rows = []
    points = torch.rand(count, 3, device="cuda") * 2 - 1
    dirs = torch.nn.functional.normalize(torch.randn(count, 3, device="cuda"), dim=-1)
    for backend in BACKENDS:
        field = HashGridField(backend=backend).cuda()

        def forward(field=field):
            with torch.autocast("cuda", torch.bfloat16):
                return field(points, dirs)

        def train_step(field=field):
            sigma, rgb = forward(field)
            (sigma.float().sum() + rgb.float().sum()).backward()

        rows.append(f"| field (bf16 autocast) | {backend} | {timed_ms(forward):.3f} | {timed_ms(train_step):.3f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=18, help="log2 of the number of points")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.hash_encoding needs a CUDA GPU (the Triton kernels run on CUDA points)")
    count = 2**args.points
    print(f"{torch.cuda.get_device_name()}, 2^{args.points} points, 16 levels, 2^19-row tables")
    print("| what | backend | forward ms | forward + backward ms |\n| --- | --- | ---: | ---: |")
    print("\n".join(encoding_rows(torch.rand(count, 3, device="cuda")) + field_rows(count)))


if __name__ == "__main__":
    main()
