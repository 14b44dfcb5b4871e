"""fp16 weights computing in bf16: kept fp16 and converted per layer (streamed, the CLI's default) vs cast once at load
(resident), for klein-4b's transformer. Peak anonymous memory, load and step times of one forward on 16 image
tokens (the conversion's cost is per step, whatever the image size).

The weights are a sparse file in klein-4b's real fp16 layout (zeros: no disk, no data to make), written once:

    python bench/half_storage.py [--file /tmp/klein-4b-f16.safetensors] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def write_sparse(path: Path) -> None:
    import torch

    from flux2studio.model.transformer import Flux2Transformer
    from flux2studio.variants import get_variant

    with torch.device("meta"):
        model = Flux2Transformer(get_variant("klein-4b").transformer)
    header, offset = {}, 0
    for key, t in model.state_dict().items():
        header[key] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * 2]}
        offset += t.numel() * 2
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.truncate(8 + len(text) + offset)


def child(path: Path, resident: bool, steps: int) -> dict:
    import torch

    from flux2studio.loading import load_transformer
    from flux2studio.quantized_files import read_transformer_file
    from flux2studio.sampling import image_ids, text_ids
    from flux2studio.variants import get_variant

    peak = [0]

    def poll() -> None:
        while True:
            with open("/proc/self/status") as f:
                anon = next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))
            peak[0] = max(peak[0], anon)
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    v = get_variant("klein-4b")
    raw, formats = read_transformer_file(path)
    t0 = time.perf_counter()
    model = load_transformer(raw, v, "cpu", torch.bfloat16, resident, formats)
    load_s, times = time.perf_counter() - t0, []
    img = torch.zeros(1, 16, 128, dtype=torch.bfloat16)
    txt = torch.zeros(1, 8, v.transformer.context_dim, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(steps):
            t1 = time.perf_counter()
            model(img, image_ids(4, 4), txt, text_ids(8), torch.tensor([0.5]))
            times.append(round(time.perf_counter() - t1, 2))
    time.sleep(0.1)
    stored = str(model.double_blocks[0].img_attn.qkv.weight.dtype).removeprefix("torch.")
    return {"stored": stored, "peak_anon_gib": round(peak[0] / 2**20, 2), "load_s": round(load_s, 1), "steps_s": times}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", type=Path, default=Path("/tmp/klein-4b-f16.safetensors"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", choices=["streamed", "resident"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.file, args.child == "resident", args.steps)))
        return
    from flux2studio.precision import describe_cpu

    print(describe_cpu())
    if not args.file.exists():
        write_sparse(args.file)
    for mode in ("streamed", "resident"):
        run = subprocess.run([sys.executable, __file__, "--file", str(args.file), "--steps", str(args.steps),
                              "--child", mode], capture_output=True, text=True, check=True)  # fmt: skip
        print(mode, run.stdout.strip())


if __name__ == "__main__":
    main()
