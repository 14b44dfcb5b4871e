"""Tiny random stand-ins for the real FLUX.2 components, built offline (no hub): tokenizers with chat
templates shaped like Qwen3's and Mistral's, tiny Qwen3 / Mistral3 language models, and matching
diffusers pipelines. Shared by the parity tests.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from flux2studio.variants import AutoencoderConfig, TextEncoderSpec, TransformerConfig

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<s>", "[INST]", "[/INST]",
            "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]  # fmt: skip

# Qwen3's template reduced to what FLUX.2 uses: user turns, generation prompt, empty think block.
QWEN3_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)
# Mistral-Small's template reduced likewise: system prompt block, [INST] user turns, content lists.
MISTRAL_TEMPLATE = (
    "<s>{%- for m in messages %}{%- if m['role'] == 'system' %}"
    "[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{%- else %}[INST]{{ m['content'][0]['text'] }}[/INST]{%- endif %}{%- endfor %}"
)

CORPUS = [
    "a large red circle in the top left and a small blue square at the bottom right on a white background",
    "You are an AI that reasons about image descriptions. You give structured responses",
    "a cat holding a sign that says hello world, photo, 35mm, golden hour",
]


@cache
def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def tokenizer(template: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=_bpe(), pad_token="<pad>", chat_template=template, padding_side="right"
    )


def qwen3(layers: int = 6, hidden: int = 32, seed: int = 0, head_dim: int = 8):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=_bpe().get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
    )
    return Qwen3ForCausalLM(cfg).eval()


def mistral3(layers: int = 6, hidden: int = 32, seed: int = 0, head_dim: int = 8):
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    torch.manual_seed(seed)
    text = MistralConfig(
        vocab_size=_bpe().get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
        image_size=32, patch_size=8,
    )  # fmt: skip
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision)).eval()


QWEN3_SPEC = TextEncoderSpec(kind="qwen3", model="tiny", layers=(1, 3, 5), hidden_size=32, max_length=48)
MISTRAL_SPEC = TextEncoderSpec(
    kind="mistral3",
    model="tiny",
    layers=(2, 4, 5),
    hidden_size=32,
    max_length=48,
    system_message="You are an AI that reasons about image descriptions.",
)

TRANSFORMER = TransformerConfig(
    hidden_size=64, num_heads=2, depth=2, depth_single=2, context_dim=96, axes_dim=(8, 8, 8, 8)
)
VAE = AutoencoderConfig(channels=(32, 32), num_res_blocks=1)


def randomize_(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter (diffusers zero-inits some) so each one matters in a parity test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def diffusers_transformer(cfg: TransformerConfig, seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        axes_dims_rope=cfg.axes_dim,
        guidance_embeds=cfg.guidance_embed,
    )
    return randomize_(model, seed=seed).eval()


def diffusers_vae(cfg: AutoencoderConfig, seed: int = 0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    n = len(cfg.channels)
    vae = AutoencoderKLFlux2(
        block_out_channels=cfg.channels,
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.1)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) + 0.5)
    return vae


def transformer_config(guidance_embed: bool) -> TransformerConfig:
    return dataclasses.replace(TRANSFORMER, guidance_embed=guidance_embed)


def klein_pipeline(budget: int | None = None):
    """klein-4b's pipeline on tiny random parts, the transformer the largest part as in the real models: with a
    device budget, the CPU stands in for the device."""
    from flux2studio.model.autoencoder import AutoEncoder
    from flux2studio.model.transformer import Flux2Transformer
    from flux2studio.pipeline import Pipeline
    from flux2studio.text_encoders import TextEncoder
    from flux2studio.variants import get_variant

    cfg = dataclasses.replace(TRANSFORMER, hidden_size=256, num_heads=4, axes_dim=(16,) * 4, guidance_embed=False)
    vae = dataclasses.replace(get_variant("nano").vae, channels=(32, 32, 32, 32))  # 4 levels: 16 px per token
    variant = dataclasses.replace(get_variant("klein-4b"), transformer=cfg, vae=vae, text_encoder=QWEN3_SPEC)
    parts = randomize_(Flux2Transformer(cfg), std=0.05), randomize_(AutoEncoder(vae), std=0.05)
    encoder = TextEncoder(QWEN3_SPEC, qwen3(), tokenizer(QWEN3_TEMPLATE))
    return Pipeline(variant, *parts, encoder, vram_budget=budget)
