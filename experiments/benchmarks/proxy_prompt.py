"""Proxy Prompt on CPU with cached embeddings: training steps/s and inference latency per image.

    python experiments/benchmarks/proxy_prompt.py [--steps 5] [--batch 4] [--ks 1 4] [--tiny]

Times the generator + frozen SAM mask decoder on cached-embedding-shaped inputs (``(B, 256, 64, 64)``
target and ``(B, K, 256, 64, 64)`` support embeddings, as :class:`ppd.data.segmentation.SegmentationDataModule`
serves them; the SAM image encoder never runs). Real MobileSAM decoder weights by default; ``--tiny`` uses
the random test SAM. One training step = generator forward, SAM decoder forward, Dice loss, backward,
SGD step. Inference = one image, ``torch.inference_mode``. The generator's share of the time is printed
beside the total (generator alone vs generator + decoder), so the ratio is meaningful on a busy machine.
The generator uses the config of ``configs/proxy_prompt_quickstart.yaml`` unless ``--dim/--grid`` say so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ppd.baselines.mask_losses import dice_loss
from ppd.models.proxy_prompt import ProxyPromptGenerator, generate_and_decode
from ppd.tasks.proxy_prompt import build_frozen_sam


def _median(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench(
    sam: torch.nn.Module, k: int, b: int, dim: int, grid: int, repeats: int
) -> tuple[float, float, float]:
    """Median seconds of (training step on B images, inference on 1 image, generator alone on 1 image)."""
    gen = ProxyPromptGenerator(dim=dim, grid=grid)
    opt = torch.optim.SGD(gen.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    pe = sam.prompt_encoder.get_dense_pe()
    tgt = torch.randn(b, 256, 64, 64).half()
    sup = torch.randn(b, k, 256, 64, 64).half()
    masks = torch.rand(b, k, 1, 256, 256) > 0.7
    gt = (torch.rand(b, 1, 256, 256) > 0.7).float()

    def step() -> None:
        logits, _ = generate_and_decode(gen, sam, tgt, sup, masks)
        loss = dice_loss(logits, gt)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer() -> None:
        with torch.inference_mode():
            generate_and_decode(gen, sam, tgt[:1], sup[:1], masks[:1])

    def gen_only() -> None:
        with torch.inference_mode():
            gen(tgt[:1], sup[:1], masks[:1], image_pe=pe)

    gen.train()
    t_step = _median(step, repeats)
    gen.eval()
    return t_step, _median(infer, repeats), _median(gen_only, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4], help="support sizes K")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--tiny", action="store_true", help="random tiny SAM (no weights)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    sam = build_frozen_sam("tiny", None) if a.tiny else build_frozen_sam("vit_t", "default")
    print(f"SAM {'tiny' if a.tiny else 'vit_t (MobileSAM)'}, threads {a.threads}, batch {a.batch}")
    print(
        "| K | train steps/s | s/step | images/s | infer ms/image | generator-only ms/image | generator share |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in a.ks:
        t_step, t_inf, t_gen = bench(sam, k, a.batch, a.dim, a.grid, a.steps)
        print(
            f"| {k} | {1 / t_step:.2f} | {t_step:.2f} | {a.batch / t_step:.2f} | {t_inf * 1e3:.0f} | "
            f"{t_gen * 1e3:.0f} | {t_gen / t_inf:.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
