"""Files that hold quantized weights: GGUF (read and written with the `gguf` package) and our safetensors.

- GGUF: the FLUX.2 transformer files ComfyUI-GGUF and stable-diffusion.cpp users share (general.architecture
  "flux", BFL tensor names, optionally under `model.diffusion_model.`); every type in `quantize.FORMATS`.
  Read memory-mapped: quantized tensors stay packed (`quantize.QuantLinear`), and so do F16 linear weights
  (converted per layer: a bf16 model would otherwise copy them all at load); BF16/F32 ones are plain tensors.
- safetensors from `flux2 convert --quantize int8|int4`: each quantized weight's packed rows under its usual
  key, and the header's metadata `flux2studio.quantized` mapping module names to formats.
- bitsandbytes 4-bit (NF4 / FP4) as diffusers and transformers save it (`BitsAndBytesConfig(load_in_4bit=True)`,
  e.g. diffusers/FLUX.2-dev-bnb-4bit): each weight's bytes stay as they are in the file, its blocks' absmax
  (double-quantized or not) become the layer's fp32 `scales` (`unpack_bnb`).
- ComfyUI's packed layers (nvfp4, mxfp8, int8; its per-layer `comfy_quant` markers, as BFL's nvfp4 files and
  Comfy-Org's text encoders hold them): each weight's bytes stay as they are in the file, its scales become the
  layer's `scales` (`unpack_comfy`).

Formats are returned keyed by module name ("double_blocks.0.img_attn.qkv"), the keys of `quantize.swap_in`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor

from .checkpoints import (
    COMFY_QUANT,
    atomic_path,
    bfl_prefix,
    check_path,
    comfy_formats,
    component_files,
    json_tensor,
    read_marked,
    strip_prefix,
    unreadable,
    write_safetensors,
)
from .device_streaming import module_bytes
from .lazy_tensors import Lazy, materialize, pending, stored
from .model.transformer import Flux2Transformer
from .quantize import (
    BNB_BLOCK,
    BNB_CODES,
    BNB_FORMATS,
    COMFY_BLOCKS,
    COMFY_INT8,
    GGUF_BLOCKS,
    MODE_FORMAT,
    PLAIN_DTYPES,
    bnb_scales_bytes,
    check_format,
    dequantize_bnb_flat,
    quantize_weight,
    row_bytes,
    row_inputs,
)
from .residency import drop_file_pages
from .variants import TransformerConfig

META_KEY = "flux2studio.quantized"
GGUF_ARCHES = ("flux", "flux2")  # what ComfyUI-GGUF's converter writes for FLUX.2 (it has no own name yet)
GGUF_MAGIC = b"GGUF"
# text encoders as llama.cpp writes them: GGUF architecture -> the text encoder's kind. Mistral-Small (dev's) is
# "llama" (llama.cpp's converter until late 2025, and what `flux2 convert` writes) or "mistral3", its query and key
# rows permuted either way (`llama_rope_rows`); the `gguf` package's name table of each architecture names the tensors
GGUF_TEXT_ARCHES = {"qwen3": "qwen3", "llama": "mistral3", "mistral3": "mistral3"}
GGUF_WRITTEN_ARCH = {"qwen3": "qwen3", "mistral3": "llama"}  # each kind's architecture in the GGUFs we write

# Linear layers quantized by `--quantize` and by convert: the blocks and the shared modulation layers. The
# input and output projections and the timestep MLP stay as they are (small and sensitive; as ComfyUI-GGUF)
TRANSFORMER_KEEP = ("img_in", "txt_in", "time_in.", "guidance_in.", "final_layer.")


def transformer_quantizable(name: str) -> bool:
    return not name.startswith(TRANSFORMER_KEEP)


def text_encoder_quantizable(name: str) -> bool:
    """A module of a text encoder's decoder stack (names without the stack's prefix) that is packed."""
    return name.startswith("layers.")


# where a text encoder's decoder stack sits in its files (Mistral3: the current and the older transformers names)
# (and "model." alone: a Mistral saved as one file, text only, as ComfyUI shares it)
STACK_PREFIXES = {"qwen3": ("model.",), "mistral3": ("model.language_model.", "language_model.model.", "model.")}
STACK_PARTS = ("embed_tokens.", "layers.", "norm.")  # what a decoder stack holds


def stack_name(key: str, kind: str) -> str | None:
    """A text encoder file's key as the decoder stack names it, or None outside the stack (LM head, vision)."""
    prefix = next((p for p in STACK_PREFIXES[kind] if key.startswith(p)), None)
    name = None if prefix is None else key.removeprefix(prefix)
    return name if name is not None and name.startswith(STACK_PARTS) else None


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, {module name: format}) of a GGUF or safetensors file; packed tensors stay packed."""
    return _read_files([check_path(path)], str(path))


def read_component_weights(folder: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`read_weights` over a component folder's files (`checkpoints.component_files`): plain or packed shards
    (a bitsandbytes or ComfyUI weight's parts may sit in two shards)."""
    return _read_files(component_files(folder), str(folder))


def _read_files(paths: list[Path], where: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The files' tensors and formats together, then bitsandbytes' and ComfyUI's parts made our packed layers."""
    sd: dict[str, Tensor] = {}
    formats: dict[str, str] = {}
    comfy: dict[str, str] = {}
    for path in paths:
        part, fmts, marked = _read_one(check_path(path))
        sd.update(part)
        formats.update(fmts)
        comfy.update(marked)
    sd, packed = unpack_comfy(sd, comfy, where)
    sd, bnb = unpack_bnb(sd, where)
    return sd, {**formats, **packed, **bnb}


def _read_one(path: Path) -> tuple[dict[str, Tensor], dict[str, str], dict[str, str]]:
    """One GGUF or safetensors file's tensors, formats and ComfyUI-marked layers, their parts as stored."""
    if is_gguf(path):
        return *_read_gguf(path), {}
    sd, comfy = read_marked(path)
    return sd, _safetensors_formats(path, sd), comfy


# ----------------------------------------------------------------------------- ComfyUI's packed layers

# the dtypes of an nvfp4 / mxfp8 layer's weight and block scales (or uint8 scales: older files)
COMFY_PARTS = {"nvfp4": (torch.uint8, torch.float8_e4m3fn), "mxfp8": (torch.float8_e4m3fn, torch.float8_e8m0fnu)}
COMFY_DROPPED = (".input_scale",)  # the activations' scale, for Blackwell's fp4 x fp4 product: not used here


def unpack_comfy(sd: dict[str, Tensor], comfy: dict[str, str], where: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """ComfyUI's packed layers ({layer: our format}, `checkpoints.read_marked`) as our packed layers:
    `<layer>.weight` the file's bytes (a view), `<layer>.scales` per row its scales (`quantize.scale_bytes`): int8's
    as they are (one for the tensor: on every row); nvfp4's and mxfp8's taken out of the tiled layout cuBLAS reads
    them in, which comfy-kitchen writes (`unblocked`), their pages then handed back. Returns (tensors, formats)."""
    unmarked = [k for k in sd if k.endswith(".weight_scale_2") and k.removesuffix(".weight_scale_2") not in comfy]
    unmarked += [k for k, v in sd.items() if v.dtype == torch.int8 and k.removesuffix(".weight") not in comfy]
    if unmarked:  # (NVIDIA ModelOpt's exports lay fp4 scales out plainly: nothing in the file tells which)
        raise ValueError(f"{where}: {unmarked[0]} holds fp4 or int8 weights but its layer has no ComfyUI format "
                         "marker (comfy_quant): how to read them is unknown")  # fmt: skip
    if not comfy:
        return sd, {}
    sd, read = dict(sd), []
    for layer, fmt in comfy.items():
        weight, scale = sd.get(f"{layer}.weight"), sd.pop(f"{layer}.weight_scale", None)
        tensor = sd.pop(f"{layer}.weight_scale_2", None) if fmt == "nvfp4" else torch.ones(())
        for suffix in COMFY_DROPPED:
            sd.pop(layer + suffix, None)
        if weight is None or scale is None or tensor is None or tensor.numel() != 1 or weight.ndim != 2:
            raise ValueError(f"{where}: {fmt} layer {layer} lacks its 2-d weight, weight_scale or weight_scale_2")
        if f"{layer}.pre_quant_scale" in sd:
            raise ValueError(f"{where}: {fmt} layer {layer} scales its input (pre_quant_scale, AWQ): not supported")
        if fmt in COMFY_INT8:
            sd[f"{layer}.weight"], sd[f"{layer}.scales"] = _int8_parts(weight, scale, f"{where}: {fmt} layer {layer}")
        else:
            read.append(scale)
            rows, scales = _block_scaled(weight, scale, tensor, fmt, f"{where}: {layer}")
            sd[f"{layer}.weight"], sd[f"{layer}.scales"] = rows, scales
    drop_file_pages(read)  # the tiled scales, read once
    return sd, dict(comfy)


def _int8_parts(q: Tensor, scale: Tensor, where: str) -> tuple[Tensor, Tensor]:
    """ComfyUI's int8 weight and its scale (one, or one a row) -> (its bytes, fp32 scales a row as bytes)."""
    if q.dtype != torch.int8 or scale.numel() not in (1, q.shape[0]):
        raise ValueError(f"{where}: weight {q.dtype} {tuple(q.shape)} with {scale.numel()} scales; comfy-kitchen "
                         "writes int8 weights and one scale, or one a row")  # fmt: skip
    scales = scale.float().reshape(-1, 1).expand(q.shape[0], 1).contiguous()
    return q.view(torch.uint8), scales.view(torch.uint8)


def _block_scaled(weight: Tensor, block: Tensor, tensor: Tensor, fmt: str, where: str) -> tuple[Tensor, Tensor]:
    """An nvfp4 / mxfp8 layer's rows (the file's bytes) and scales a row (`quantize.scale_bytes`)."""
    per = COMFY_BLOCKS[fmt][0]
    out, inputs = weight.shape[0], weight.shape[1] * (2 if fmt == "nvfp4" else 1)  # two e2m1 weights a byte
    tiled = (-(-out // 128) * 128, -(-(inputs // per) // 4) * 4)
    dtypes = COMFY_PARTS[fmt]
    if (
        weight.dtype != dtypes[0]
        or block.dtype not in (dtypes[1], torch.uint8)
        or tuple(block.shape) != tiled
        or (inputs % per)
    ):
        raise ValueError(f"{where}: {fmt} weight {weight.dtype} {tuple(weight.shape)} with scales {block.dtype} "
                         f"{tuple(block.shape)}; comfy-kitchen writes {dtypes[0]} rows and {dtypes[1]} scales "
                         f"{tiled}")  # fmt: skip
    scales = unblocked(block.view(torch.uint8), out, inputs // per)
    if fmt == "nvfp4":  # the tensor's scale on every row
        scales = torch.cat([scales, tensor.float().reshape(1, 1).expand(out, 1).contiguous().view(torch.uint8)], 1)
    return weight.view(torch.uint8), scales


def unblocked(tiled: Tensor, rows: int, cols: int) -> Tensor:
    """Block scales (rows, cols) out of cuBLAS's tiled layout for block-scaled products (its "scale factors
    layout": tiles of 128 rows x 4 columns, each stored as 32 x 16 with row r at (r % 32, r // 32)); the padding
    to whole tiles dropped."""
    tiles_r, tiles_c = tiled.shape[0] // 128, tiled.shape[1] // 4
    t = tiled.reshape(tiles_r, tiles_c, 32, 4, 4).transpose(2, 3).reshape(tiles_r, tiles_c, 128, 4)
    return t.permute(0, 2, 1, 3).reshape(tiles_r * 128, tiles_c * 4)[:rows, :cols].contiguous()


# ----------------------------------------------------------------------------- bitsandbytes 4-bit

BNB_STATE = ".weight.quant_state.bitsandbytes__"  # + nf4 / fp4: a weight's JSON quant state (shape, dtype...)
BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # its tensors, after "<module>.weight."


def unpack_bnb(sd: dict[str, Tensor], where: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """bitsandbytes 4-bit weights -> "bnb-nf4-bf16", "bnb-fp4-fp16"... layers (`quantize.BNB_FORMATS`):
    `<module>.weight` the file's bytes as rows (out, in / 2), `<module>.scales` their blocks' fp32 absmax
    (`quantize.bnb_scales_bytes`). A layer whose rows are not whole blocks of 64 (blocks then straddle rows) is
    dequantized now, in the file's dtype. Returns (tensors, {module: format}); `sd` as it is when it holds none."""
    states = [k for k in sd if BNB_STATE in k]
    if not states:
        if any(k.endswith(".SCB") for k in sd):
            raise ValueError(
                f"{where}: bitsandbytes 8-bit (LLM.int8) weights are not supported; its 4-bit ones (nf4, fp4) are, "
                "and int8 through --quantize int8 or a file from flux2 convert"
            )
        return sd, {}
    sd, formats = dict(sd), {}
    for key in states:
        module = key[: key.index(BNB_STATE)]
        state = json_tensor(sd.pop(key))
        parts = {p: sd.pop(f"{module}.weight.{p}", None) for p in BNB_PARTS}
        fmt = _check_bnb(state, parts, f"{where}: {module}")
        out, inputs = state["shape"]
        absmax = _bnb_absmax(parts, state)
        nibbles = sd[f"{module}.weight"].contiguous().view(torch.uint8).reshape(-1)
        if inputs % BNB_BLOCK == 0:
            sd[f"{module}.weight"] = nibbles.view(out, inputs // 2)
            sd[f"{module}.scales"] = bnb_scales_bytes(absmax, out)
            formats[module] = fmt
        else:
            sd[f"{module}.weight"] = dequantize_bnb_flat(nibbles, absmax, fmt, out * inputs).reshape(out, inputs)
    return sd, formats


def _check_bnb(state: dict, parts: dict[str, Tensor | None], where: str) -> str:
    code, dtype = state.get("quant_type"), str(state.get("dtype"))
    if code not in BNB_CODES:
        raise ValueError(f"{where}: bitsandbytes quant type {code!r} is not supported; nf4 and fp4 are")
    fmt = next((f for f, (c, d) in BNB_FORMATS.items() if c == code and str(d) == f"torch.{dtype}"), None)
    if fmt is None:
        raise ValueError(f"{where}: bitsandbytes weights of dtype {dtype!r}: bfloat16, float16 and float32 are read")
    if state.get("blocksize") != BNB_BLOCK:
        raise ValueError(f"{where}: bitsandbytes blocksize {state.get('blocksize')} is not supported; {BNB_BLOCK} is "
                         "(what diffusers and transformers write)")  # fmt: skip
    if parts["absmax"] is None or parts["quant_map"] is None:
        raise ValueError(f"{where}: its bitsandbytes weight has no absmax or quant_map tensor")
    if not torch.equal(parts["quant_map"].float(), torch.tensor(BNB_CODES[code], dtype=torch.float32)):
        raise ValueError(f"{where}: its quant_map is not bitsandbytes' {state['quant_type']} code")
    if (parts["nested_absmax"] is None) != ("nested_offset" not in state) or len(state.get("shape") or ()) != 2:
        raise ValueError(f"{where}: its bitsandbytes quant state is incomplete (nested parts or a 2-d shape)")
    return fmt


def _bnb_absmax(parts: dict[str, Tensor | None], state: dict) -> Tensor:
    """Each block's fp32 absmax, double-quantized ones (`bnb_4bit_use_double_quant`) dequantized as
    bitsandbytes does: nested code[q] * the nested block's absmax, plus the offset."""
    absmax = parts["absmax"]
    if parts["nested_absmax"] is None:
        return absmax.float()
    per = int(state["nested_blocksize"])
    scale = parts["nested_absmax"].float().repeat_interleave(per)[: absmax.numel()]
    offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
    return parts["nested_quant_map"].float()[absmax.long()] * scale + offset


def logical_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape as the model sees it (packed rows counted in weights), without reading data."""
    return {k: shape for k, (shape, _) in tensor_types(path).items()}


def tensor_types(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape as the model sees it, stored type: "BF16", "F8_E4M3", "Q4_0", "int8"...)} from the header."""
    path = check_path(path)
    if is_gguf(path):
        reader = _gguf_reader(path, (*GGUF_ARCHES, *GGUF_TEXT_ARCHES))
        return {t.name: (tuple(int(n) for n in reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors}
    from safetensors import SafetensorError, safe_open

    try:
        opened = safe_open(str(path), "pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, e) from None
    with opened as f:
        found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                 for k in f.keys() if not k.endswith(COMFY_QUANT)}  # noqa: SIM118  # fmt: skip
        markers = {k.removesuffix(COMFY_QUANT): f.get_tensor(k) for k in f.keys() if k.endswith(COMFY_QUANT)}  # noqa: SIM118
        metadata = f.metadata()
        for layer, fmt in comfy_formats(markers, metadata, path, found).items():  # scales counted in the weight
            for suffix in (".weight_scale", ".weight_scale_2", *COMFY_DROPPED):
                found.pop(layer + suffix, None)
            if (key := layer + ".weight") in found:  # stored as the model sees it, but fp4: two weights a byte
                (out, cols), _ = found[key]
                found[key] = ((out, cols * (2 if fmt == "nvfp4" else 1)), fmt)
        formats = _formats_of(path, metadata)
        for key in [k for k in found if BNB_STATE in k]:  # a bitsandbytes weight: its shape is in its state
            module = key[: key.index(BNB_STATE)]
            state = json_tensor(f.get_tensor(key))
            for part in (*BNB_PARTS, key.removeprefix(f"{module}.weight.")):
                found.pop(f"{module}.weight.{part}", None)
            if f"{module}.weight" in found:
                found[f"{module}.weight"] = (tuple(state.get("shape") or ()), f"bnb-{state.get('quant_type')}")
    for name, fmt in formats.items():
        key = name + ".weight"
        if key in found:
            found[key] = ((found[key][0][0], row_inputs(fmt, found[key][0][1])), fmt)
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


def _gguf_reader(path: Path, arches: tuple[str, ...] = GGUF_ARCHES):
    """A GGUF file's reader (memory-mapped), refused unless its architecture is one of `arches`."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on a bad header
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt header?): {e}") from None
    arch = gguf_architecture(reader)
    if arch not in arches:
        known = dict.fromkeys(GGUF_ARCHES, "FLUX.2 transformers") | dict.fromkeys(GGUF_TEXT_ARCHES, "text encoders")
        wanted = " or ".join(sorted({known[a] for a in arches}))
        raise ValueError(
            f"{path} is a GGUF of architecture {arch!r} ({known.get(arch, 'not a FLUX.2 component')}); {wanted} are "
            + ", ".join(repr(a) for a in arches)
        )
    return reader


def gguf_architecture(reader) -> str | None:
    field = reader.get_field("general.architecture")
    return field.contents() if field is not None else None


def gguf_component(path: Path) -> str | None:
    """ "transformer" or "text encoder" for a GGUF file of either kind we run; None for anything else."""
    if not is_gguf(path):
        return None
    arch = gguf_architecture(_gguf_reader(path, (*GGUF_ARCHES, *GGUF_TEXT_ARCHES)))
    return "transformer" if arch in GGUF_ARCHES else "text encoder"


def _read_gguf(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    return _gguf_tensors(_gguf_reader(path), path)


def _gguf_tensors(reader, path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
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


def read_text_encoder_gguf(path: Path, keys: list[str]) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Tensor]]:
    """A text encoder GGUF as llama.cpp writes it (Qwen3: `blk.N.attn_q.weight`...), its tensors renamed to
    the decoder stack's `keys` (transformers' names, `layers.N.self_attn.q_proj.weight`...) by the `gguf`
    package's own name table; tensors the stack does not take (the LM head, later layers) are left out.
    Packed tensors stay packed, formats keyed by module name as `read_weights` gives them. Third: for a Mistral,
    the order in which each query and key projection's outputs are to be taken (llama.cpp permutes their rows:
    `llama_rope_rows`); its weights stay as stored, memory-mapped."""
    import gguf

    reader = _gguf_reader(path, tuple(GGUF_TEXT_ARCHES))
    arch = gguf_architecture(reader)
    table = gguf.get_tensor_name_map(gguf_arch(arch, path), 1 + max(_layer(k) for k in keys))
    names = {}
    for key in keys:
        module, _, suffix = key.rpartition(".")
        found = table.get_name("model." + module)
        if found is None:
            raise ValueError(f"{path}: no llama.cpp name for the text encoder's {key}")
        names[f"{found}.{suffix}"] = key
    raw, packed = _gguf_tensors(reader, path)
    sd = {names[k]: t for k, t in raw.items() if k in names}
    formats = {names[m + ".weight"].removesuffix(".weight"): f for m, f in packed.items() if m + ".weight" in names}
    orders = {}
    if GGUF_TEXT_ARCHES[arch] == "mistral3":
        heads = {f"{p}_proj": int(reader.get_field(f"{arch}.attention.{h}").contents())
                 for p, h in (("q", "head_count"), ("k", "head_count_kv"))}  # fmt: skip
        for key in sd:
            if (part := key.split(".")[-2]) in heads:
                rows = torch.arange(sd[key].shape[0])
                orders[key.removesuffix(".weight")] = llama_rope_rows(rows, heads[part], to_llama=False)
    return sd, formats, orders


def gguf_arch(arch: str, where: object):
    """The `gguf` package's id of a GGUF architecture; an older package without it gets a clear error."""
    import gguf

    found = getattr(gguf.MODEL_ARCH, arch.upper(), None)
    if found is None:
        raise ValueError(f"{where}: GGUF architecture {arch!r} is unknown to the installed gguf package "
                         f"{version('gguf')}: `pip install -U gguf`")  # fmt: skip
    return found


def llama_rope_rows(weight: Tensor, heads: int, to_llama: bool) -> Tensor:
    """A query or key projection's rows (one row an output, packed or not) in llama.cpp's order (`to_llama`: each
    head's rotary pairs side by side, as its converter permutes Llama and Mistral weights) or back in transformers'
    (each head's first halves, then its second halves)."""
    half = weight.shape[0] // heads // 2
    order = (heads, 2, half) if to_llama else (heads, half, 2)
    return weight.reshape(*order, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# transformers' config fields of a decoder stack <- llama.cpp's header keys (after "<architecture>.")
GGUF_CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "max_position_embeddings": "context_length",
}


def text_encoder_gguf_config(path: Path) -> tuple[str, dict]:
    """(kind, transformers config fields) of a text encoder GGUF, from its header alone (the head size: its key
    length, else the width over the heads as llama.cpp takes it; the rope base: the model's published one if the
    header has none)."""
    reader = _gguf_reader(path, tuple(GGUF_TEXT_ARCHES))
    arch = gguf_architecture(reader)
    kind = GGUF_TEXT_ARCHES[arch]
    header = {name: field.contents() for name, field in reader.fields.items() if name.startswith(arch + ".")}
    missing = [f"{arch}.{k}" for f, k in GGUF_CONFIG_KEYS.items() if f"{arch}.{k}" not in header and f != "head_dim"]
    if missing or "token_embd.weight" not in (shapes := {t.name: t.shape for t in reader.tensors}):
        raise ValueError(f"{path}: a {arch} GGUF without {', '.join(missing) or 'token_embd.weight'}")
    config = {k: v for k, v in FILE_CONSTANTS[kind].items() if k != "head_dim"}
    config |= {field: header[f"{arch}.{key}"] for field, key in GGUF_CONFIG_KEYS.items() if f"{arch}.{key}" in header}
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config["vocab_size"] = int(shapes["token_embd.weight"][-1])
    if (theta := header.get(f"{arch}.rope.freq_base")) is not None:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return kind, config


# the published constants of the text encoders FLUX.2 uses, which their weights do not hold (Qwen3-4B's and
# -8B's config.json; Mistral-Small-3.2's text config: it has no q_norm to tell its head size by)
FILE_CONSTANTS = {
    "qwen3": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 40960},
    "mistral3": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e9}, "rms_norm_eps": 1e-5,
                 "max_position_embeddings": 131072, "head_dim": 128, "sliding_window": None},
}  # fmt: skip


def text_encoder_file_config(path: Path) -> tuple[str, dict]:
    """(kind, transformers config fields) of a Qwen3 or Mistral text encoder saved as one safetensors file with
    transformers' names and no config (ComfyUI's `qwen_3_4b.safetensors`, `qwen_3_8b_fp8mixed.safetensors`,
    `mistral_3_small_flux2_bf16.safetensors`): sizes from its tensors' shapes, the rest the model's published
    constants (`FILE_CONSTANTS`). Other files get a clear error."""
    shapes = logical_shapes(path)
    layer = "model.layers.0."
    if "model.embed_tokens.weight" not in shapes or f"{layer}self_attn.q_proj.weight" not in shapes:
        raise ValueError(f"{path}: not a Qwen3 or Mistral text encoder with transformers' names (model.layers.N...)")
    kind = "qwen3" if f"{layer}self_attn.q_norm.weight" in shapes else "mistral3"
    config = dict(FILE_CONSTANTS[kind])
    head_dim = shapes[f"{layer}self_attn.q_norm.weight"][0] if kind == "qwen3" else config["head_dim"]
    vocab, hidden = shapes["model.embed_tokens.weight"]
    return kind, config | {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes[f"{layer}mlp.gate_proj.weight"][0],
        "num_hidden_layers": 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("model.layers.")),
        "head_dim": head_dim,
        "num_attention_heads": shapes[f"{layer}self_attn.q_proj.weight"][0] // head_dim,
        "num_key_value_heads": shapes[f"{layer}self_attn.k_proj.weight"][0] // head_dim,
        "tie_word_embeddings": "lm_head.weight" not in shapes,
    }


def single_file_text_encoder(path: Path) -> tuple[str, dict]:
    """(kind, transformers config fields) of a text encoder given as one file: a GGUF or a safetensors file."""
    return text_encoder_gguf_config(path) if is_gguf(path) else text_encoder_file_config(path)


def _layer(key: str) -> int:
    return int(key.split(".")[1]) if key.startswith("layers.") else -1


def read_transformer_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`read_weights` of a single transformer file, the `model.diffusion_model.` prefix some carry removed from
    the tensors' and the formats' names alike (chosen once, from the tensors: all of them or none)."""
    sd, formats = read_weights(path)
    prefix = bfl_prefix(sd)
    return strip_prefix(sd, prefix), strip_prefix(formats, prefix)


def quantize_state(
    sd: Mapping[str, Lazy], fmt: str, eligible: Callable[[str], bool]
) -> tuple[dict[str, Lazy], dict[str, str]]:
    """Every eligible 2-D `.weight` of a state dict (rows divisible into blocks) to be packed in `fmt` ("int8",
    "Q4_0"...) as it is written (`lazy_tensors.Pending`; `packed_rows`); returns the state dict and {module name:
    format}."""
    out, formats = {}, {}
    for key, value in sd.items():
        if packable(key, value, fmt, eligible):
            shape = (value.shape[0], row_bytes(fmt, value.shape[1]))
            out[key] = pending(packed_rows, value, fmt, shape=shape, dtype=torch.uint8)
            formats[key.removesuffix(".weight")] = fmt
        else:
            out[key] = value
    return out, formats


ROWS_AT_ONCE = 4096  # rows of a weight quantized together: bounds the fp32 temporaries (dev's largest: 55296 rows)


def packed_rows(weight: Tensor, fmt: str) -> Tensor:
    """`quantize_weight` (each row packed on its own) a few thousand rows at a time, into one tensor."""
    out = torch.empty(weight.shape[0], row_bytes(fmt, weight.shape[1]), dtype=torch.uint8)
    for i in range(0, weight.shape[0], ROWS_AT_ONCE):
        out[i : i + ROWS_AT_ONCE] = quantize_weight(weight[i : i + ROWS_AT_ONCE], fmt)
    return out


def packable(key: str, value: Lazy, fmt: str, eligible: Callable[[str], bool]) -> bool:
    """Whether `quantize_state` packs this tensor: an eligible module's 2-D weight whose rows divide into blocks."""
    per = GGUF_BLOCKS.get(fmt, (1, 0))[0]
    return key.endswith(".weight") and value.ndim == 2 and eligible(key[:-7]) and value.shape[1] % per == 0


def write_quantized(sd: Mapping[str, Lazy], formats: dict[str, str], path: Path) -> None:
    """Our quantized safetensors (atomic, a tensor at a time, the pages read handed back): packed rows under the
    usual keys, formats in the metadata."""
    write_safetensors(sd, path, metadata={META_KEY: json.dumps(formats, sort_keys=True)}, release=True)


def write_gguf(
    sd: Mapping[str, Lazy],
    path: Path,
    fmt: str,
    eligible: Callable[[str], bool],
    arch: str = "flux",
    header: Callable[[object], None] | None = None,
) -> dict[str, str]:
    """A GGUF file of architecture `arch` (default: a FLUX.2 transformer with BFL names, "flux", as ComfyUI-GGUF
    writes it) with eligible 2-D weights in `fmt` and every other tensor in F32; `header(writer)` adds the
    architecture's own keys. Written to a temporary file renamed into place, one tensor at a time (each packed
    as its turn comes, the file pages it was read from handed back after)."""
    import gguf
    import numpy as np

    packed, formats = quantize_state(sd, fmt, eligible)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch)
        try:
            if header is not None:
                header(writer)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for key, value in packed.items():
                if (name := key.removesuffix(".weight")) in formats:
                    raw = getattr(gguf.GGMLQuantizationType, formats[name])
                    writer.add_tensor_info(key, value.shape, np.dtype(np.uint8), value.nbytes, raw_dtype=raw)
                else:
                    writer.add_tensor_info(key, value.shape, np.dtype(np.float32), 4 * math.prod(value.shape))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for key, value in packed.items():
                t = materialize(value)
                plain = key.removesuffix(".weight") not in formats  # (F32)
                writer.write_tensor_data((t.float() if plain else t).contiguous().numpy())
                drop_file_pages([t, *stored(value)])
                del t  # (before the next one is made)
        finally:
            writer.close()
    return formats


def packed_bytes(module: torch.nn.Module, dtype: torch.dtype, quantize: str | None) -> int:
    """A module's weight bytes in `dtype`, its quantizable linear layers packed by `quantize`."""
    total = module_bytes(module, dtype)
    if quantize:
        fmt = MODE_FORMAT[quantize]
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Linear) and transformer_quantizable(name):
                total += row_bytes(fmt, m.in_features) * m.out_features - m.weight.numel() * dtype.itemsize
    return total


def transformer_sizes(cfg: TransformerConfig, dtype: torch.dtype, quantize: str | None,
                      files: Sequence[Path] = ()) -> tuple[int, list[int], float]:  # fmt: skip
    """A transformer of shape `cfg` before it is loaded: (bytes outside its blocks, each block's bytes, the scale
    applied), in `dtype` packed by `quantize`, scaled to its single weights file where that is stored smaller
    (`stored_scale`)."""
    with torch.device("meta"):
        skeleton = Flux2Transformer(cfg)
    whole = packed_bytes(skeleton, dtype, quantize)
    scale = stored_scale(files, whole)
    sizes = [int(packed_bytes(b, dtype, quantize) * scale) for b in [*skeleton.double_blocks, *skeleton.single_blocks]]
    return int(whole * scale) - sum(sizes), sizes, scale


def stored_scale(files: Sequence[Path], whole: int) -> float:
    """How much smaller than `whole` (a model's bytes at full width) its weights files are: a GGUF, int8 or fp8
    file's weights stay that size in memory, which a skeleton sized by dtype alone does not know (1: not smaller)."""
    size = sum(f.stat().st_size for f in files if f.is_file())
    return min(1.0, size / whole) if size and whole else 1.0
