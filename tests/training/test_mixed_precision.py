"""bf16 mixed precision (``bf16: true``): float32 master weights and optimizer state, bfloat16 compute."""

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.models.forward import completion_logps
from grpokit.rollout import SamplingParams, make_engine
from grpokit.tasks.demo import char_tokenizer, letter_task, tiny_model
from grpokit.training.trainer import GRPOTrainer


def test_bf16_needs_float32_master_weights():
    with pytest.raises(ValueError, match="bf16: true keeps float32 master weights .* got dtype 'bfloat16'"):
        GRPOConfig(bf16=True, dtype="bfloat16")


def rollout_of(model, tokenizer, compute_dtype, engine="lean"):
    prompts = [tokenizer.encode(p) for p in ["ab", "cde", "f"] for _ in range(4)]
    params = SamplingParams(max_new_tokens=12, eos_token_ids=(tokenizer.eos_token_id,),
                            pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    return make_engine(engine, model, tokenizer, compute_dtype=compute_dtype).generate(prompts, params)


@pytest.mark.parametrize("engine", ["lean", "hf"])
def test_bf16_sampler_log_probs_match_the_bf16_training_forward(engine):
    """The sampler's recorded log-probs against the training forward under autocast, same weights: equal up
    to bfloat16 rounding (a float32 sampler would be off by the whole bf16 error, about 1e-2 here), and the
    float32 master weights are left as they were."""
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, hidden_size=128, num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rollout = rollout_of(model, tokenizer, torch.bfloat16, engine)
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    mask = rollout.completion_mask.bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = completion_logps(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                rollout.completion_mask)
    fp32 = completion_logps(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                            rollout.completion_mask)
    assert bf16.dtype == torch.float32  # log-probs are float32 whatever the compute dtype
    gap_bf16 = (bf16 - rollout.sampling_logps)[mask].abs().max()
    gap_fp32 = (fp32 - bf16)[mask].abs().max()
    assert gap_bf16 < 3e-2 and gap_fp32 > 1e-4  # bf16 really computed in bf16, and the sampler agrees with it


def test_bf16_training_keeps_float32_state_and_follows_the_float32_gradient(tmp_path):
    """One update under bf16 against float32 from the same rollout: master weights and AdamW moments stay
    float32, and the bf16 gradient points where the float32 one does."""
    tokenizer = char_tokenizer()
    grads = {}
    for bf16 in (False, True):
        config = GRPOConfig(output_dir=str(tmp_path / str(bf16)), max_steps=1, prompts_per_step=4, num_generations=4,
                            max_completion_length=4, learning_rate=1e-2, save_steps=0, bf16=bf16)
        trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=64), "char_match", letter_task(), args=config,
                              tokenizer=tokenizer)
        trainer.engine = make_engine("lean", trainer.model, tokenizer)  # the same float32 rollout for both
        batch, _ = trainer.rollout()
        logps = trainer.parallel.policy(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                        batch.completion_mask)
        with trainer.autocast():
            mixed = trainer.parallel.policy(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                            batch.completion_mask)
        loss = ((mixed if bf16 else logps) * batch.loss_mask).sum()
        loss.backward()
        grads[bf16] = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
        trainer.optimizer.zero_grad()
        trainer.update(batch)
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        state = [v for s in trainer.optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.numel() > 1]
        assert state and all(v.dtype == torch.float32 for v in state)
    cosine = torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0)
    assert grads[True].dtype == torch.float32 and cosine > 0.99
    assert not torch.equal(grads[True], grads[False])  # the bf16 forward really ran in bf16
