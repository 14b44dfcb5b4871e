"""`load(model_id)`: a ready `Pipeline` for a registered variant, from the embedded weights or a path."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoints import (
    EMBEDDED,
    build,
    check_keys,
    check_path,
    component_files,
    dequantize_fp8,
    is_diffusers_folder,
    is_fp8,
    read_component,
    read_json,
    read_safetensors,
    resolve_snapshot,
    strip_prefix,
    tokenizer_folder,
    weights_hash,
)
from .conversion import (
    file_component,
    shaped_like,
    transformer_config_from_diffusers,
    transformer_config_from_keys,
    transformer_layout,
    vae_config_from_diffusers,
    vae_config_from_keys,
    vae_layout,
)
from .device_streaming import (
    available_ram,
    device_free_bytes,
    device_total_bytes,
    human,
    parse_bytes,
    plan_blocks,
)
from .layouts.transformer import packed_from_diffusers
from .layouts.vae import vae_from_diffusers
from .model.autoencoder import AutoEncoder
from .model.transformer import Flux2Transformer
from .pipeline import Component, Pipeline, check_vae_tile
from .precision import compute_dtype, storage, widen_on_use
from .quantize import BNB_FORMATS, FORMATS, PLAIN_DTYPES, check_mode, prepack_int8, quantize_modules, swap_in
from .quantized_files import (
    gguf_component,
    is_gguf,
    logical_shapes,
    read_component_weights,
    read_text_encoder_gguf,
    read_transformer_file,
    read_weights,
    single_file_text_encoder,
    stack_name,
    tensor_types,
    text_encoder_quantizable,
    transformer_quantizable,
    transformer_sizes,
)
from .residency import drop_file_pages, drop_unused_pages, prefault, scratch, stream_weights
from .text_encoders import TextEncoder, load_minilm
from .variants import (
    EMBEDDED_IDS,
    VARIANTS,
    AutoencoderConfig,
    TextEncoderSpec,
    TransformerConfig,
    Variant,
    get_variant,
)

if TYPE_CHECKING:
    from .hosted import HostedPipeline

BLOCKS = ("double_blocks.", "single_blocks.")  # the transformer's streamed blocks (BFL names = ours)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> None:
    """A device name PyTorch knows and this machine has, or a ValueError saying what there is."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device name: cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: this PyTorch sees no CUDA GPU (a CPU build, or none visible): use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ..)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device}: Apple's MPS is not available here: use cpu")


def embedded_files(model_id: str) -> tuple[Path, Path]:
    """(transformer, vae) files shipped inside the package for nano / nano-base."""
    transformer, vae = EMBEDDED / f"{model_id}.safetensors", EMBEDDED / "nano-vae.safetensors"
    for path in (transformer, vae):
        if not path.is_file():
            raise FileNotFoundError(
                f"embedded weights {path.name} are missing from {EMBEDDED}: reinstall flux2studio, "
                "or rebuild them with `flux2 train nano` (see the README)"
            )
    return transformer, vae


PIPELINE_CLASSES = {  # diffusers pipeline class -> our variant family
    "Flux2Pipeline": "dev",
    "Flux2KleinPipeline": "klein",
    "Flux2KleinKVPipeline": "klein-9b-kv",
}


def detect_variant(pipeline_class: str, is_distilled: bool, transformer: TransformerConfig) -> Variant:
    """The registered variant a diffusers folder holds; its shapes may differ (a tiny test pipeline)."""
    family = PIPELINE_CLASSES.get(pipeline_class)
    if family is None:
        raise ValueError(f"model_index.json names {pipeline_class!r}; FLUX.2 folders use {sorted(PIPELINE_CLASSES)}")
    if family != "klein":
        return get_variant(family)
    candidates = [v for v in VARIANTS.values() if v.id.startswith("klein") and not v.kv_cache]
    candidates = [v for v in candidates if (v.guidance_mode == "none") == is_distilled]
    for v in candidates:
        if v.transformer == transformer:
            return v
    return candidates[0]


def text_encoder_spec(base: TextEncoderSpec, folder: Path) -> TextEncoderSpec:
    """The variant's text-encoder spec, with the width read from the folder's config (or the GGUF's header, or a
    single safetensors file's shapes)."""
    if folder.is_file():
        kind, cfg = single_file_text_encoder(folder)
        hidden = cfg["hidden_size"]
    else:
        cfg = read_json(folder / "config.json")
        kind = {"qwen3": "qwen3", "mistral3": "mistral3"}.get(cfg.get("model_type"))
        if kind is None:
            raise ValueError(f"text encoder in {folder} is {cfg.get('model_type')!r}; FLUX.2 uses qwen3 or mistral3")
        hidden = cfg.get("hidden_size") or cfg["text_config"]["hidden_size"]
    if kind != base.kind:  # (a Llama GGUF other than Mistral's is told apart by its width, in `load_single_file`)
        raise ValueError(f"{folder} is a {kind} text encoder; this model takes a {base.kind} one ({base.model})")
    return dataclasses.replace(base, hidden_size=hidden)


def streams(device: str, resident: bool) -> bool:
    """Whether a part's weights stream from their files (CPU, not resident): then fp16/bf16 weights computing in
    the other half type stay as stored, converted per layer as they run (klein-4b fp16 in bf16: 0.35 GiB anonymous
    memory instead of 7.4, each step 4 s longer on a 2-core Zen 4); resident or on an accelerator, cast once."""
    return torch.device(device).type == "cpu" and not resident


def streamed(model: torch.nn.Module, blocks: list[torch.nn.Module], resident: bool, dtype: torch.dtype):
    """Resident: map every page of the weights now (`prefault`). Otherwise, on CPU, stream the blocks'
    memory-mapped weights (`stream_weights`): inference then holds about one block's weights at a time.
    Blocks stored narrower than `dtype` (bf16 files computing in fp32) are widened as they run (`widen_on_use`)."""
    if resident or next(model.parameters()).device.type != "cpu":
        prefault(model)
        prepack_int8(model)  # int8 layers kept in memory: oneDNN's faster layout (CPU only; none elsewhere)
    else:
        stream_weights(blocks)
    widen_on_use(model, blocks, dtype, scratch)
    return model


def decoder_stack(
    source: Path, kind: str, config, dtype: torch.dtype, quantize: str | None = None, streamed: bool = True
):
    """The decoder stack of a Qwen3 or Mistral3 text encoder with `config.num_hidden_layers` layers, built on the
    meta device and given the memory-mapped tensors of `source`, a folder of files or a GGUF file as llama.cpp
    writes one (strict: every missing or mis-shaped key is named); layers stored packed (`flux2 convert
    --quantize`, GGUF) stay packed, and `quantize` packs the others.

    The same module transformers' `from_pretrained` makes, without its copy of every weight; the weights of later
    layers, of the LM head and of Mistral's vision tower are never read.
    """
    from transformers import MistralModel, Qwen3Model

    stack = Qwen3Model if kind == "qwen3" else MistralModel
    if is_gguf(source):
        with torch.device("meta"):
            keys = list(stack._from_config(config).state_dict())
        sd, formats, orders = read_text_encoder_gguf(source, keys)
    else:
        (sd, formats), orders = _stack_tensors(source, kind, config.num_hidden_layers), {}
    sd, scales = dequantize_fp8(sd, dtype, keep=lambda key: True)  # fp8 files: kept fp8, widened per layer
    model = build(lambda: swap_in(stack._from_config(config, dtype=dtype), formats), storage(sd, dtype, streamed),
                  "text encoder")  # fmt: skip
    for name, p in model.named_parameters():
        if name in scales:
            p.fp8_scale = scales[name]  # read by precision.dequantized
    model.rotary_emb = type(model.rotary_emb)(config=model.config)  # its buffers are computed, not stored
    if quantize:
        quantize_modules(model, quantize, text_encoder_quantizable, release=drop_file_pages)
    for name, order in orders.items():  # a Mistral GGUF's query and key rows, stored in llama.cpp's order
        model.get_submodule(name).register_forward_hook(  # (after packing: it swaps modules, hooks and all)
            lambda _m, _x, out, order=order: out.index_select(-1, order.to(out.device))
        )
    return model


def _stack_tensors(model_dir: Path, kind: str, layers: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A text encoder folder's (or single file's) tensors of its first `layers` decoder layers, named as the
    stack names them."""
    raw, packed = read_weights(model_dir) if model_dir.is_file() else read_component_weights(model_dir)
    keep = {f"layers.{i}." for i in range(layers)}
    sd, formats = {}, {}
    for key, tensor in raw.items():
        if (name := stack_name(key, kind)) is None:
            continue  # the LM head, a vision tower and its projector
        if name.startswith("layers.") and name[: name.index(".", 7) + 1] not in keep:
            continue  # a layer after the last one the variant takes
        sd[name] = tensor
    for module, fmt in packed.items():  # (named by their weight: "embed_tokens" alone is not a stack part's name)
        if (name := stack_name(module + ".weight", kind)) is not None and name in sd:
            formats[name.removesuffix(".weight")] = fmt
    return sd, formats


def hf_text_encoder(
    spec: TextEncoderSpec,
    model_dir: Path,
    tokenizer_dir: Path,
    device: str,
    dtype: torch.dtype,
    resident: bool = True,
    quantize: str | None = None,
):
    """Load a Qwen3 / Mistral3 text encoder with only the layers the variant takes (Qwen3's layers' weights
    streamed unless `resident`; its decoder layers' linear weights packed in `quantize`'s format if given).
    `model_dir` may be a GGUF file (config and weights from it) and `tokenizer_dir` a Qwen3 GGUF file (tokenizer
    and chat template from its header)."""
    from transformers import AutoConfig, AutoTokenizer, MistralConfig, Qwen3Config

    last = max(spec.layers)
    if model_dir.is_file():  # a GGUF, or one safetensors file with transformers' names (ComfyUI's)
        kind, fields = single_file_text_encoder(model_dir)
        text_cfg = (Qwen3Config if kind == "qwen3" else MistralConfig)(**fields)
    else:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        text_cfg = config.text_config if spec.kind == "mistral3" else config
    if text_cfg.num_hidden_layers < last:
        raise ValueError(f"text encoder in {model_dir} has {text_cfg.num_hidden_layers} layers; {spec.layers} needed")
    text_cfg.num_hidden_layers = last  # later layers are never read: do not even load them
    if getattr(text_cfg, "layer_types", None) is not None:
        text_cfg.layer_types = text_cfg.layer_types[:last]
    model = decoder_stack(model_dir, spec.kind, text_cfg, dtype, quantize, streams(device, resident)).to(device)
    if tokenizer_dir.is_file():  # a Qwen3 GGUF's own tokenizer, built by transformers
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir.parent, gguf_file=tokenizer_dir.name,
                                                  local_files_only=True)  # fmt: skip
    elif any((tokenizer_dir / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        # Mistral's: imported only then (it pulls in transformers' image processing)
        from transformers import AutoProcessor

        tokenizer = AutoProcessor.from_pretrained(tokenizer_dir, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    encoder = TextEncoder(spec, model, tokenizer)  # the stack only: vision tower and LM head dropped
    streamed(encoder.model, encoder.model.layers, resident, dtype)  # memory-mapped: streamed layer by layer
    return encoder


def load_diffusers_folder(
    folder: Path,
    model_id: str | None,
    device: str,
    dtype: torch.dtype,
    resident: bool,
    attention: str = "auto",
    quantize: str | None = None,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
) -> Pipeline:
    """A diffusers pipeline folder; `vae` (a file or a component folder) and `text_encoder` given replace the
    folder's own. Every part's keys and shapes are checked now, from the files' headers."""
    index = read_json(folder / "model_index.json")
    t_cfg = transformer_config_from_diffusers(read_json(folder / "transformer" / "config.json"))
    distilled = index.get("is_distilled")
    base = get_variant(model_id) if model_id else detect_variant(index.get("_class_name", ""), bool(distilled), t_cfg)
    if model_id:
        check_model_fits(str(folder), t_cfg, base, distilled)
    vae_source = Path(vae) if vae else folder / "vae"
    vae_cfg = checked_vae(vae_source, base.vae)
    if text_encoder is None:
        if not (folder / "tokenizer").is_dir():
            raise FileNotFoundError(f"{folder} has no tokenizer/ folder, which its text encoder needs: fetch it with "
                                    f"`huggingface-cli download {base.repo} --include 'tokenizer/*' --local-dir "
                                    f"{folder}`, or pass --text-encoder")  # fmt: skip
        te_source, tok = folder / "text_encoder", folder / "tokenizer"
        spec = text_encoder_spec(base.text_encoder, te_source)
    else:
        spec, te_source, tok = given_text_encoder(base, text_encoder, t_cfg, folder)
    variant = dataclasses.replace(base, transformer=t_cfg, vae=vae_cfg, text_encoder=spec)

    files = sorted((folder / "transformer").glob("*.safetensors"))
    parts = components(
        variant,
        (lambda: read_component_weights(folder / "transformer"), files),
        (lambda: read_vae(vae_source), vae_files(vae_source)),
        lambda: hf_text_encoder(spec, te_source, tok, device, dtype, resident, quantize),
        device,
        dtype,
        resident,
        quantize,
    )
    return Pipeline(variant, *parts, device=device, dtype=dtype, weights_hash=weights_hash(files), attention=attention)


Reader = tuple[Callable, list[Path]]  # reads a part's tensors (the transformer's: with their formats); its files


def components(
    variant: Variant,
    transformer: Reader,
    vae: Reader,
    text: Callable[[], TextEncoder],
    device: str,
    dtype: torch.dtype,
    resident: bool,
    quantize: str | None = None,
) -> tuple[Component, Component, Component]:
    """The three parts of a pipeline, each loaded on first use from its reader (a folder's or a file's
    tensors, in either layout) and freed after its phase unless `resident`."""
    (read_transformer, transformer_files), (read_vae, vae_files) = transformer, vae

    def load_t() -> Flux2Transformer:
        raw, formats = read_transformer()
        return load_transformer(raw, variant, device, dtype, resident, formats, quantize)

    return (
        Component(load_t, resident, transformer_files),
        Component(lambda: load_vae(read_vae(), variant.vae, device, dtype), resident, vae_files),
        Component(text, resident),
    )


def load_transformer(
    raw: dict[str, torch.Tensor],
    variant: Variant,
    device: str,
    dtype: torch.dtype,
    resident: bool,
    formats: dict[str, str] | None = None,
    quantize: str | None = None,
) -> Flux2Transformer:
    """Our transformer from tensors with BFL or diffusers names, bf16 or fp8 with scales (BFL-named blocks stay
    fp8 and are widened per layer; the rest is dequantised now), or packed (`formats`: {module: format}, from
    GGUF or a quantized file; they stay packed), streamed block by block unless `resident`. `quantize` packs
    the blocks' and modulation layers' linear weights as int8 / int4 now (layers already packed are kept)."""
    formats = formats or {}
    sd, scales, layout = raw, {}, transformer_layout(raw)
    if layout == "diffusers" and (packed := unrunnable_with_diffusers_names(formats.values())):
        raise packed_names_error("the transformer", packed)
    if is_fp8(sd):  # diffusers names: q, k, v have a scale each, fused below
        sd, scales = dequantize_fp8(sd, dtype, keep=lambda key: layout == "bfl" and key.startswith(BLOCKS))
    if layout == "diffusers":  # q, k, v freed as soon as fused
        sd, formats = packed_from_diffusers(sd, formats, copied=drop_file_pages)
    cfg = variant.transformer
    model = build(lambda: swap_in(Flux2Transformer(cfg), formats), storage(sd, dtype, streams(device, resident)),
                  f"{variant.id} transformer")  # fmt: skip
    model = model.to(device)
    for name, p in model.named_parameters():
        if name in scales:
            p.fp8_scale = scales[name].to(p.device)  # read by precision.dequantized
    if quantize:
        quantize_modules(model, quantize, transformer_quantizable, release=drop_file_pages)
    drop_unused_pages(raw, model)  # fp8 originals, unfused q, k, v, a dtype cast: read once, not kept
    return streamed(model, [*model.double_blocks, *model.single_blocks], resident, dtype)


def our_vae_layout(raw: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """A VAE's tensors with BFL or diffusers names, in ours (BFL's)."""
    return vae_from_diffusers(raw, cfg) if vae_layout(raw) == "diffusers" else raw


def load_vae(raw: dict[str, torch.Tensor], cfg: AutoencoderConfig, device: str, dtype: torch.dtype) -> AutoEncoder:
    """Our VAE from tensors with BFL or diffusers names, its pages faulted in at once (it runs whole)."""
    sd = our_vae_layout(raw, cfg)
    model = build(lambda: AutoEncoder(cfg), sd, "VAE", dtype).to(device)
    drop_unused_pages(raw, model)
    prefault(model)  # small, run whole: mapped at once rather than inside the convolutions
    return model


VAE_PREFIXES = ("first_stage_model.", "vae.")  # a VAE inside a full checkpoint (A1111, ComfyUI) or named so


def vae_files(source: Path) -> list[Path]:
    return component_files(source) if source.is_dir() else [source]


def without_vae_prefix(sd: dict) -> dict:
    """Keys without a `VAE_PREFIXES` prefix that all of them carry."""
    prefix = next((p for p in VAE_PREFIXES if sd and all(k.startswith(p) for k in sd)), "")
    return strip_prefix(sd, prefix) if prefix else sd


def read_vae(source: Path) -> dict[str, torch.Tensor]:
    """A VAE's tensors from a file (any `VAE_PREFIXES` prefix removed) or a diffusers component folder."""
    return read_component(source) if source.is_dir() else without_vae_prefix(read_safetensors(source))


def checked_vae(source: Path, base: AutoencoderConfig) -> AutoencoderConfig:
    """The config of the VAE in `source` (a file or a component folder), its keys and shapes checked against the
    model now, from the headers: one that does not fit failed at the first decode, after every step."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in vae_files(check_path(source) if not source.is_dir() else source):
        shapes |= logical_shapes(f)
    shapes = without_vae_prefix(shapes)
    kind = file_component(shapes)
    if kind != "vae":
        raise ValueError(f"{source} is {f'a {kind}' if kind else 'no model part we know'}, not a VAE "
                         "(no encoder. / decoder. weights)")  # fmt: skip
    diffusers = vae_layout(shapes) == "diffusers"
    if source.is_dir() and (source / "config.json").is_file():
        cfg = vae_config_from_diffusers(read_json(source / "config.json"))
    elif diffusers:
        cfg = base
    elif (problem := _vae_fits(shapes, base, False, source)) is None:
        return base  # the model's own shape (nano's too)
    else:  # a FLUX.2-style VAE of another shape (a tiny test one), else what does not fit the model's
        try:
            cfg = vae_config_from_keys(shapes)
        except (KeyError, ValueError, IndexError):
            raise _vae_error(problem) from None
    if (problem := _vae_fits(shapes, cfg, diffusers, source)) is not None:
        raise _vae_error(problem)
    return cfg


def _vae_fits(shapes: dict, cfg: AutoencoderConfig, diffusers: bool, source: Path) -> str | None:
    """Why tensors of these shapes do not fit a VAE of `cfg` (`check_keys`' message), None if they do."""
    meta = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    with torch.device("meta"):
        module = AutoEncoder(cfg)
    try:
        check_keys(module, vae_from_diffusers(meta, cfg) if diffusers else meta, f"VAE {source}")
    except ValueError as e:
        return str(e)
    return None


def _vae_error(problem: str) -> ValueError:
    hint = " (FLUX.1's VAE? FLUX.2 has its own, with 32 latent channels)" if "bn.running_mean" in problem else ""
    return ValueError(f"{problem}{hint}")


def check_model_fits(name: str, t_cfg: TransformerConfig, variant: Variant, distilled: bool | None = None) -> None:
    """Weights said to be `variant` (--model) whose shape is another registered model's, or whose folder says it is
    distilled (or not) when the variant is the other kind, are refused now: they asked for the wrong text encoder
    (a download of many GB) and ran with the wrong guidance."""
    same = [get_variant(i) for i in shaped_like(t_cfg)]  # (none for a tiny test model)
    if same and variant.id not in {v.id for v in same}:
        raise ValueError(f"{name} has the shape of {' / '.join(v.id for v in same)}, not of {variant.id}: pass "
                         f"--model {same[0].id}, or leave --model out to detect it")  # fmt: skip
    if same and distilled is not None and (variant.guidance_mode == "none") != bool(distilled):
        other = [v.id for v in same if (v.guidance_mode == "none") == bool(distilled)]
        kind = "distilled" if distilled else "a Base (undistilled) model"
        raise ValueError(f"{name} is {kind} (model_index.json), not {variant.id}"
                         f"{f': pass --model {other[0]}' if other else ''}")  # fmt: skip


def variant_for_file(path: Path, t_cfg: TransformerConfig, model_id: str | None) -> Variant:
    """The registered variant of a single transformer file: by id if given (its shape checked), else by shape
    and file name."""
    if model_id:
        check_model_fits(str(path), t_cfg, get_variant(model_id))
        return get_variant(model_id)
    name = path.name.lower()
    matches = [v for v in VARIANTS.values() if v.transformer == t_cfg and v.id not in EMBEDDED_IDS]
    if not matches:
        if embedded := [v.id for v in VARIANTS.values() if v.transformer == t_cfg and v.id in EMBEDDED_IDS]:
            raise ValueError(f"{path.name} has the shape of {' / '.join(embedded)}: pass --model {embedded[0]} "
                             "(or the one it was trained as)")  # fmt: skip
        shape = f"hidden size {t_cfg.hidden_size}, {t_cfg.depth} double + {t_cfg.depth_single} single blocks"
        raise ValueError(f"{path.name}: a transformer of {shape} matches no FLUX.2 variant; pass --model ID")
    for v in matches:  # several variants share a shape: the official file names tell them apart
        if any(f.lower() == name for f in v.files):
            return v
    kv = [v for v in matches if v.kv_cache == ("kv" in name)]
    base = [v for v in kv if v.uses_cfg == ("base" in name)]
    return (base or kv or matches)[0]


def find_text_encoder(spec: TextEncoderSpec, given: str | Path | None) -> Path:
    """A local folder holding the text encoder (config + weights + tokenizer), given or in the HF cache, or a
    given text encoder GGUF file."""
    if given is not None:
        component = gguf_component(Path(given))
        if component == "transformer":
            raise ValueError(f"--text-encoder {given} is a FLUX.2 transformer GGUF, not a text encoder")
        if component == "text encoder" or Path(given).is_file():  # a GGUF, or one safetensors file
            return check_path(given)
        folder = resolve_snapshot(given)
        if not (folder / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file():
            folder = folder / "text_encoder"  # a whole pipeline's (its tokenizer/ beside it)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {folder} has no config.json")
        return folder
    found = cached_repo(spec.model)
    if found is None:
        raise FileNotFoundError(
            f"text encoder {spec.model} not found in the Hugging Face cache: pass --text-encoder PATH "
            "or download it (`flux2 pull` or `huggingface-cli download`)"
        )
    return found


def cached_repo(repo: str | None) -> Path | None:
    """A Hugging Face repo's current snapshot folder in the local cache, None when it is not there (no network)."""
    if repo is None:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not in the cache"
        return None


def find_tokenizer(variant: Variant, encoder_file: Path) -> Path:
    """The tokenizer of a text encoder given as one file that holds none (safetensors; a Mistral GGUF, whose
    Tekken tokenizer llama.cpp keeps only in its own form): a `tokenizer/` folder beside the file, else the
    variant's or its text encoder's repo in the Hugging Face cache (no network)."""
    beside = encoder_file.parent / "tokenizer"
    if (beside / "tokenizer_config.json").is_file():
        return beside
    for repo in (variant.repo, variant.text_encoder.model):
        path = cached_repo(repo)
        if path is not None and (tokenizer_folder(path) / "tokenizer_config.json").is_file():
            return tokenizer_folder(path)
    raise FileNotFoundError(
        f"{encoder_file} holds no tokenizer and none was found (in {beside}, or {variant.repo} or "
        f"{variant.text_encoder.model} in the Hugging Face cache): `huggingface-cli download {variant.repo} "
        '--include "tokenizer/*"` fetches it (a few MB)'
    )


def given_text_encoder(
    variant: Variant, given: str | Path | None, t_cfg: TransformerConfig, weights: Path
) -> tuple[TextEncoderSpec, Path, Path]:
    """(spec, source, tokenizer) of the text encoder `given` (else the variant's in the Hugging Face cache), its
    width checked against the transformer's."""
    te_folder = find_text_encoder(variant.text_encoder, given)
    spec = text_encoder_spec(variant.text_encoder, te_folder)
    if spec.context_dim != t_cfg.context_dim:
        raise ValueError(f"{te_folder} gives text features of width {spec.context_dim}; {weights} takes "
                         f"{t_cfg.context_dim} ({variant.id}: {spec.model})")  # fmt: skip
    if te_folder.is_dir():
        tok = tokenizer_folder(te_folder)
    else:  # a Qwen3 GGUF holds its tokenizer; a Mistral one's (Tekken) is taken from its repo, as one file's
        tok = te_folder if is_gguf(te_folder) and spec.kind == "qwen3" else find_tokenizer(variant, te_folder)
    return spec, te_folder, tok


def file_transformer(path: Path) -> TransformerConfig:
    """The shape of the transformer in a single file (from its header), or an error saying which part the file
    holds instead and the flag to give it with."""
    types = strip_prefix(tensor_types(path))
    shapes = {k: shape for k, (shape, _) in types.items()}
    if (kind := file_component(shapes)) == "full checkpoint":
        raise ValueError(f"{path} holds a whole checkpoint (transformer, VAE and text encoder in one file): give the "
                         "transformer's file as --weights, with --vae and --text-encoder")  # fmt: skip
    if kind in ("vae", "text encoder"):
        flag = "--vae" if kind == "vae" else "--text-encoder"
        raise ValueError(f"{path} is a {kind}, not a transformer: give it as {flag}, and the transformer file as "
                         "--weights")  # fmt: skip
    packed = unrunnable_with_diffusers_names(t for _, t in types.values())
    if packed and transformer_layout(shapes) == "diffusers":  # (was said when the transformer loaded, after encoding)
        raise packed_names_error(path, packed)
    return transformer_config_from_keys(shapes)


def unrunnable_with_diffusers_names(formats: Iterable[str]) -> list[str]:
    """The packed formats among these that cannot run under diffusers' names (q, k and v fuse packed only as
    bitsandbytes rows)."""
    return sorted({f for f in formats if f in FORMATS and f not in PLAIN_DTYPES and f not in BNB_FORMATS})


def packed_names_error(what: str | Path, packed: list[str]) -> ValueError:
    """`what` (a file, or a part) packed in `packed` formats under diffusers' names, and the command that fixes it."""
    src = what if isinstance(what, Path) else "FILE"
    return ValueError(f"{what} is quantized ({', '.join(packed)}) with diffusers tensor names, which do not run "
                      f"packed: rewrite it with BFL names: flux2 convert {src} NEW.gguf --to gguf --quantize q8_0 "
                      "(or q4_0)")  # fmt: skip


def load_single_file(
    path: Path,
    model_id: str | None,
    device: str,
    dtype: torch.dtype,
    resident: bool,
    vae_path: str | Path | None,
    text_encoder_path: str | Path | None,
    attention: str = "auto",
    quantize: str | None = None,
) -> Pipeline:
    """An official single transformer file (BFL or diffusers names, bf16 or fp8 with scales), a GGUF one, or
    one written by `flux2 convert --quantize`."""
    t_cfg = file_transformer(path)
    variant = dataclasses.replace(variant_for_file(path, t_cfg, model_id), transformer=t_cfg)
    vae_file = Path(vae_path) if vae_path else path.parent / "ae.safetensors"
    if not vae_path and not vae_file.exists():
        raise FileNotFoundError(f"no VAE beside {path} ({vae_file.name}): pass its file with --vae (vae=)")
    vae_cfg = checked_vae(vae_file, variant.vae)
    spec, te_folder, tok = given_text_encoder(variant, text_encoder_path, t_cfg, path)
    variant = dataclasses.replace(variant, text_encoder=spec, vae=vae_cfg)

    parts = components(
        variant,
        (lambda: read_transformer_file(path), [path]),
        (lambda: read_vae(vae_file), vae_files(vae_file)),
        lambda: hf_text_encoder(spec, te_folder, tok, device, dtype, resident, quantize),
        device,
        dtype,
        resident,
        quantize,
    )
    return Pipeline(variant, *parts, device=device, dtype=dtype, weights_hash=weights_hash([path]), attention=attention)


def load(
    model_id: str | None = None,
    *,
    weights: str | Path | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    resident: bool = False,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    backend: str = "local",
    api: dict | None = None,
    attention: str = "auto",
    quantize: str | None = None,
    vram_budget: str | int | None = None,
    compile: bool = False,
    vae_tile: int | None = None,
) -> Pipeline | HostedPipeline:
    """A `Pipeline` for `model_id` (default: the embedded `nano`, which needs no download).

    `weights` may be a diffusers-format folder, a Hugging Face cache entry of one, or an official
    single transformer file (then `vae` defaults to `ae.safetensors` beside it and `text_encoder` to
    the Hugging Face cache); the variant is detected when `model_id` is None. `resident=True` keeps every part in
    memory between calls (servers); by default each part is loaded for its phase and freed after.

    `dtype`: "auto" (default: bf16 where the device computes it natively, fp32 on CPUs without AVX512-BF16 or
    AMX, weights kept bf16 and widened per layer; `precision.compute_dtype`), or "bf16", "fp16", "fp32".

    Hosted models (pro, max, flex, kontext-*), and klein with `backend="api"`, return a `HostedPipeline`
    that calls Black Forest Labs' API; `api` holds its options (location, safety_tolerance,
    output_format, prompt_upsampling).

    `attention`: "auto" (our AVX512-BF16 kernel for bf16 on a CPU that has it, else PyTorch's SDPA), "sdpa"
    (always PyTorch's, the reference's kernel) or "kernel" (ours, or an error saying why not).

    `quantize`: "int8" (per-channel weights, int8 matmuls with per-token activations on CPU) or "int4" (Q4_0
    blocks, dequantized per layer) for the transformer's blocks and the text encoder's layers, packed at load;
    files already quantized (GGUF, `flux2 convert --quantize`) stay as they are without it.

    `vram_budget` ("8GB", bytes, or "auto": 95% of the device's free memory at load): on an accelerator, the most
    bytes a phase uses there, weights and work memory at each request's size (`work_memory`). Parts are loaded per
    phase into host memory and put on the device for it; blocks that do not fit are copied in ahead of use on a
    side stream (`device_streaming`); a request that cannot fit is refused before any work. Without a budget, a
    model larger than the device's free memory (or, `resident` on CPU, the machine's) is refused before loading.

    `vae_tile` (pixels, 128..2048, step 64): larger images encoded and decoded in overlapping tiles (less memory,
    pixels near the seams differ); under a budget, tiles are chosen where a whole encode or decode cannot fit.

    `compile`: the transformer's blocks through `torch.compile` (`pipeline.compile_blocks`); the first call
    compiles them (tens of seconds), later calls of the same size run the compiled code. For GPUs; on a CPU it
    needs a C compiler.
    """
    check_load_args(model_id, backend, resident, compile, quantize, vae_tile)
    if model_id is not None and (backend == "api" or get_variant(model_id).hosted):
        if weights is not None:
            raise ValueError(f"{model_id} runs on the hosted API: it takes no --weights")
        from .hosted import HostedPipeline

        return HostedPipeline(model_id, **(api or {}))
    if backend == "api":
        raise ValueError(
            "--backend api needs --model (one of pro, max, flex, kontext-pro, kontext-max, klein-4b, klein-9b)"
        )
    device = device or default_device()
    check_device(device)
    compute = compute_dtype(dtype, device)
    budget = vram_bytes(vram_budget, device)
    if model_id is not None:  # before any weights are read: does the transformer fit the device (or budget)?
        single = [Path(weights)] if weights is not None and Path(weights).is_file() else []
        check_fits(get_variant(model_id), device, compute.dtype, quantize, resident, budget, single)
    host = "cpu" if budget is not None else device
    pipe = _load_local(model_id, weights, host, compute.dtype, resident and budget is None, vae, text_encoder,
                       attention, quantize)  # fmt: skip
    if budget is not None:
        pipe.use_device(device, budget, attention)
    pipe.dtype_reason = compute.reason
    pipe.quantize, pipe.compile, pipe.vae_tile = quantize, compile, vae_tile
    return pipe


def check_load_args(model_id: object, backend: object, resident: object, compile: object, quantize: str | None,
                    vae_tile: int | None) -> None:  # fmt: skip
    """`load`'s arguments of the wrong kind or value: a clear error before anything is read."""
    if model_id is not None and not isinstance(model_id, str):
        raise ValueError(f"model_id must be a model's name (`flux2 models` lists them), got {type(model_id).__name__}")
    for name, flag in (("resident", resident), ("compile", compile)):
        if not isinstance(flag, bool):  # ("no" was taken as True)
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    check_mode(quantize)
    check_vae_tile(vae_tile)
    if backend not in ("local", "api"):
        raise ValueError(f"backend {backend!r} is not 'local' or 'api'")


def embedded_shape(path: Path) -> str | None:
    """nano or nano-base for a transformer file of their shape ("base" in its name: nano-base), else None."""
    try:
        t_cfg = file_transformer(path)
    except (ValueError, OSError, KeyError):
        return None  # (said by the single-file loader)
    ids = [i for i in EMBEDDED_IDS if get_variant(i).transformer == t_cfg]
    return next((i for i in ids if ("base" in i) == ("base" in path.name.lower())), ids[0] if ids else None)


def _load_local(
    model_id: str | None,
    weights: str | Path | None,
    device: str,
    torch_dtype: torch.dtype,
    resident: bool,
    vae: str | Path | None,
    text_encoder: str | Path | None,
    attention: str,
    quantize: str | None = None,
) -> Pipeline:
    if weights is not None:
        path = resolve_snapshot(weights)
        if is_diffusers_folder(path):
            return load_diffusers_folder(path, model_id, device, torch_dtype, resident, attention, quantize, vae,
                                         text_encoder)  # fmt: skip
        if path.is_dir():
            if is_diffusers_folder(path.parent) and (path / "config.json").is_file():
                raise ValueError(f"{path} is one part of the diffusers pipeline {path.parent}: give the pipeline's "
                                 "folder as --weights")  # fmt: skip
            raise ValueError(f"{path} is a folder without model_index.json: not a diffusers-format pipeline")
        if model_id is None and path.is_file():  # a nano-shaped file (a training run's, or `flux2 convert`'s)
            model_id = embedded_shape(path)
        if model_id not in EMBEDDED_IDS:
            return load_single_file(
                path, model_id, device, torch_dtype, resident, vae, text_encoder, attention, quantize
            )
    model_id = model_id or "nano"
    variant: Variant = get_variant(model_id)
    if variant.hosted:
        raise ValueError(f"{model_id} is a hosted model (Black Forest Labs API); it has no local weights")
    if model_id not in EMBEDDED_IDS:
        local = cached_weights(variant)
        return load_diffusers_folder(local, model_id, device, torch_dtype, resident, attention, quantize, vae,
                                     text_encoder)  # fmt: skip
    if text_encoder is not None:
        raise ValueError(f"{model_id} has its own embedded text encoder (MiniLM): omit --text-encoder")
    if weights is not None:  # a training run's weights (+ its vae.safetensors), or a file `flux2 convert` wrote
        t_path = Path(weights)  # (quantized safetensors, GGUF, fp8): read as any transformer file is
        vae_path = EMBEDDED / "nano-vae.safetensors"
        raw, formats = read_transformer_file(t_path)
        transformer = load_transformer(raw, variant, device, torch_dtype, True, formats, quantize)  # resident
    else:
        t_path, vae_path = embedded_files(model_id)
        transformer = build(lambda: Flux2Transformer(variant.transformer), read_safetensors(t_path), model_id,
                            torch_dtype)  # fmt: skip
        if quantize:
            quantize_modules(transformer, quantize, transformer_quantizable, release=drop_file_pages)
            if torch.device(device).type == "cpu":  # held in memory whole (never streamed): oneDNN's int8 layout
                prepack_int8(transformer)
    if vae:  # a VAE given (was ignored without --weights); the embedded one is known to fit
        vae_path = Path(vae)
        variant = dataclasses.replace(variant, vae=checked_vae(vae_path, variant.vae))
    vae = build(lambda: AutoEncoder(variant.vae), our_vae_layout(read_vae(vae_path), variant.vae), "VAE", torch_dtype)
    text_encoder = load_minilm(variant.text_encoder, device=device)
    digest = weights_hash([t_path])
    parts = (transformer, vae, text_encoder)
    return Pipeline(variant, *parts, device=device, dtype=torch_dtype, weights_hash=digest, attention=attention)


AUTO_VRAM_SHARE = 0.95  # `--vram auto`: this share of the device's free memory (the rest: the CUDA context's growth)


def vram_bytes(vram_budget: str | int | None, device: str, share: float = 1.0) -> int | None:
    """A `--vram` value in bytes: a size ("8GB", bytes) or "auto": 95% of the accelerator's free memory now; with
    a `share` below 1 (processes packed on one GPU, each its part), of that share of its whole memory, or of what
    is free if less (the others' CUDA contexts)."""
    if vram_budget is None:
        return None
    if torch.device(device).type == "cpu":
        raise ValueError("--vram is a budget of accelerator memory (cuda, mps); on CPU, weights stream from the files")
    if isinstance(vram_budget, str) and vram_budget.strip().lower() == "auto":
        free, total = device_free_bytes(device), device_total_bytes(device)
        if free is None or total is None:
            raise ValueError(f"--vram auto: the free memory of {device} cannot be asked; give a size, e.g. --vram 8GB")
        return int((free if share >= 1 else min(free, total * share)) * AUTO_VRAM_SHARE)
    try:
        return parse_bytes(vram_budget)
    except ValueError as e:
        raise ValueError(f"--vram: {e}, or auto") from None


def check_fits(variant: Variant, device: str, dtype: torch.dtype, quantize: str | None, resident: bool,
               budget: int | None, files: Sequence[Path] = ()) -> None:  # fmt: skip
    """Refuse, before any weights are read, a transformer that cannot run there: a budget above the accelerator's
    free memory or below streaming's least, an accelerator with less free memory than the whole model (without a
    budget), or a resident model larger than the machine's available memory; the error says what would fit. Sizes
    are the skeleton's in `dtype` (packed by `quantize`), scaled to a single weights file's size where it is
    stored smaller (`files`: a GGUF, int8 or fp8 file stays that size in memory)."""
    kind = torch.device(device).type
    free = None
    if budget is not None and kind != "cpu":
        room = device_free_bytes(device)
        if room is not None and budget > room:  # each request's work is checked against it as it comes
            raise ValueError(f"--vram {human(budget)} is more than {device} has free ({human(room)}): "
                             f"try --vram auto ({human(room * AUTO_VRAM_SHARE)}) or less")  # fmt: skip
    if budget is None:  # what the whole model is compared with, if anything (not streamed from files on CPU)
        free = device_free_bytes(device) if kind != "cpu" else (available_ram() if resident else None)
        if free is None:
            return
    fixed, sizes, scale = transformer_sizes(variant.transformer, dtype, quantize, files)
    whole = fixed + sum(sizes)
    what = f"{variant.id}'s transformer"
    if budget is not None:
        plan_blocks(sizes, fixed, budget, what=what)
        return
    if whole > free:
        where = f"{device} has {human(free)} free" if kind != "cpu" else f"this machine has {human(free)} available"
        smaller = {None: "--quantize int8 (about half) or int4", "int8": "--quantize int4", "fp8": "--quantize int4"}
        smaller = smaller.get(quantize, "")
        ways = [f"--vram auto (stream blocks through {human(free * AUTO_VRAM_SHARE)})" if kind != "cpu" else
                "without resident (stream from the files)", *([smaller] if smaller else [])]  # fmt: skip
        stored = str(dtype).removeprefix("torch.") + (f", {quantize}" if quantize else "")
        stored = f"as stored in {files[0].name}" if scale < 1 else stored
        raise ValueError(f"{what} needs {human(whole)} ({stored}); {where}: try {' or '.join(ways)}")


def cached_weights(variant: Variant) -> Path:
    """The variant's downloaded folder (`find_local`), or an error saying how to get it (no network)."""
    local = find_local(variant)
    if local is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise FileNotFoundError(
            f"no weights given for {variant.id} and none in the Hugging Face cache ({HF_HUB_CACHE}, set by "
            f"HF_HUB_CACHE / HF_HOME; repo {variant.repo}): run `flux2 pull {variant.id}`, or pass "
            "--weights PATH (a diffusers folder or a single file)"
        )
    return local


def find_local(variant: Variant) -> Path | None:
    """The variant's diffusers folder in the Hugging Face cache, if downloaded (no network): its own repo's, else
    its 4-bit copy's (`repo_4bit`)."""
    if variant.id in EMBEDDED_IDS:
        return EMBEDDED if (EMBEDDED / f"{variant.id}.safetensors").is_file() else None
    for repo in (variant.repo, variant.repo_4bit):
        path = cached_repo(repo)
        if path is not None and is_diffusers_folder(path):
            return path
    return None


def pull(model_id: str, token: str | None = None, four_bit: bool = False) -> Path:
    """Download a variant's diffusers folder with huggingface_hub (resumable; token from env or login); with
    `four_bit`, its bitsandbytes NF4 copy (`repo_4bit`)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    variant = get_variant(model_id)
    if variant.hosted or not variant.repo:
        raise ValueError(f"{model_id} has no downloadable weights ({'hosted API' if variant.hosted else 'embedded'})")
    repo = variant.repo_4bit if four_bit else variant.repo
    if repo is None:
        known = ", ".join(v.id for v in VARIANTS.values() if v.repo_4bit) or "none"
        raise ValueError(f"{model_id} has no 4-bit copy published (--4bit: {known}); quantize at load with "
                         "--quantize int4, or save a copy with flux2 convert --quantize int4")  # fmt: skip
    try:
        return Path(snapshot_download(repo, token=token, allow_patterns=["*.json", "*.safetensors",
                                      "*.txt", "*.jinja", "tokenizer*", "*.model"]))  # fmt: skip
    except GatedRepoError:
        raise PermissionError(
            f"{repo} is gated: accept its licence ({variant.license}) on its Hugging Face page while "
            "logged in, then set HF_TOKEN (or run `huggingface-cli login`) and run `flux2 pull` again"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo} was not found (or needs a token): set HF_TOKEN") from None
    except Exception as e:  # offline, no DNS, a proxy: huggingface_hub's first line was "Got: ConnectError: ..."
        import httpx
        from huggingface_hub.errors import LocalEntryNotFoundError

        if not any(isinstance(x, httpx.TransportError | LocalEntryNotFoundError | ConnectionError)
                   for x in (e, e.__cause__, e.__context__)):  # fmt: skip
            raise
        raise ConnectionError(f"cannot reach the Hugging Face Hub for {repo}: check the network (HF_HUB_OFFLINE, "
                              "HF_ENDPOINT, a proxy); `flux2 pull` goes on where it stopped") from None  # fmt: skip
