"""Text-embedding extraction parity with diffusers 0.42.1 (tiny random Qwen3 and Mistral3, offline tokenizers)."""

import subprocess
import sys

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


def test_the_embedded_encoder_is_transformers_bert_bit_for_bit_without_importing_it(capfd, tmp_path):
    """nano's MiniLM (our BERT, `tokenizers`' tokenizer) gives transformers' BertModel + AutoTokenizer's ids and
    stacked states exactly (tolerance 0: long prompts truncated, unpadded full-length ones, special-token text,
    unicode; one at a time and batched), prints nothing, and the README's first command (`flux2 generate`, nano)
    does not import transformers (~4 s on a 2-core AVX2 CPU), nor PyTorch's compiler (~1 s; the VAE's memory is
    planned by a bound where it surely fits, not traced: test_work_memory)."""
    from transformers import AutoTokenizer, BertModel

    from flux2studio.text_encoders import format_prompts, load_minilm, minilm_dir
    from flux2studio.variants import MINILM

    encoder = load_minilm(MINILM)
    assert capfd.readouterr() == ("", "")
    prompts = ["a red circle", "", "Ünïcödé café — 東京 🙂", "word " * 80, " ".join(["tok"] * 62), "[CLS] [PAD] [MASK]"]
    tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    ours = format_prompts(MINILM, encoder.tokenizer, prompts)
    theirs = tok(prompts, padding="max_length", truncation=True, max_length=MINILM.max_length, return_tensors="pt")
    for name in ("input_ids", "attention_mask"):
        assert torch.equal(ours[name], theirs[name]), name
    assert ours["attention_mask"].sum(1).tolist()[3:5] == [64, 64]  # truncated; filled without padding
    bert = BertModel.from_pretrained(minilm_dir(), local_files_only=True, add_pooling_layer=False).eval()
    reference = TextEncoder(MINILM, bert, None)
    with torch.no_grad():
        for batch in [*([p] for p in prompts), prompts]:
            ids = format_prompts(MINILM, encoder.tokenizer, batch)
            expected = reference.model(**ids, output_hidden_states=True).hidden_states
            expected = torch.stack([expected[k] for k in MINILM.layers], dim=2).flatten(2)
            assert torch.equal(encoder(batch), expected), batch
    code = (  # the README's first command, in one step
        f"import sys; from flux2studio.cli import main; main(['generate', 'a red circle', '--steps', '1', '-o', "
        f"{str(tmp_path / 'first.png')!r}]); print('transformers' in sys.modules, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False" and (tmp_path / "first.png").is_file()
