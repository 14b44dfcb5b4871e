"""Layouts and configurations: read a model's shape from a diffusers config or from its keys, write the
diffusers configs back, convert a transformer or VAE between the BFL and diffusers layouts, describe a file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from .checkpoints import (
    check_path,
    dequantize_fp8,
    is_diffusers_folder,
    is_fp8,
    read_component,
    read_json,
    resolve_snapshot,
    strip_prefix,
    tokenizer_folder,
    write_safetensors,
)
from .lazy_tensors import Lazy, Pending, pending
from .quantize import FORMATS, MODE_FORMAT, PLAIN_DTYPES, dequantize_weight, row_inputs
from .quantized_files import (
    BNB_STATE,
    GGUF_WRITTEN_ARCH,
    STACK_PREFIXES,
    gguf_arch,
    gguf_component,
    llama_rope_rows,
    quantize_state,
    read_component_weights,
    read_transformer_file,
    stack_name,
    tensor_types,
    text_encoder_file_config,
    text_encoder_gguf_config,
    text_encoder_quantizable,
    transformer_quantizable,
    write_gguf,
    write_quantized,
)
from .variants import VARIANTS, AutoencoderConfig, TransformerConfig

CONVERT_QUANTIZE = {"bfl": ("int8", "int4", "fp8"), "gguf": ("q8_0", "q4_0", "f16", "bf16"), "diffusers": ()}


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


def transformer_config_from_keys(sd: dict[str, Lazy] | dict[str, tuple[int, ...]]) -> TransformerConfig:
    """Infer a transformer's shape from its tensors or their shapes (official single files, either names)."""
    sd = {k: torch.Size(v.shape if isinstance(v, Tensor | Pending) else v) for k, v in sd.items()}
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


def vae_config_from_keys(sd: dict[str, Tensor] | dict[str, tuple[int, ...]]) -> AutoencoderConfig:
    """Infer a BFL/LDM-layout VAE's shape from its tensors or shapes (GroupNorm groups: a registered model's VAE
    of the same shape's, else FLUX.2's 32)."""
    shape = {k: tuple(v.shape if isinstance(v, Tensor) else v) for k, v in sd.items()}
    levels = 1 + max(int(k.split(".")[2]) for k in shape if k.startswith("encoder.down."))
    enc = tuple(shape[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels))
    dec = tuple(shape[f"decoder.up.{i}.block.0.conv2.weight"][0] for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in shape if k.startswith("encoder.down.0.block."))
    z = shape["decoder.post_quant_conv.weight"][0]
    fields = dict(
        channels=enc,
        decoder_channels=None if dec == enc else dec,
        num_res_blocks=blocks,
        z_channels=z,
        in_channels=shape["encoder.conv_in.weight"][1],
        out_channels=shape["decoder.conv_out.weight"][0],
    )
    # GroupNorm's groups leave no trace in the weights: a registered model's VAE of this shape gives them (nano's 4)
    known = [v.vae for v in VARIANTS.values() if v.vae and all(getattr(v.vae, k) == f for k, f in fields.items())]
    return AutoencoderConfig(**fields, norm_groups=known[0].norm_groups if known else 32)


def vae_layout(keys) -> str:
    """'diffusers' or 'bfl' (official `ae.safetensors`, our layout), from the key names."""
    return "diffusers" if any(k.startswith("encoder.down_blocks.") for k in keys) else "bfl"


COMPONENT_MARKS = {  # a part of each kind holds a key with one of these in its name (whatever its prefix)
    "transformer": (".double_blocks.", ".single_blocks.", ".transformer_blocks.", ".single_transformer_blocks."),
    "vae": (".encoder.down", ".decoder.up"),
    "text encoder": ("embed_tokens.weight", "token_embd.weight"),
}


def file_component(keys) -> str | None:
    """ "transformer", "vae", "text encoder", or "full checkpoint" (more than one part in one file), from a file's
    tensor names; None if none of them."""
    dotted = ["." + k for k in keys]
    found = [kind for kind, marks in COMPONENT_MARKS.items() if any(m in k for k in dotted for m in marks)]
    return None if not found else found[0] if len(found) == 1 else "full checkpoint"


def transformer_layout(sd: dict[str, Tensor]) -> str:
    """'bfl' (official single files, our layout) or 'diffusers', from the key names."""
    if any(k.startswith("double_blocks.") or k.startswith("single_blocks.") for k in sd):
        return "bfl"
    if any(k.startswith("transformer_blocks.") or k.startswith("single_transformer_blocks.") for k in sd):
        return "diffusers"
    raise ValueError("not a FLUX.2 transformer: no double_blocks / transformer_blocks keys")


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


def read_any(
    src: str | Path, lazy: bool = False
) -> tuple[str, str, dict[str, Lazy], TransformerConfig | AutoencoderConfig]:
    """A transformer or VAE from a single file or a diffusers component folder.

    Returns (component "transformer" | "vae", layout "bfl" | "diffusers", tensors in OUR layout, config). `lazy`
    (to be written): tensors that are made, not renamed (fused, widened, unpacked), made as they are written.
    """
    from .layouts.transformer import transformer_from_diffusers
    from .layouts.vae import vae_from_diffusers

    src = resolve_snapshot(src)
    if src.is_dir():
        cfg_json = read_json(src / "config.json")
        raw = _unpacked(*read_component_weights(src), lazy)  # a bitsandbytes 4-bit folder: unpacked to bf16
        if cfg_json.get("_class_name") == "Flux2Transformer2DModel":
            cfg = transformer_config_from_diffusers(cfg_json)
            return "transformer", "diffusers", transformer_from_diffusers(raw, lazy=lazy), cfg
        if cfg_json.get("_class_name") == "AutoencoderKLFlux2":
            cfg = vae_config_from_diffusers(cfg_json)
            return "vae", "diffusers", vae_from_diffusers(raw, cfg), cfg
        raise ValueError(f"{src}: config.json names {cfg_json.get('_class_name')!r}, not a FLUX.2 transformer or VAE")
    raw = _unpacked(*read_transformer_file(src), lazy)
    if file_component(raw) == "vae":
        if vae_layout(raw) == "diffusers":
            raise ValueError(f"{src}: a diffusers-named VAE file needs its config.json: give the vae/ folder")
        cfg = vae_config_from_keys(raw)
        return "vae", "bfl", raw, cfg
    layout = transformer_layout(raw)
    if is_fp8(raw):
        raw, _ = dequantize_fp8(raw, torch.bfloat16, lazy=lazy)
    sd = transformer_from_diffusers(raw, lazy=lazy) if layout == "diffusers" else raw
    return "transformer", layout, sd, transformer_config_from_keys(sd)


def _plain_text_encoder(src: Path) -> dict[str, Tensor]:
    raw = read_component(src)
    if any(BNB_STATE in k for k in raw):
        raise ValueError(f"{src} holds bitsandbytes 4-bit weights: it loads as it is (--text-encoder {src}); "
                         "convert the full-precision text encoder instead")  # fmt: skip
    return raw


def _unpacked(raw: dict[str, Tensor], formats: dict[str, str], lazy: bool = False) -> dict[str, Lazy]:
    """Packed layers (GGUF, --quantize, bitsandbytes, ComfyUI's) unpacked to bf16, to be written anew (`lazy`: each
    as it is written)."""
    out: dict[str, Lazy] = dict(raw)
    for name, fmt in formats.items():
        packed = raw[name + ".weight"]
        scales = out.pop(name + ".scales", None)
        args = (packed, fmt, row_inputs(fmt, packed.shape[1]), torch.bfloat16, scales)
        if lazy:
            out[name + ".weight"] = pending(dequantize_weight, *args, shape=(packed.shape[0], args[2]), dtype=args[3])
        else:
            out[name + ".weight"] = dequantize_weight(*args)
    return out


SHARD_BYTES = 2 * 2**30  # a packed text encoder's shards: about this much each


def text_encoder_kind(src: Path) -> str | None:
    """ "qwen3" / "mistral3" for a text encoder folder (its config.json), else None."""
    if not (src.is_dir() and (src / "config.json").is_file()):
        return None
    kind = read_json(src / "config.json").get("model_type")
    return kind if kind in STACK_PREFIXES else None


def convert_text_encoder(src: Path, dst: Path, kind: str, quantize: str) -> str:
    """A Qwen3 / Mistral3 text encoder folder with its decoder layers' linear weights packed (int8 / int4): shards
    of about 2 GB, each weight packed as it is written (never the whole model in memory; 24B parameters in int8
    would not fit 24 GB), an index, and the folder's config and tokenizer files. It loads packed and memory-mapped
    (`loading.decoder_stack`)."""
    import shutil

    def eligible(module: str) -> bool:
        name = stack_name(module, kind)
        return name is not None and text_encoder_quantizable(name)

    packed, formats = quantize_state(_plain_text_encoder(src), MODE_FORMAT[quantize], eligible)  # (made as written)
    shards: list[list[str]] = [[]]
    filled = 0  # bytes in the last shard
    for key, value in packed.items():
        if shards[-1] and filled + value.nbytes > SHARD_BYTES:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += value.nbytes
    dst.mkdir(parents=True)
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard_formats = {m: f for m, f in formats.items() if m + ".weight" in keys}
        write_quantized({k: packed[k] for k in keys}, shard_formats, dst / name)  # (its read pages handed back)
        weight_map |= dict.fromkeys(keys, name)
    index = {"metadata": {"total_size": sum(v.nbytes for v in packed.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in src.iterdir():  # config, tokenizer and processor files
        if not f.name.endswith((".safetensors", ".safetensors.index.json")) and f.is_file():
            shutil.copy(f, dst / f.name)
    return f"text encoder ({kind}) -> {dst} ({len(shards)} shards, {len(formats)} linear weights {quantize})"


def convert_text_encoder_gguf(src: Path, dst: Path, kind: str, fmt: str) -> str:
    """A Qwen3 or Mistral text encoder folder as one GGUF file the way llama.cpp writes one (architecture "qwen3",
    or "llama" for Mistral with its query and key rows permuted as llama.cpp's converter does; its tensor names;
    the tokenizer and chat template in the header): what stable-diffusion.cpp (`--llm`), ComfyUI-GGUF, llama.cpp
    and `--text-encoder x.gguf` here load. Linear and embedding weights in `fmt`, norms in F32."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(src, local_files_only=True)
    config = getattr(config, "text_config", config)  # (Mistral3's is the language model's, inside)
    tok_dir = tokenizer_folder(src)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    arch = GGUF_WRITTEN_ARCH[kind]
    table = gguf.get_tensor_name_map(gguf_arch(arch, src), config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    sd = {}
    for key, tensor in _plain_text_encoder(src).items():
        if (name := stack_name(key, kind)) is not None:  # (the LM head, a vision tower: not part of the stack)
            module, _, suffix = name.rpartition(".")
            if arch == "llama" and (part := module.rpartition(".")[2]) in heads:
                tensor = pending(llama_rope_rows, tensor, heads[part], True, shape=tensor.shape, dtype=tensor.dtype)
            sd[f"{table.get_name('model.' + module)}.{suffix}"] = tensor
    formats = write_gguf(sd, dst, fmt, lambda _: True, arch=arch,
                         header=lambda w: _text_encoder_header(w, kind, config, tokenizer, tok_dir))  # fmt: skip
    return f"text encoder ({kind}) -> {dst} (GGUF {arch!r}, llama.cpp names, {len(formats)} weights {fmt})"


def _text_encoder_header(w, kind: str, config, tokenizer, tok_dir: Path) -> None:
    """A text encoder GGUF's header keys: sizes, rope base, norm epsilon, and the tokenizer (byte-level BPE) with
    its chat template, as llama.cpp's converter writes them."""
    import gguf

    rope = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    w.add_name(f"{kind} text encoder")  # ("mistral" in the name: transformers' GGUF reader then takes it as one)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(rope)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    ids = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens = [ids.get(i, f"[PAD{i}]") for i in range(max(config.vocab_size, len(ids)))]
    kinds = [
        gguf.TokenType.UNUSED if i not in ids
        else (gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED) if i in added
        else gguf.TokenType.NORMAL
        for i in range(len(tokens))
    ]  # fmt: skip
    splits = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    w.add_tokenizer_model("gpt2")  # byte-level BPE; the pre-tokenizer's name says how text is split into words
    w.add_tokenizer_pre("tekken" if kind == "mistral3" else "qwen2" if '"Split"' in json.dumps(splits) else "gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(kinds)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=len(tokens))
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(w)


def check_convert(to: str, quantize: str | None) -> None:
    if to not in CONVERT_QUANTIZE:
        raise ValueError(f"--to {to!r}: choose {', '.join(CONVERT_QUANTIZE)}")
    if quantize is not None and quantize.lower() not in CONVERT_QUANTIZE[to]:
        allowed = ", ".join(CONVERT_QUANTIZE[to]) or "none (diffusers folders are written unquantized)"
        raise ValueError(f"--quantize {quantize!r} with --to {to}: choose {allowed}")


WEIGHT_SUFFIXES = (".safetensors", ".sft", ".gguf", ".bin", ".pt", ".pth", ".ckpt")  # names of files, not folders


def convert(src: str | Path, dst: str | Path, to: str, quantize: str | None = None) -> str:
    """Write the transformer or VAE at `src` in the `to` layout ("diffusers" folder, "bfl" single file, or a
    "gguf" transformer file), the transformer's blocks and modulation layers packed as `quantize` says
    (bfl: int8 / int4; gguf: q8_0 / q4_0 / f16 / bf16, default bf16). Files are written atomically."""
    from .layouts.transformer import transformer_to_diffusers
    from .layouts.vae import vae_to_diffusers

    check_convert(to, quantize)
    quantize = quantize.lower() if quantize else None
    dst = Path(dst)
    if dst.exists() and (dst.is_file() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists: choose a new path (nothing is overwritten)")
    wanted = {"bfl": ".safetensors", "gguf": ".gguf", "diffusers": None}[to]
    if dst.suffix.lower() in WEIGHT_SUFFIXES and dst.suffix.lower() != wanted:  # (was made a folder of that name)
        writes = f"a {wanted} file (or into a folder)" if wanted else "a folder"
        raise ValueError(f"{dst}: --to {to} writes {writes}, not a {dst.suffix} file")
    folder = resolve_snapshot(src)
    if is_diffusers_folder(folder):
        raise ValueError(f"{src} is a whole diffusers pipeline: convert one part of it, e.g. {folder / 'transformer'} "
                         f"(or vae/, text_encoder/)")  # fmt: skip
    if text_kind := text_encoder_kind(folder):
        if to == "gguf":
            path = dst if dst.suffix == ".gguf" else dst / f"{text_kind}.gguf"
            return convert_text_encoder_gguf(folder, path, text_kind, (quantize or "bf16").upper())
        if to != "bfl" or quantize is None:
            raise ValueError(f"{src} is a text encoder: it is written packed, as a folder (--to bfl --quantize "
                             "int8|int4), or as one GGUF file (--to gguf [--quantize q8_0|q4_0|f16|bf16])")  # fmt: skip
        return convert_text_encoder(folder, dst, text_kind, quantize)
    kind, layout, sd, cfg = read_any(src, lazy=True)  # made a tensor at a time as written: any size fits
    if kind == "vae" and (quantize or to == "gguf"):
        raise ValueError(f"{src} is a VAE: only transformers are quantized or written as GGUF (the VAE is small)")
    if to == "gguf":
        path = dst if dst.suffix == ".gguf" else dst / "flux2.gguf"
        formats = write_gguf(sd, path, (quantize or "bf16").upper(), transformer_quantizable)
        fmt = (quantize or "bf16").upper()
        return f"{kind} ({layout} layout) -> {path} (GGUF, {len(formats)} linear weights {fmt}){requantized(src, fmt)}"
    if to == "bfl":
        path = (
            dst if dst.suffix == ".safetensors" else dst / ("ae.safetensors" if kind == "vae" else "flux2.safetensors")
        )
        if quantize:
            sd, formats = quantize_state(sd, MODE_FORMAT[quantize], transformer_quantizable)
            write_quantized(sd, formats, path)
            note = requantized(src, MODE_FORMAT[quantize])
            return f"{kind} ({layout} layout) -> {path} (bfl layout, {len(formats)} linear weights {quantize}){note}"
        write_safetensors(sd, path, release=True)
    else:
        out = transformer_to_diffusers(sd, lazy=True) if kind == "transformer" else vae_to_diffusers(sd, cfg)
        config = transformer_config_to_diffusers(cfg) if kind == "transformer" else vae_config_to_diffusers(cfg)
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
        path = dst / "diffusion_pytorch_model.safetensors"
        write_safetensors(out, path, release=True)
    return f"{kind} ({layout} layout) -> {path} ({to} layout, {len(sd)} tensors)"


def requantized(src: str | Path, fmt: str) -> str:
    """A note where a file already stored in another lossy format is quantized as `fmt`: its unpacked weights are
    rounded again, the two errors added (the original's bf16 weights give the closer file); else ""."""
    src = Path(src)
    if src.is_dir() or fmt in PLAIN_DTYPES:
        return ""
    lossy = sorted(
        {t for _, t in tensor_types(src).values() if t.startswith("F8_") or t in FORMATS} - {fmt, *PLAIN_DTYPES}
    )
    if not lossy:
        return ""
    return (f"\nnote: {src.name} was stored as {', '.join(lossy)}: its weights, unpacked, were rounded again to {fmt} "
            "(both errors add up); quantizing the bf16 original gives a closer file")  # fmt: skip


def shaped_like(cfg: TransformerConfig) -> list[str]:
    """The registered models whose transformer has this shape (what `--model` may say of the file)."""
    return [v.id for v in VARIANTS.values() if v.transformer == cfg and not v.hosted]


SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")  # model-00001-of-00003.safetensors


def describe(path: str | Path) -> dict:
    """What `flux2 info` prints: layout, component or variant, dtypes, parameter count, file sizes."""
    path = resolve_snapshot(path)
    if path.is_dir() and not is_diffusers_folder(path) and not (path / "config.json").is_file():
        models = sorted([*path.rglob("*.safetensors"), *path.rglob("*.gguf")])
        if len(models) == 1:  # a folder of one file (a ComfyUI download's): that file
            return describe(models[0])
        shards = all(SHARD_NAME.search(f.name) for f in models)  # one model in parts: added up below
        if models and not shards:  # (their sizes and parameters were added up as if one model's)
            names = ", ".join(str(f.relative_to(path)) for f in models[:8]) + (", ..." if len(models) > 8 else "")
            raise ValueError(f"{path} holds {len(models)} model files, not one model (no model_index.json or "
                             f"config.json): give one of them: {names}")  # fmt: skip
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [check_path(path)]
    if not files:
        raise ValueError(f"{path} holds no .safetensors file: not a model folder")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, int] = {}
    for f in files:
        for k, (shape, kind) in tensor_types(f).items():
            shapes[f"{f.relative_to(path) if path.is_dir() else f.name}:{k}"] = shape
            dtypes[kind] = dtypes.get(kind, 0) + 1
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
        t_cfg = transformer_config_from_diffusers(read_json(path / "transformer" / "config.json"))
        info["transformer"], info["models"] = dataclasses.asdict(t_cfg), shaped_like(t_cfg)
    elif gguf_component(path) == "text encoder":
        info["layout"], info["component"] = "single file (GGUF, llama.cpp names)", "text encoder"
        info["text_encoder"] = dict(zip(("kind", "config"), text_encoder_gguf_config(path), strict=True))
    elif path.is_file() and any(k.endswith(":model.embed_tokens.weight") for k in shapes):
        info["layout"], info["component"] = "single file (transformers names, no config)", "text encoder"
        info["text_encoder"] = dict(zip(("kind", "config"), text_encoder_file_config(path), strict=True))
    elif path.is_file():
        keys = strip_prefix({k.split(":", 1)[1]: v for k, v in shapes.items()})
        if file_component(keys) == "vae":
            info["layout"], info["component"] = "single file", "vae"
        else:
            info["layout"] = f"single file ({transformer_layout(keys)} names)"
            info["component"] = "transformer"
            t_cfg = transformer_config_from_keys(keys)
            info["transformer"], info["models"] = dataclasses.asdict(t_cfg), shaped_like(t_cfg)
    else:  # a diffusers pipeline's component folder (transformer/, vae/, text_encoder/), or none
        config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        info["layout"] = "diffusers component folder" if config.get("_class_name") else "folder"
        if config.get("_class_name"):
            info["component"] = config["_class_name"]
        if config.get("_class_name") == "Flux2Transformer2DModel":
            info["transformer"] = dataclasses.asdict(transformer_config_from_diffusers(config))
    return info
