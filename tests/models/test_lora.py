"""LoRA through peft: only adapters train, pi_ref is the base with adapters off (no copy), checkpoints hold the
adapters and resume exactly, ``grpokit merge`` writes a plain model, and a LoRA run learns the demo task."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from grpokit import GRPOConfig
from grpokit.cli import main
from grpokit.models.lora import add_lora, check_peft_section, is_peft_model
from grpokit.tasks.demo import DEMO_LETTERS, char_tokenizer, letter_task, tiny_model
from grpokit.training.trainer import GRPOTrainer
from tests.helpers import save_tiny_model

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture()
def base_dir(tmp_path):
    """A tiny model and its tokenizer saved to disk, as a pretrained base would be."""
    return save_tiny_model(tmp_path / "base", "abcd")


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]


def lora_trainer(base_dir, output_dir, **config):
    fields = dict(output_dir=str(output_dir), seed=0, max_steps=3, learning_rate=5e-2, lr_scheduler="constant",
                  prompts_per_step=2, num_generations=4, max_completion_length=5, save_steps=2, logging_steps=1000,
                  beta=0.04, peft=LORA)
    fields.update(config)
    return GRPOTrainer(str(base_dir), count_a, [{"prompt": p} for p in ["ab", "c", "dd", "abc"]],
                       args=GRPOConfig(**fields))


def test_only_adapters_train_and_pi_ref_is_the_base_without_a_copy(base_dir, tmp_path):
    trainer = lora_trainer(base_dir, tmp_path / "run")
    assert is_peft_model(trainer.model) and trainer.ref_model is None  # no second copy of the weights
    history = trainer.train()

    original = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in trainer.model.get_base_model().state_dict().items()
            if "lora_" not in k}
    assert base.keys() == original.keys()
    assert all(torch.equal(base[k], original[k]) for k in original)  # every base weight bit-identical
    trained = {k: p for k, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in k for k in trained)
    assert all(p.abs().max() > 0 for k, p in trained.items() if "lora_B" in k)  # B starts at 0: it moved

    # step 1's policy is the base exactly (B = 0), so the KL to pi_ref is exactly 0; then it grows
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 0
    checkpoint = tmp_path / "run" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files and "ref_model" not in files
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir.resolve())
    assert all("lora_" in k for k in load_file(checkpoint / "adapter_model.safetensors"))


def test_resume_restores_adapters_exactly_and_merge_writes_a_plain_model(base_dir, tmp_path):
    full = lora_trainer(base_dir, tmp_path / "full")
    full.train()
    resumed = lora_trainer(base_dir, tmp_path / "resumed", max_steps=2)
    resumed.train()
    resumed = lora_trainer(base_dir, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)  # from checkpoint-2
    adapters = lambda t: {k: p for k, p in t.model.named_parameters() if p.requires_grad}
    a, b = adapters(full), adapters(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "full" / "checkpoint-3"), str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    assert (out / "tokenizer_config.json").is_file()
    ids = torch.tensor([[5, 6, 7, 5, 8]])
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, full.model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def test_merge_and_peft_errors_say_what_to_do(base_dir, tmp_path, capsys):
    assert main(["merge", str(base_dir), str(tmp_path / "out")]) == 2
    assert "not a LoRA checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="did you mean 'alpha'"):
        GRPOConfig(peft={"lora_alpha": 8})
    with pytest.raises(ValueError, match="peft.dropout"):
        check_peft_section({"dropout": 1.5})
    if "log_exact_kl" in GRPOConfig.field_names():  # needs a separate pi_ref: refused with LoRA
        with pytest.raises(ValueError, match="log_exact_kl"):
            GRPOConfig(peft={}, beta=0.1, log_exact_kl=True)
    tokenizer = char_tokenizer("ab")
    with pytest.raises(ValueError, match="LM head"):
        add_lora(tiny_model(tokenizer, hidden_size=16, tie_word_embeddings=False),
                 {"target_modules": ["q_proj", "lm_head"]})


def partly_trained_demo_model(steps: int = 5):
    """The demo model after a few supervised steps on the letter task (reward ~0.4): a stand-in for a
    pretrained base. LoRA cannot start from the random init: its frozen LM head (std 0.02 weights) bounds
    every logit near 0, so no adapter can sharpen the uniform distribution."""
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, seed=0)
    generator = torch.Generator().manual_seed(0)
    letters = torch.tensor(tokenizer.convert_tokens_to_ids(list(DEMO_LETTERS)))
    head, mid = tokenizer("<|user|>")["input_ids"], tokenizer("<|end|><|assistant|>")["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = letters[torch.randint(0, len(letters), (64, 1), generator=generator)]  # (64, 1) the prompt letter
        ids = torch.cat([torch.tensor(head).expand(64, -1), x, torch.tensor(mid).expand(64, -1), x.expand(64, 4)], 1)
        logits = model(input_ids=ids).logits[:, -5:-1]  # (64, 4, V) predicting the four answer letters
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, -4:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, tokenizer


def test_lora_learns_the_demo_task(tmp_path):
    model, tokenizer = partly_trained_demo_model()
    config = GRPOConfig(output_dir=str(tmp_path), seed=0, max_steps=60, learning_rate=1e-2, lr_scheduler="constant",
                        prompts_per_step=8, num_generations=8, max_completion_length=4, save_steps=0,
                        logging_steps=1000, peft={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear",
                                                  "modules_to_save": ["model.norm"]})
    history = GRPOTrainer(model, "char_match", letter_task(), args=config, tokenizer=tokenizer).train()
    first = sum(r["reward"] for r in history[:5]) / 5
    last = sum(r["reward"] for r in history[-5:]) / 5
    assert last > first + 0.25, (first, last)
