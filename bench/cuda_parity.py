"""The default model's code on a CUDA GPU: CPU/GPU parity of both encoders (fp32) and training-step throughput.

    python3 bench/cuda_parity.py [--out DIR]      # on a machine with an NVIDIA GPU and torch; writes cuda_parity.json

Made for the GPU test machine, whose Python has torch but not our pinned environment: install the package
there without dependencies (`pip install --no-deps --no-build-isolation --ignore-requires-python --target
/tmp/site .`, then PYTHONPATH=/tmp/site). Throughput is of one synthetic InfoNCE step (compose + encode_image,
AdamW) at batch 256 on random pixels and tokens: the model's arithmetic, not the training recipe's data loading.
Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cirflow.core.config import load_config
from cirflow.models.cir_model import build_model
from cirflow.models.train_config import TrainConfig

VOCAB, LENGTH = 1000, 16


def parity(model: torch.nn.Module, size: int, batch: int = 64) -> dict[str, float]:
    """Max abs difference of the unit vectors, CPU vs CUDA, TF32 off (so both sides compute in fp32)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(0, VOCAB, (batch, LENGTH), generator=g)
    mask = torch.ones(batch, LENGTH, dtype=torch.int64)
    mask[::2, LENGTH // 2:] = 0  # padded rows too
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        model = model.eval()
        cpu = model.encode_image(pixels), model.compose(pixels, ids, mask)
        model = model.cuda()
        gpu = model.encode_image(pixels.cuda()).cpu(), model.compose(pixels.cuda(), ids.cuda(), mask.cuda()).cpu()
    return {"encode_image": float((cpu[0] - gpu[0]).abs().max()), "compose": float((cpu[1] - gpu[1]).abs().max())}


def samples_per_s(config: TrainConfig, device: str, bf16: bool, steps: int, batch: int = 256) -> float:
    torch.manual_seed(0)
    model = build_model(config.model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    size = config.model.image.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    ids = torch.randint(0, VOCAB, (batch, LENGTH), device=device)
    mask = torch.ones(batch, LENGTH, dtype=torch.int64, device=device)
    labels = torch.arange(batch, device=device)
    warmup = 3
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model.compose(pixels, ids, mask) @ model.encode_image(pixels).T * config.loss.logit_scale
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return round(steps * batch / (time.perf_counter() - started), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--steps", type=int, default=100, help="timed GPU steps (CPU: a twentieth)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to check")
        return 0
    config = load_config(TrainConfig, None, [f"model.text.vocab_size={VOCAB}"])  # the default (demo) model
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": sys.version.split()[0],
              "parity_fp32_max_abs_diff": parity(build_model(config.model), config.model.image.image_size),
              "train_step_samples_per_s": {
                  "cuda_fp32": samples_per_s(config, "cuda", False, args.steps),
                  "cuda_bf16_autocast": samples_per_s(config, "cuda", True, args.steps),
                  f"cpu_fp32_{torch.get_num_threads()}_threads": samples_per_s(config, "cpu", False,
                                                                             max(1, args.steps // 20))}}
    text = json.dumps(report, indent=1)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_parity.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
