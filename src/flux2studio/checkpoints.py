"""Find, read and check weights: safetensors only, strict loads that name every bad key.

Modules are built on the meta device and their tensors assigned from the (memory-mapped) file, so
a model never exists twice in memory. Pickle checkpoints are refused: loading one runs code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .precision import fp8_to
from .variants import AutoencoderConfig, TransformerConfig

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
EMBEDDED = Path(__file__).parent / "weights"


def check_path(path: str | Path) -> Path:
    """Refuse pickle checkpoints and missing files with messages that say what to do."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} is a pickle checkpoint ({path.suffix}); loading it could run arbitrary code. "
            "Convert it to .safetensors first (safetensors' convert tools), or download the .safetensors release."
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Tensors of a .safetensors file (memory-mapped on CPU); pickle and broken files get a clear error."""
    path = check_path(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def check_keys(module: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    """Raise one error naming every missing key, unexpected key and shape mismatch."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(s)}" for k, s in expected.items()
                   if k in sd and sd[k].shape != s)  # fmt: skip
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            shown = "; ".join(items[:12]) + (f" (+{len(items) - 12} more)" if len(items) > 12 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise ValueError(f"{what} weights do not fit the model: " + " | ".join(problems))


def build(factory: Callable[[], nn.Module], sd: dict[str, Tensor], what: str, dtype: torch.dtype | None = None):
    """Build `factory()` on the meta device and assign the tensors of `sd` (strict, cast to `dtype`)."""
    with torch.device("meta"):
        module = factory()
    check_keys(module, sd, what)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval()


def prefault(module: nn.Module) -> None:
    """Map every page of the module's memory-mapped weights now, with one strided read per tensor.

    Left to the first forward pass, the page faults land inside the matrix multiplications, one small
    range at a time: measured on klein-4b's transformer, the first step took ~3 s longer than the next,
    while this read takes ~0.4 s. Embedding tables are skipped (a prompt reads a few of their rows).
    """
    skip = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu" and t.numel() and t.is_contiguous() and id(t) not in skip:
                t.view(-1).view(torch.uint8)[::4096].sum()  # one byte a page, read as bytes (no float arithmetic)


def drop_file_pages(tensors: list[Tensor]) -> int:
    """Hand back to the OS the memory-mapped file pages of tensors that are no longer needed.

    Converting on load (q, k, v fused into qkv; fp8 dequantised; a dtype cast) reads the original
    tensors from the mapped file once; their pages would otherwise stay in the process's resident set
    for as long as any tensor of that file is alive (the whole model). Only whole pages inside such a
    tensor, inside a `.safetensors` file mapping, are dropped: they are clean, so a later read would
    simply fault them in again from the file. Linux only; returns the bytes dropped.
    """
    return _dont_need(file_pages(tensors))


def file_pages(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """The whole pages (start, end) inside each CPU tensor that lies in a `.safetensors` file mapping."""
    import sys

    if not sys.platform.startswith("linux"):
        return []
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().endswith(".safetensors"):
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                maps.append((lo, hi))
    page, ranges = 4096, []
    for t in tensors:
        if t.device.type != "cpu":
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo and any(a <= start and end <= b for a, b in maps):
            ranges.append((lo, hi))
    return ranges


def _dont_need(ranges: list[tuple[int, int]]) -> int:
    import ctypes

    if not ranges:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    dropped = 0
    for lo, hi in ranges:
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) == 0:  # MADV_DONTNEED
            dropped += hi - lo
    return dropped


def stream_weights(blocks: Iterable[nn.Module]) -> list:
    """Keep only the running block's file-backed weights in the process's memory (inference on CPU).

    Before a block runs its pages are mapped in one strided read (`prefault`); after it ran they are
    handed back (MADV_DONTNEED). They stay in the OS page cache, so the next step maps them again
    at memory speed (~0.05 s per GB here); if the machine is short of memory the OS may evict them and
    they are read from disk again instead of the process being killed. Peak memory is then about one
    block's weights, not the model's. Each block's file pages are found once, here: a LoRA fused later
    puts its weights in new tensors, and the file pages it leaves are the clean originals (kept for an
    exact unfuse, re-read from the file if needed). Returns the hook handles.
    """

    def before(block: nn.Module, _args) -> None:
        if not torch.is_grad_enabled():
            prefault(block)

    handles = []
    for block in blocks:
        pages = file_pages(list(block.parameters()))

        def after(_block: nn.Module, _args, _out, pages=pages) -> None:
            if not torch.is_grad_enabled():
                _dont_need(pages)

        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    return handles


def drop_unused_pages(source: dict[str, Tensor], module: nn.Module) -> int:
    """`drop_file_pages` for the `source` tensors that `module` does not hold (after building it)."""
    used = {t.data_ptr() for t in module.state_dict(keep_vars=True).values()}
    return drop_file_pages([t for t in source.values() if t.data_ptr() not in used])


# ----------------------------------------------------------------------------- diffusers folders


def resolve_snapshot(path: str | Path) -> Path:
    """A Hugging Face cache entry (`models--org--name`) -> its current snapshot folder; other paths as is."""
    path = Path(path).expanduser()
    if path.name.startswith("models--") and (path / "snapshots").is_dir():
        ref = path / "refs" / "main"
        snapshots = path / "snapshots"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"{path} has no snapshot: the download did not finish (run `flux2 pull`)")
        return found[-1]
    return path


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path.name} in {path.parent}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_component(folder: Path) -> dict[str, Tensor]:
    """All tensors of one diffusers/transformers component folder: a single file or an indexed shard set."""
    if any(folder.glob(f"*{s}") for s in PICKLE_SUFFIXES) and not any(folder.glob("*.safetensors")):
        check_path(next(p for s in PICKLE_SUFFIXES for p in folder.glob(f"*{s}")))  # raises the refusal
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(read_json(index[0])["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for shard in shards:
            sd.update(read_safetensors(folder / shard))
        return sd
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    if len(files) > 1:
        raise ValueError(f"{folder} holds {len(files)} .safetensors files but no index: {[f.name for f in files]}")
    return read_safetensors(files[0])


def transformer_config_from_diffusers(cfg: dict) -> TransformerConfig:
    """diffusers `Flux2Transformer2DModel` config.json -> our TransformerConfig."""
    if cfg.get("patch_size", 1) != 1:
        raise ValueError(f"transformer patch_size {cfg['patch_size']} is not supported (FLUX.2 uses 1)")
    heads, head_dim = cfg.get("num_attention_heads", 48), cfg.get("attention_head_dim", 128)
    return TransformerConfig(
        hidden_size=heads * head_dim,
        num_heads=heads,
        depth=cfg.get("num_layers", 8),
        depth_single=cfg.get("num_single_layers", 48),
        context_dim=cfg.get("joint_attention_dim", 15360),
        in_channels=cfg.get("in_channels", 128),
        mlp_ratio=cfg.get("mlp_ratio", 3.0),
        axes_dim=tuple(cfg.get("axes_dims_rope", (32, 32, 32, 32))),
        theta=cfg.get("rope_theta", 2000),
        timestep_dim=cfg.get("timestep_guidance_channels", 256),
        guidance_embed=cfg.get("guidance_embeds", True),
        eps=cfg.get("eps", 1e-6),
    )


def vae_config_from_diffusers(cfg: dict) -> AutoencoderConfig:
    """diffusers `AutoencoderKLFlux2` config.json -> our AutoencoderConfig."""
    patch = cfg.get("patch_size", (2, 2))
    if patch[0] != patch[1]:
        raise ValueError(f"VAE patch_size {patch} is not supported (square patches only)")
    dec = cfg.get("decoder_block_out_channels")
    return AutoencoderConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        channels=tuple(cfg.get("block_out_channels", (128, 256, 512, 512))),
        decoder_channels=tuple(dec) if dec else None,
        num_res_blocks=cfg.get("layers_per_block", 2),
        z_channels=cfg.get("latent_channels", 32),
        norm_groups=cfg.get("norm_num_groups", 32),
        patch=patch[0],
        bn_eps=cfg.get("batch_norm_eps", 1e-4),
    )


_DIFFUSERS_NAMES = {  # diffusers names of the tensors `transformer_config_from_keys` reads
    "x_embedder.weight": "img_in.weight",
    "context_embedder.weight": "txt_in.weight",
    "single_transformer_blocks.0.attn.to_out.weight": "single_blocks.0.linear2.weight",
    "single_transformer_blocks.0.attn.norm_q.weight": "single_blocks.0.norm.query_norm.scale",
    "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
}


def transformer_config_from_keys(sd: dict[str, Tensor] | dict[str, tuple[int, ...]]) -> TransformerConfig:
    """Infer a transformer's shape from its tensors or their shapes (official single files, either names)."""
    sd = {k: torch.Size(v.shape if isinstance(v, Tensor) else v) for k, v in sd.items()}
    if transformer_layout(sd) == "diffusers":  # only the names differ for what is read here
        sd = {_DIFFUSERS_NAMES.get(k, k): v for k, v in sd.items()}
        sd = {k.replace("single_transformer_blocks.", "single_blocks."): v for k, v in sd.items()}
        sd = {k.replace("transformer_blocks.", "double_blocks."): v for k, v in sd.items()}
    missing = [k for k in ("img_in.weight", "txt_in.weight", "single_blocks.0.linear2.weight") if k not in sd]
    if missing:
        raise ValueError(f"not a FLUX.2 transformer: missing {missing}")
    hidden, in_channels = sd["img_in.weight"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    depth_single = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})
    head_dim = sd["single_blocks.0.norm.query_norm.scale"][0]
    mlp = sd["single_blocks.0.linear2.weight"][1] - hidden  # linear2 takes [attn (D); mlp]
    return TransformerConfig(
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single=depth_single,
        context_dim=sd["txt_in.weight"][1],
        in_channels=in_channels,
        mlp_ratio=mlp / hidden,
        axes_dim=(head_dim // 4,) * 4,  # FLUX.2 splits the head dim evenly over its 4 RoPE axes
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )


# ----------------------------------------------------------------------------- single files

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FP8_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")  # diffusers / ComfyUI spellings
FP8_DROPPED_SUFFIXES = (".input_scale", ".scale_input")  # activation hints: meaningless once dequantised


def strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove the `model.diffusion_model.` prefix some single files carry (all keys or none)."""
    for prefix in BFL_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def dequantize_fp8(
    sd: dict[str, Tensor], dtype: torch.dtype, keep: Callable[[str], bool] = lambda key: False
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """fp8 weights with per-tensor scales -> `dtype` weights (w.float() * scale), except those whose key `keep`s:
    they stay fp8 (memory-mapped, 1 byte a weight) and their scales are returned beside, to be set on the
    parameters (`precision.dequantized` widens them per layer at run time with the same arithmetic).
    Returns (tensors without scale entries, {kept key: scale})."""
    out: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.endswith(FP8_SCALE_SUFFIXES + FP8_DROPPED_SUFFIXES):
            continue
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            base = key[: -len(".weight")] if key.endswith(".weight") else key
            scale = next((sd[base + s] for s in FP8_SCALE_SUFFIXES if base + s in sd), None)
            if keep(key):
                scales[key] = scale if scale is not None else torch.ones(())
            else:
                value = fp8_to(value, scale, dtype)
        out[key] = value
    return out, scales


def is_fp8(sd: dict[str, Tensor]) -> bool:
    return any(v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for v in sd.values())


def vae_config_from_keys(sd: dict[str, Tensor] | dict[str, tuple[int, ...]]) -> AutoencoderConfig:
    """Infer a BFL/LDM-layout VAE's shape from its tensors or shapes (GroupNorm groups: FLUX.2's 32)."""
    shape = {k: tuple(v.shape if isinstance(v, Tensor) else v) for k, v in sd.items()}
    levels = 1 + max(int(k.split(".")[2]) for k in shape if k.startswith("encoder.down."))
    enc = tuple(shape[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels))
    dec = tuple(shape[f"decoder.up.{i}.block.0.conv2.weight"][0] for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in shape if k.startswith("encoder.down.0.block."))
    z = shape["decoder.post_quant_conv.weight"][0]
    return AutoencoderConfig(
        channels=enc,
        decoder_channels=None if dec == enc else dec,
        num_res_blocks=blocks,
        z_channels=z,
        in_channels=shape["encoder.conv_in.weight"][1],
        out_channels=shape["decoder.conv_out.weight"][0],
    )


def transformer_layout(sd: dict[str, Tensor]) -> str:
    """'bfl' (official single files, our layout) or 'diffusers', from the key names."""
    if any(k.startswith("double_blocks.") or k.startswith("single_blocks.") for k in sd):
        return "bfl"
    if any(k.startswith("transformer_blocks.") or k.startswith("single_transformer_blocks.") for k in sd):
        return "diffusers"
    raise ValueError("not a FLUX.2 transformer: no double_blocks / transformer_blocks keys")


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a safetensors file without reading any data (for detection and `flux2 info`)."""
    from safetensors import safe_open

    path = check_path(path)
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


# ----------------------------------------------------------------------------- writing


def transformer_config_to_diffusers(cfg: TransformerConfig) -> dict:
    """Our TransformerConfig -> diffusers `Flux2Transformer2DModel` config.json."""
    return {
        "_class_name": "Flux2Transformer2DModel",
        "patch_size": 1,
        "in_channels": cfg.in_channels,
        "out_channels": None,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim,
        "timestep_guidance_channels": cfg.timestep_dim,
        "mlp_ratio": cfg.mlp_ratio,
        "axes_dims_rope": list(cfg.axes_dim),
        "rope_theta": cfg.theta,
        "eps": cfg.eps,
        "guidance_embeds": cfg.guidance_embed,
    }


def vae_config_to_diffusers(cfg: AutoencoderConfig) -> dict:
    """Our AutoencoderConfig -> diffusers `AutoencoderKLFlux2` config.json."""
    n = len(cfg.channels)
    return {
        "_class_name": "AutoencoderKLFlux2",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.channels),
        "decoder_block_out_channels": list(cfg.decoder_channels) if cfg.decoder_channels else None,
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "batch_norm_eps": cfg.bn_eps,
        "patch_size": [cfg.patch, cfg.patch],
    }


def write_safetensors(sd: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically (a temporary file renamed into place): an interrupted write leaves no broken file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


# ----------------------------------------------------------------------------- convert / inspect


def read_any(src: str | Path) -> tuple[str, str, dict[str, Tensor], TransformerConfig | AutoencoderConfig]:
    """A transformer or VAE from a single file or a diffusers component folder.

    Returns (component "transformer" | "vae", layout "bfl" | "diffusers", tensors in OUR layout, config).
    """
    from .layouts.transformer import transformer_from_diffusers
    from .layouts.vae import vae_from_diffusers

    src = resolve_snapshot(src)
    if src.is_dir():
        cfg_json = read_json(src / "config.json")
        raw = read_component(src)
        if cfg_json.get("_class_name") == "Flux2Transformer2DModel":
            cfg = transformer_config_from_diffusers(cfg_json)
            return "transformer", "diffusers", transformer_from_diffusers(raw), cfg
        if cfg_json.get("_class_name") == "AutoencoderKLFlux2":
            cfg = vae_config_from_diffusers(cfg_json)
            return "vae", "diffusers", vae_from_diffusers(raw, cfg), cfg
        raise ValueError(f"{src}: config.json names {cfg_json.get('_class_name')!r}, not a FLUX.2 transformer or VAE")
    raw = strip_prefix(read_safetensors(src))
    if any(k.startswith(("encoder.", "decoder.")) for k in raw):
        if any(k.startswith("encoder.down_blocks.") for k in raw):
            raise ValueError(f"{src}: a diffusers-named VAE file needs its config.json: give the vae/ folder")
        cfg = vae_config_from_keys(raw)
        return "vae", "bfl", raw, cfg
    layout = transformer_layout(raw)
    if is_fp8(raw):
        raw = dequantize_fp8(raw, torch.bfloat16)
    sd = transformer_from_diffusers(raw) if layout == "diffusers" else raw
    return "transformer", layout, sd, transformer_config_from_keys(sd)


def convert(src: str | Path, dst: str | Path, to: str) -> str:
    """Write the transformer or VAE at `src` in the `to` layout ("diffusers" folder or "bfl" single file)."""
    from .layouts.transformer import transformer_to_diffusers
    from .layouts.vae import vae_to_diffusers

    if to not in ("diffusers", "bfl"):
        raise ValueError(f"--to {to!r}: choose diffusers or bfl")
    kind, layout, sd, cfg = read_any(src)
    dst = Path(dst)
    if dst.exists() and (dst.is_file() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists: choose a new path (nothing is overwritten)")
    if to == "bfl":
        path = (
            dst if dst.suffix == ".safetensors" else dst / ("ae.safetensors" if kind == "vae" else "flux2.safetensors")
        )
        write_safetensors(sd, path)
    else:
        out = transformer_to_diffusers(sd) if kind == "transformer" else vae_to_diffusers(sd, cfg)
        config = transformer_config_to_diffusers(cfg) if kind == "transformer" else vae_config_to_diffusers(cfg)
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
        path = dst / "diffusion_pytorch_model.safetensors"
        write_safetensors(out, path)
    return f"{kind} ({layout} layout) -> {path} ({to} layout, {len(sd)} tensors)"


def describe(path: str | Path) -> dict:
    """What `flux2 info` prints: layout, component or variant, dtypes, parameter count, file sizes."""
    path = resolve_snapshot(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [check_path(path)]
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, int] = {}
    for f in files:
        from safetensors import safe_open

        with safe_open(str(f), "pt") as handle:
            for k in handle.keys():  # noqa: SIM118
                piece = handle.get_slice(k)
                shapes[f"{f.relative_to(path) if path.is_dir() else f.name}:{k}"] = tuple(piece.get_shape())
                dtypes[piece.get_dtype()] = dtypes.get(piece.get_dtype(), 0) + 1
    info: dict = {
        "path": str(path),
        "files": {str(f.relative_to(path) if path.is_dir() else f.name): f.stat().st_size for f in files},
        "bytes": sum(f.stat().st_size for f in files),
        "params": sum(math.prod(s) for s in shapes.values()),
        "dtypes": dtypes,
    }
    if is_diffusers_folder(path):
        info["layout"] = "diffusers folder"
        info["pipeline"] = read_json(path / "model_index.json").get("_class_name")
        info["transformer"] = dataclasses.asdict(
            transformer_config_from_diffusers(read_json(path / "transformer" / "config.json"))
        )
    elif path.is_file():
        keys = strip_prefix({k.split(":", 1)[1]: v for k, v in shapes.items()})
        if any(k.startswith(("encoder.", "decoder.")) for k in keys):
            info["layout"], info["component"] = "single file", "vae"
        else:
            info["layout"] = f"single file ({transformer_layout(keys)} names)"
            info["component"] = "transformer"
            info["transformer"] = dataclasses.asdict(transformer_config_from_keys(keys))
    else:
        info["layout"] = "folder"
    return info


def cache_dir() -> Path:
    """Where the tool keeps small state (hash cache): $FLUX2_HOME or ~/.cache/flux2studio."""
    import os

    return Path(os.environ.get("FLUX2_HOME") or Path.home() / ".cache" / "flux2studio")


def weights_hash(paths: list[Path]) -> str:
    """Short SHA-256 over the files' bytes (in order), cached by path, size and mtime: big files hash once."""
    import hashlib

    cache_file = cache_dir() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    outer = hashlib.sha256()
    for path in paths:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in cache:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            cache[key] = h.hexdigest()
        outer.update(cache[key].encode())
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache))
    except OSError:
        pass  # a read-only home only costs re-hashing next time
    return outer.hexdigest()[:12]
