"""Files that hold quantized weights: GGUF (read and written with the `gguf` package) and our safetensors.

- GGUF: the FLUX.2 transformer files ComfyUI-GGUF and stable-diffusion.cpp users share (general.architecture
  "flux", BFL tensor names, optionally under `model.diffusion_model.`); every type in `quantize.FORMATS`.
  Read memory-mapped: quantized tensors stay packed (`quantize.QuantLinear`), and so do F16 linear weights
  (converted per layer: a bf16 model would otherwise copy them all at load); BF16/F32 ones are plain tensors.
- safetensors from `flux2 convert --quantize int8|int4`: each quantized weight's packed rows under its usual
  key, and the header's metadata `flux2studio.quantized` mapping module names to formats.

Formats are returned keyed by module name ("double_blocks.0.img_attn.qkv"), the keys of `quantize.swap_in`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .checkpoints import bfl_prefix, check_path, component_files, read_safetensors, strip_prefix, write_safetensors
from .quantize import GGUF_BLOCKS, MODE_FORMAT, PLAIN_DTYPES, check_format, quantize_weight

META_KEY = "flux2studio.quantized"
GGUF_ARCHES = ("flux", "flux2")  # what ComfyUI-GGUF's converter writes for FLUX.2 (it has no own name yet)
GGUF_MAGIC = b"GGUF"

# Linear layers quantized by `--quantize` and by convert: the blocks and the shared modulation layers. The
# input and output projections and the timestep MLP stay as they are (small and sensitive; as ComfyUI-GGUF)
TRANSFORMER_KEEP = ("img_in", "txt_in", "time_in.", "guidance_in.", "final_layer.")


def transformer_quantizable(name: str) -> bool:
    return not name.startswith(TRANSFORMER_KEEP)


def text_encoder_quantizable(name: str) -> bool:
    """A module of a text encoder's decoder stack (names without the stack's prefix) that is packed."""
    return name.startswith("layers.")


# where a text encoder's decoder stack sits in its files (Mistral3: the current and the older transformers names)
STACK_PREFIXES = {"qwen3": ("model.",), "mistral3": ("model.language_model.", "language_model.model.")}


def stack_name(key: str, kind: str) -> str | None:
    """A text encoder file's key as the decoder stack names it, or None outside the stack (LM head, vision)."""
    prefix = next((p for p in STACK_PREFIXES[kind] if key.startswith(p)), None)
    return None if prefix is None else key.removeprefix(prefix)


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def in_features(fmt: str, row_bytes: int) -> int:
    if fmt == "int8":
        return row_bytes - 4
    per, size = GGUF_BLOCKS[fmt]
    return row_bytes // size * per


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, {module name: format}) of a GGUF or safetensors file; packed tensors stay packed."""
    path = check_path(path)
    if is_gguf(path):
        return _read_gguf(path)
    sd = read_safetensors(path)
    return sd, _safetensors_formats(path, sd)


def read_component_weights(folder: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`read_weights` over a component folder's files (`checkpoints.component_files`): plain or packed shards."""
    sd: dict[str, Tensor] = {}
    formats: dict[str, str] = {}
    for path in component_files(folder):
        part, fmts = read_weights(path)
        sd.update(part)
        formats.update(fmts)
    return sd, formats


def logical_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape as the model sees it (packed rows counted in weights), without reading data."""
    return {k: shape for k, (shape, _) in tensor_types(path).items()}


def tensor_types(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape as the model sees it, stored type: "BF16", "F8_E4M3", "Q4_0", "int8"...)} from the header."""
    path = check_path(path)
    if is_gguf(path):
        reader = _gguf_reader(path)
        return {t.name: (tuple(int(n) for n in reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
        formats = _formats_of(path, f.metadata())
    for name, fmt in formats.items():
        key = name + ".weight"
        if key in found:
            found[key] = ((found[key][0][0], in_features(fmt, found[key][0][1])), fmt)
    return found


def _safetensors_formats(path: Path, sd: dict[str, Tensor]) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        formats = _formats_of(path, f.metadata())
    for name, fmt in formats.items():
        if name + ".weight" not in sd:
            raise ValueError(f"{path}: its metadata names {name} as quantized ({fmt}) but it has no {name}.weight")
    return formats


def _formats_of(path: Path, metadata: dict | None) -> dict[str, str]:
    """{module: format} from a safetensors header's metadata (empty for plain files), each format checked."""
    try:
        formats = json.loads((metadata or {}).get(META_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its {META_KEY} metadata is not valid JSON ({e})") from None
    if not isinstance(formats, dict):
        raise ValueError(f"{path}: its {META_KEY} metadata is not a mapping of layer names to formats")
    for fmt in formats.values():
        check_format(str(fmt), str(path))
    return formats


def _gguf_reader(path: Path):
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on a bad header
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt header?): {e}") from None
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in GGUF_ARCHES:
        raise ValueError(
            f"{path} is a GGUF of architecture {arch!r}; FLUX.2 transformer files are {' or '.join(GGUF_ARCHES)}"
            + (" (text encoder GGUF files are not supported yet: give the text encoder's folder)" if arch else "")
        )
    return reader


def _read_gguf(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    reader = _gguf_reader(path)
    sd: dict[str, Tensor] = {}
    formats: dict[str, str] = {}
    for t in reader.tensors:
        fmt = check_format(t.tensor_type.name, f"{path} tensor {t.name}")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        with warnings.catch_warnings():  # the mapping is read-only; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(t.data)
        linear = len(shape) == 2 and t.name.endswith(".weight")
        if fmt in PLAIN_DTYPES and not (fmt == "F16" and linear):
            sd[t.name] = data.view(torch.uint8).view(PLAIN_DTYPES[fmt]).reshape(shape)
        elif not linear:
            raise ValueError(f"{path}: tensor {t.name} {shape} is {fmt}; only linear weights can be quantized")
        else:
            sd[t.name] = data.view(torch.uint8).reshape(shape[0], -1)  # (F16 arrives as float16)
            formats[t.name.removesuffix(".weight")] = fmt
    return sd, formats


def read_transformer_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`read_weights` of a single transformer file, the `model.diffusion_model.` prefix some carry removed from
    the tensors' and the formats' names alike (chosen once, from the tensors: all of them or none)."""
    sd, formats = read_weights(path)
    prefix = bfl_prefix(sd)
    return strip_prefix(sd, prefix), strip_prefix(formats, prefix)


def quantize_state(
    sd: dict[str, Tensor], mode: str, eligible: Callable[[str], bool], fmt: str | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Pack every eligible 2-D `.weight` of a state dict (rows divisible into blocks) in the format of `mode`."""
    fmt = fmt or MODE_FORMAT[mode]
    per = GGUF_BLOCKS.get(fmt, (1, 0))[0]
    out, formats = {}, {}
    for key, value in sd.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and value.ndim == 2 and eligible(name) and value.shape[1] % per == 0:
            out[key], formats[name] = quantize_weight(value, fmt), fmt
        else:
            out[key] = value
    return out, formats


def write_quantized(sd: dict[str, Tensor], formats: dict[str, str], path: Path) -> None:
    """Our quantized safetensors (atomic): packed rows under the usual keys, formats in the metadata."""
    write_safetensors(sd, path, metadata={META_KEY: json.dumps(formats, sort_keys=True)})


def write_gguf(sd: dict[str, Tensor], path: Path, fmt: str, eligible: Callable[[str], bool]) -> dict[str, str]:
    """A FLUX.2 transformer GGUF (BFL names, architecture "flux", as ComfyUI-GGUF writes it) with eligible
    linear weights in `fmt` and every other tensor in F32; written to a temporary file renamed into place."""
    import gguf

    packed, formats = quantize_state(sd, "", eligible, fmt=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch="flux")
    try:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in packed.items():
            name = key.removesuffix(".weight")
            if name in formats:
                writer.add_tensor(key, value.numpy(), raw_dtype=getattr(gguf.GGMLQuantizationType, formats[name]))
            else:
                writer.add_tensor(key, value.float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)  # nothing half-written is left, under either name
        raise
    tmp.replace(path)
    return formats
