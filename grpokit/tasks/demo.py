"""The embedded demo: GRPO teaches a random-init tiny LM a verifiable task on CPU, with nothing downloaded.

``grpokit train`` (no config) runs it. Pieces, each reusable by tests:

* ``char_tokenizer()``: one token per character plus chat special tokens, wrapped in
  ``PreTrainedTokenizerFast`` with a chat template, so ``save_pretrained``/``from_pretrained`` work.
* ``tiny_model(tokenizer)``: a 2-layer, hidden-64 Llama with random weights (tied embeddings).
* ``letter_task()``: the user says one letter, the answer is that letter four times ("c" -> "cccc");
  graded reward ``char_match`` (position-wise matching characters / the longer length). A random policy
  scores about 0.02 (1 in 51 characters); the policy must read the prompt to score above 1/6.

Completions are capped at four tokens, so the demo does not ask the model to emit EOS. That is deliberate:
from random weights, GRPO almost never discovers "stop exactly after the fourth letter" (the letter's
probability saturates at every position before EOS is ever sampled at the right one; measured at 100-500
steps, several seeds), so a length-sensitive variant plateaus at 0.8. A pretrained model does not have
that exploration problem.
"""

from __future__ import annotations

import torch

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?-'\n"
UNK, EOS = "<unk>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DEMO_LETTERS = "abcdef"
DEMO_LENGTH = 4


def char_tokenizer(chars: str = CHARS):
    """A character-level ``PreTrainedTokenizerFast``: ``<|end|>`` (id 0; EOS and pad), ``<unk>``, the chat
    role tokens, then one token per character of ``chars``.

    EOS is the only special token, i.e. the only token that decoding (``skip_special_tokens=True``, as in
    TRL) hides. A separate pad token would be a second invisible token, and GRPO finds it: a policy pads its
    answer with it and the text-based reward cannot see it. So pad = EOS, as in many released models."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([EOS, UNK, *ROLE_TOKENS, *dict.fromkeys(chars)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    backend.decoder = decoders.Fuse()  # join characters without spaces
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (UNK, *ROLE_TOKENS)])
    backend.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, dtype=torch.float32,
               tie_word_embeddings: bool = True):
    """A random-init Llama causal LM sized for CPU tests: ``num_layers`` layers, ``hidden_size`` wide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def letter_task(letters: str = DEMO_LETTERS, *, length: int = DEMO_LENGTH, copies: int = 10) -> list[dict]:
    """Rows ``{"prompt": [{"role": "user", "content": "c"}], "target": "cccc"}``, ``copies`` of each letter."""
    return [{"prompt": [{"role": "user", "content": c}], "target": c * length} for c in letters for _ in range(copies)]


