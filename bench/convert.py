"""`flux2 convert` on a big transformer (random weights in the real shapes): time and peak memory of each conversion,
each in its own process, side by side with an earlier version of the package in one run (--before: that version's
src/ folder, e.g. from `git worktree add /tmp/before <commit>`), the machine's CPU features printed.

Sources, written once under $FLUX2_HOME/bench/convert/ (by our streaming writer, a tensor at a time): MODEL-bf16
(one BFL-named file, 18 GB for klein-9b), MODEL-fp8 (e4m3 weights with a scale each, as BFL ships klein-9b-fp8) and
MODEL-diffusers/ (the diffusers folder). Each conversion's output is removed once measured: the disk holds the
sources and one output.

Each run starts with an empty page cache when the bench runs as root (else whatever the previous run left: the
second of a pair reads faster). Peak RSS is the process's high-water mark (VmHWM: it counts the source file's
pages it has mapped, which the kernel can take back); peak anon is the largest RssAnon seen (sampled every 20 ms):
memory only the process can give back, what runs a machine out of memory. A process the kernel kills for memory
is reported as such.

    python bench/convert.py [--model klein-9b] [--before DIR] [--runs NAME,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONVERSIONS = {  # name: (source, --to, --quantize)
    "bf16 -> int8 file": ("bf16", "bfl", "int8"),
    "bf16 -> GGUF Q4_0": ("bf16", "gguf", "q4_0"),
    "fp8 -> GGUF Q4_0": ("fp8", "gguf", "q4_0"),
    "bf16 -> diffusers folder": ("bf16", "diffusers", None),
    "diffusers folder -> bf16 file": ("diffusers", "bfl", None),
}


def sources(home: Path, model: str) -> dict[str, Path]:
    return {"bf16": home / f"{model}-bf16.safetensors", "fp8": home / f"{model}-fp8.safetensors",
            "diffusers": home / f"{model}-diffusers"}  # fmt: skip


def prepare(home: Path, model: str) -> None:
    """The three sources, random weights (seeded) in `model`'s transformer shapes, written a tensor at a time."""
    import torch

    from flux2studio.checkpoints import write_safetensors
    from flux2studio.conversion import convert
    from flux2studio.lazy_tensors import pending
    from flux2studio.model.transformer import Flux2Transformer
    from flux2studio.variants import get_variant

    src = sources(home, model)
    home.mkdir(parents=True, exist_ok=True)
    if not src["bf16"].exists():
        print(f"writing {src['bf16']} (once)", flush=True)
        with torch.device("meta"):
            model_sd = Flux2Transformer(get_variant(model).transformer).state_dict()
        shapes = {k: tuple(v.shape) for k, v in model_sd.items()}

        def random(i: int, shape: tuple[int, ...], norm: bool) -> torch.Tensor:
            g = torch.Generator().manual_seed(i)
            if norm:
                return torch.ones(shape, dtype=torch.bfloat16)
            return torch.randn(shape, generator=g).mul_(0.02).bfloat16()

        sd = {k: pending(random, i, s, len(s) == 1 and "norm" in k, shape=s, dtype=torch.bfloat16)
              for i, (k, s) in enumerate(shapes.items())}  # fmt: skip
        write_safetensors(sd, src["bf16"])
    if not src["fp8"].exists():
        print(f"writing {src['fp8']} (once)", flush=True)
        from safetensors import safe_open

        with safe_open(src["bf16"], "pt") as f:
            bf16 = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118  (a file handle)
            fp8 = {}
            for key, part in bf16.items():
                if key.endswith(".weight") and len(part.get_shape()) == 2:
                    scale = torch.tensor(0.02 * 4 / 448)  # the random weights' range over e4m3's
                    fp8[key] = pending(lambda k, s: (f.get_tensor(k).float() / s).to(torch.float8_e4m3fn), key, scale,
                                       shape=tuple(part.get_shape()), dtype=torch.float8_e4m3fn)  # fmt: skip
                    fp8[key.removesuffix(".weight") + ".weight_scale"] = scale
                else:
                    fp8[key] = f.get_tensor(key)
            write_safetensors(fp8, src["fp8"])
    if not src["diffusers"].exists():
        print(f"writing {src['diffusers']} (once)", flush=True)
        convert(src["bf16"], src["diffusers"], "diffusers")


def child(name: str, home: Path, model: str, out: Path) -> None:
    """One conversion, timed, its peak memory reported (RESULT line)."""
    Path("/proc/self/oom_score_adj").write_text("1000")  # the kernel takes this process first
    peak = [0]

    def anon() -> int:
        status = Path("/proc/self/status").read_text()
        return int(status.split("RssAnon:")[1].split()[0]) * 1024

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], anon())
            time.sleep(0.02)

    import flux2studio  # (imported before the clock)
    from flux2studio.conversion import convert

    threading.Thread(target=sample, daemon=True).start()
    source, to, quantize = CONVERSIONS[name]
    t = time.perf_counter()
    convert(sources(home, model)[source], out, to, quantize)
    seconds = time.perf_counter() - t
    hwm = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
    peak[0] = max(peak[0], anon())
    print("RESULT " + json.dumps({"s": seconds, "hwm": hwm / 2**30, "anon": peak[0] / 2**30,
                                  "where": str(Path(flux2studio.__file__).parent)}))  # fmt: skip


def run(name: str, args: argparse.Namespace, src_root: Path | None) -> dict:
    out = args.home / "out" / ("out.gguf" if CONVERSIONS[name][1] == "gguf" else
                               "out" if CONVERSIONS[name][1] == "diffusers" else "out.safetensors")  # fmt: skip
    env = dict(os.environ) | ({"PYTHONPATH": str(src_root)} if src_root else {})
    cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--home", str(args.home),
           "--out", str(out)]  # fmt: skip
    cold()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(args.home / "out", ignore_errors=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode == -9:
        return {"oom": True}
    if done.returncode or not line:
        return {"failed": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(line[0][7:])


def cold() -> bool:
    """Empty the page cache (root only), so that every run reads its source from disk as the first run would."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def cell(r: dict) -> str:
    if "oom" in r or "failed" in r:
        return "killed for memory" if "oom" in r else f"failed: {r['failed'][:60]}"
    return f"{r['s']:.0f} s, {r['hwm']:.2f} / {r['anon']:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    home = Path(os.environ.get("FLUX2_HOME", Path.home() / ".cache" / "flux2studio"))
    parser.add_argument("--home", type=Path, default=home / "bench" / "convert")
    parser.add_argument("--model", default="klein-9b")
    parser.add_argument("--before", type=Path, help="src/ folder of an earlier version, run side by side")
    parser.add_argument("--runs", default=",".join(CONVERSIONS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.home, args.model, args.out)
    from flux2studio.precision import describe_cpu

    prepare(args.home, args.model)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    results = {}
    for name in names:
        results[name] = {"after": run(name, args, None)}
        if args.before:
            results[name]["before"] = run(name, args, args.before)
        print(name, json.dumps(results[name]), flush=True)
    print(
        f"\n{args.model} transformer, random weights, {'cold' if cold() else 'warm'} page cache; "
        f"{os.cpu_count()} cores, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM; CPU: {describe_cpu()}"
    )
    print("\n| conversion | before: time, peak RSS / anon | now: time, peak RSS / anon | anon now/before |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        before, after = r.get("before", {}), r["after"]
        ratio = f"{after['anon'] / before['anon']:.2f}x" if "anon" in before and "anon" in after else ""
        print(f"| {name} | {cell(before) if before else ''} | {cell(after)} | {ratio} |")


if __name__ == "__main__":
    main()
