"""Model handling: gradient checkpointing gives the same update, the device is picked or refused clearly."""

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.models.loading import resolve_device
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.trainer import GRPOTrainer


def one_update(tmp_path, **config):
    tokenizer = char_tokenizer("abcd")
    model = tiny_model(tokenizer, hidden_size=32, dtype=torch.float64)
    args = GRPOConfig(output_dir=str(tmp_path), seed=0, max_steps=1, learning_rate=1e-2, prompts_per_step=2,
                      num_generations=4, max_completion_length=5, save_steps=0, dtype="float64", **config)
    trainer = GRPOTrainer(model, lambda completions, **_: [c.count("a") / 5 for c in completions],
                          [{"prompt": "ab"}, {"prompt": "c"}], args=args, tokenizer=tokenizer)
    batch, _ = trainer.rollout()
    trainer.model.train()
    trainer.update(batch)
    return trainer, {k: p.detach().clone() for k, p in trainer.model.named_parameters()}


def is_checkpointing(model) -> bool:
    return model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else (
        model.is_gradient_checkpointing)


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    # checkpointing runs the Hugging Face layers, so the comparison does too (padding_free=False);
    # tests/models/test_packed.py checks the packed forward against them
    plain, expected = one_update(tmp_path / "plain", padding_free=False)
    checkpointed, got = one_update(tmp_path / "gc", gradient_checkpointing=True)
    assert is_checkpointing(checkpointed.model) and not checkpointed.model.config.use_cache
    assert not is_checkpointing(plain.model)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-12)


def test_device_is_picked_automatically_or_refused_with_a_reason():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device must be"):
        GRPOConfig(device="gpu")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        GRPOConfig(gradient_checkpointing="yes")
