"""Find, read and check weights: safetensors only, strict loads that name every bad key.

Modules are built on the meta device and their tensors assigned from the (memory-mapped) file, so
a model never exists twice in memory. Pickle checkpoints are refused: loading one runs code.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .lazy_tensors import Lazy, materialize, pending, stored
from .precision import fp8_dtypes, fp8_to
from .quantize import COMFY_BLOCKS, COMFY_INT8
from .residency import drop_file_pages

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
    if path.is_dir():
        raise ValueError(f"{path} is a folder: name the weights file in it")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Tensors of a .safetensors file (memory-mapped on CPU); pickle and broken files get a clear error.
    ComfyUI's per-layer quantization markers are checked and dropped; a layer in one of its packed formats
    (nvfp4, mxfp8, int8: read with their scales by `quantized_files`, for transformers and text encoders) is an
    error."""
    sd, packed = read_marked(path, device)
    if packed:
        layer, fmt = next(iter(packed.items()))
        raise ValueError(f"{path}: layer {layer} is in ComfyUI's packed {fmt!r} format, read only from a transformer "
                         "or a text encoder file to generate with (--weights, --text-encoder)")  # fmt: skip
    return sd


def unreadable(path: Path, error: Exception) -> ValueError:
    """The error for a weights file that safetensors cannot read (a .gguf comes here when it does not begin as
    a GGUF file does)."""
    if path.suffix.lower() == ".gguf":
        return ValueError(f"{path} is not a GGUF file: it does not begin with GGUF's magic bytes")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a bare pickle: renamed, still a pickle
        return ValueError(f"{path} is a pickle checkpoint (PyTorch's torch.save) under a .safetensors name; loading "
                          "it could run arbitrary code: convert it to safetensors first")  # fmt: skip
    return ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}")


def read_marked(path: str | Path, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, {layer: format}) of a .safetensors file: its layers in ComfyUI's packed formats (`COMFY_PACKED`),
    as its markers name them (`comfy_formats`); the markers themselves dropped."""
    path = check_path(path)
    try:
        with safe_open(str(path), "pt", device=device) as f:  # (what `load_file` does, the header's metadata kept)
            metadata = f.metadata()
            sd = {k: f.get_tensor(k) for k in f.offset_keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, e) from None
    markers = {k.removesuffix(COMFY_QUANT): sd.pop(k) for k in [k for k in sd if k.endswith(COMFY_QUANT)]}
    return sd, comfy_formats(markers, metadata, path, sd)


def json_tensor(t: Tensor):
    """The JSON value a uint8 tensor holds as its UTF-8 bytes (how quantizers store their per-layer settings)."""
    return json.loads(bytes(t.tolist()))


COMFY_QUANT = ".comfy_quant"  # ComfyUI's marker of a quantized layer: the JSON bytes of {"format": ..., ...}
COMFY_METADATA = "_quantization_metadata"  # its older form: the header's {"layers": {layer: {"format": ...}}}
COMFY_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")  # fp8 with a per-tensor `weight_scale`: read as any fp8 file
COMFY_INT8_NAME = "int8_tensorwise"  # int8, one scale a row or a tensor; "convrot": its weights rotated in groups
COMFY_PACKED = (*COMFY_BLOCKS, COMFY_INT8_NAME)  # kept packed (`quantized_files.unpack_comfy`)


def comfy_formats(markers: dict[str, Tensor], metadata: dict[str, str] | None, path: Path, keys) -> dict[str, str]:
    """{layer: our format} of the layers ComfyUI's markers (`<layer>.comfy_quant` tensors, or the header's
    `_quantization_metadata`, its names with or without the file's `model.diffusion_model.`: matched to `keys`) put
    in a packed format: "nvfp4", "mxfp8", "comfy-int8" or "comfy-int8-rot256" (`quantize`); fp8 layers need nothing
    more (their dtype says it); any other format (SVDQuant, AWQ...) is a clear error naming the layer."""
    layers = {layer: json_tensor(t) for layer, t in markers.items()}
    if metadata and COMFY_METADATA in metadata:
        try:
            table = json.loads(metadata[COMFY_METADATA])["layers"]
            layers |= {_layer_in(layer, keys): conf for layer, conf in table.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: its {COMFY_METADATA} header is not ComfyUI's layer table ({e})") from None
    packed = {}
    for layer, conf in layers.items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt in COMFY_PACKED:
            packed[layer] = _comfy_int8(layer, conf, path) if fmt == COMFY_INT8_NAME else fmt
        elif fmt not in COMFY_FP8_FORMATS:
            known = ", ".join(COMFY_FP8_FORMATS + COMFY_PACKED)
            raise ValueError(f"{path}: layer {layer} is in ComfyUI's {fmt!r} format; of its formats {known} are read "
                             "(or use a GGUF or bf16 file)")  # fmt: skip
    return packed


def _layer_in(layer: str, keys) -> str:
    """A layer name of ComfyUI's header table as the file's tensors name it (with or without a BFL prefix)."""
    names = [layer, *(p + layer for p in BFL_PREFIXES), *(layer.removeprefix(p) for p in BFL_PREFIXES)]
    return next((name for name in names if name + ".weight" in keys), layer)


def _comfy_int8(layer: str, conf: dict, path: Path) -> str:
    """Our format for a ComfyUI int8 layer: "comfy-int8", or "comfy-int8-rot<group>" for "convrot" ones (set in
    the marker or in its "params", as ComfyUI reads either)."""
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    if not conf.get("convrot", params.get("convrot", False)):
        return "comfy-int8"
    group = int(conf.get("convrot_groupsize", params.get("convrot_groupsize", 256)))
    if f"comfy-int8-rot{group}" not in COMFY_INT8:
        groups = ", ".join(str(g) for g in COMFY_INT8.values() if g)
        raise ValueError(f"{path}: layer {layer} is int8 rotated in groups of {group}; groups of {groups} are read")
    return f"comfy-int8-rot{group}"


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


# ----------------------------------------------------------------------------- diffusers folders


def tokenizer_folder(te_folder: Path) -> Path:
    """Where a text encoder folder's tokenizer files are: its `tokenizer/` subfolder, the folder itself (a
    Hugging Face repo), or beside it (a diffusers pipeline's `text_encoder/` and `tokenizer/`)."""
    if (te_folder / "tokenizer").is_dir():
        return te_folder / "tokenizer"
    if not (te_folder / "tokenizer_config.json").is_file() and (te_folder.parent / "tokenizer").is_dir():
        return te_folder.parent / "tokenizer"
    return te_folder


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
    sd: dict[str, Tensor] = {}
    for path in component_files(folder):
        sd.update(read_safetensors(path))
    return sd


def component_files(folder: Path) -> list[Path]:
    """The weight files of a component folder: the shards its index names, or its one .safetensors file."""
    if any(folder.glob(f"*{s}") for s in PICKLE_SUFFIXES) and not any(folder.glob("*.safetensors")):
        check_path(next(p for s in PICKLE_SUFFIXES for p in folder.glob(f"*{s}")))  # raises the refusal
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        return [folder / shard for shard in sorted(set(read_json(index[0])["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    if len(files) > 1:
        raise ValueError(f"{folder} holds {len(files)} .safetensors files but no index: {[f.name for f in files]}")
    return files


# ----------------------------------------------------------------------------- single files

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FP8_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")  # diffusers / ComfyUI spellings
FP8_DROPPED_SUFFIXES = (".input_scale", ".scale_input")  # activation hints: meaningless once dequantised
FP8_MARKERS = ("scaled_fp8",)  # ComfyUI's legacy scaled-fp8 files carry this empty tensor: a flag, not a weight


def bfl_prefix(keys) -> str:
    """The `model.diffusion_model.`-style prefix every key carries, or "" (all keys or none)."""
    keys = list(keys)
    return next((p for p in BFL_PREFIXES if keys and all(k.startswith(p) for k in keys)), "")


def strip_prefix(sd: dict[str, Tensor], prefix: str | None = None) -> dict:
    """Remove the `model.diffusion_model.` prefix some single files carry (all keys or none); `prefix` given:
    remove that one (chosen from another dict's keys)."""
    prefix = bfl_prefix(sd) if prefix is None else prefix
    return {k[len(prefix) :]: v for k, v in sd.items()} if prefix else sd


def dequantize_fp8(
    sd: dict[str, Tensor], dtype: torch.dtype, keep: Callable[[str], bool] = lambda key: False, lazy: bool = False
) -> tuple[dict[str, Lazy], dict[str, Tensor]]:
    """fp8 weights with per-tensor scales -> `dtype` weights (w.float() * scale), except those whose key `keep`s:
    they stay fp8 (memory-mapped, 1 byte a weight) and their scales are returned beside, to be set on the
    parameters (`precision.dequantized` widens them per layer at run time with the same arithmetic). `lazy`: each
    widened when written (`lazy_tensors.Pending`). Returns (tensors without scale entries, {kept key: scale})."""
    out: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.endswith(FP8_SCALE_SUFFIXES + FP8_DROPPED_SUFFIXES) or key in FP8_MARKERS:
            continue
        if value.dtype in fp8_dtypes():
            base = key[: -len(".weight")] if key.endswith(".weight") else key
            scale = next((sd[base + s] for s in FP8_SCALE_SUFFIXES if base + s in sd), None)
            if keep(key):
                scales[key] = scale if scale is not None else torch.ones(())
            elif lazy:
                value = pending(fp8_to, value, scale, dtype, shape=value.shape, dtype=dtype)
            else:
                value = fp8_to(value, scale, dtype)
        out[key] = value
    return out, scales


def is_fp8(sd: dict[str, Tensor]) -> bool:
    return any(v.dtype in fp8_dtypes() for v in sd.values())


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to, renamed into place when the block ends without an error and
    removed when it does not: an interrupted write leaves no file, under either name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


# torch dtype -> safetensors' name for it
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def write_safetensors(
    sd: Mapping[str, Lazy], path: Path, metadata: dict[str, str] | None = None, release: bool = False
) -> None:
    """A .safetensors file written atomically (`atomic_path`) one tensor at a time: the header first (every tensor's
    shape and dtype are known, Pending ones' announced), then each tensor's bytes as it is made. safetensors' own
    `save_file` copies the whole state into memory first. `release` (a conversion: tensors read from files, never
    changed): the file pages each was read from are handed back once it is written."""
    header: dict[str, dict] = {}
    offset = 0
    for key, value in sd.items():
        if value.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: {value.dtype} cannot be written to safetensors")
        header[key] = {"dtype": SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + value.nbytes]}  # fmt: skip
        offset += value.nbytes
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError(f"safetensors metadata maps strings to strings: {metadata!r}")
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for value in sd.values():
            t = materialize(value).detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            if release:  # read once (a rename: the tensor itself; else what it is made from)
                drop_file_pages([t, *stored(value)])
            del t  # (before the next one is made)


# ----------------------------------------------------------------------------- cache and hashes


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
