"""Text-embedding extraction parity with diffusers 0.42.1 (tiny random Qwen3 and Mistral3, offline tokenizers)."""

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from flux2studio.text_encoders import TextEncoder
from tiny import MISTRAL_SPEC, MISTRAL_TEMPLATE, QWEN3_SPEC, QWEN3_TEMPLATE, mistral3, qwen3, tokenizer

PROMPTS = ["a large red circle in the top left", "a cat holding a sign that says hello world"]


def test_qwen3_embeddings_match_diffusers_and_skip_unused_layers():
    model, tok = qwen3(), tokenizer(QWEN3_TEMPLATE)
    with torch.no_grad():
        expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            model, tok, PROMPTS, max_sequence_length=QWEN3_SPEC.max_length,
            hidden_states_layers=QWEN3_SPEC.layers,
        )  # fmt: skip
    encoder = TextEncoder(QWEN3_SPEC, qwen3(), tok)
    got = encoder(PROMPTS)
    # Only the layers up to the last one taken are kept (5 of 6): same embeddings, less work.
    assert len(encoder.model.layers) == max(QWEN3_SPEC.layers)
    assert got.shape == (2, QWEN3_SPEC.max_length, QWEN3_SPEC.context_dim)
    # Same weights, same ops, same order: bit-identical in fp32.
    assert torch.equal(got, expected)


def test_mistral3_embeddings_match_diffusers():
    model, tok = mistral3(), tokenizer(MISTRAL_TEMPLATE)
    with torch.no_grad():
        expected = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            model, tok, PROMPTS, max_sequence_length=MISTRAL_SPEC.max_length,
            system_message=MISTRAL_SPEC.system_message, hidden_states_layers=MISTRAL_SPEC.layers,
        )  # fmt: skip
    encoder = TextEncoder(MISTRAL_SPEC, mistral3(), tok)
    got = encoder(PROMPTS)
    assert len(encoder.model.layers) == max(MISTRAL_SPEC.layers)
    assert got.shape == (2, MISTRAL_SPEC.max_length, MISTRAL_SPEC.context_dim)
    assert torch.equal(got, expected)


def test_output_dtype_is_explicit():
    encoder = TextEncoder(QWEN3_SPEC, qwen3(), tokenizer(QWEN3_TEMPLATE))
    assert encoder(PROMPTS[:1], dtype=torch.bfloat16).dtype == torch.bfloat16


def test_the_embedded_encoder_loads_without_transformers_bars_or_warnings(capfd):
    """`load("nano")` from Python prints nothing of transformers' (its loading bar, the unused pooler's report) and
    leaves its settings as they were."""
    import transformers

    from flux2studio.text_encoders import load_minilm
    from flux2studio.variants import MINILM

    verbosity, bar = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.enable_progress_bar()  # as in a fresh process (the CLI turns it off)
    try:
        load_minilm(MINILM)
        out, err = capfd.readouterr()
        assert "Loading weights" not in out + err and "pooler" not in out + err
        assert transformers.logging.is_progress_bar_enabled() and transformers.logging.get_verbosity() == verbosity
    finally:
        if not bar:
            transformers.logging.disable_progress_bar()
