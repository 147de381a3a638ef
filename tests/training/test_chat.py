"""``system_prompt``: a system message before chat prompts, text before string prompts; the model and the
reward functions see the same prompt; completions reach rewards as messages (chat) or text (strings)."""

from grpokit import GRPOConfig
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.chat import add_system_prompt
from grpokit.training.trainer import GRPOTrainer

SYSTEM = "be brief"


def test_add_system_prompt_rules():
    user = [{"role": "user", "content": "a"}]
    assert add_system_prompt(user, SYSTEM) == [{"role": "system", "content": SYSTEM}, *user]
    own = [{"role": "system", "content": "mine"}, *user]
    assert add_system_prompt(own, SYSTEM) == own  # the row's own system message wins
    assert add_system_prompt("2+2=", SYSTEM) == "be brief\n\n2+2="
    assert add_system_prompt(user, None) is user


def rollout_seen(tmp_path, rows):
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [0.0] * len(completions)

    tokenizer = char_tokenizer("abcdefir \n")
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, prompts_per_step=1, num_generations=2,
                      max_completion_length=3, system_prompt=SYSTEM)
    trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=16), spy, rows, args=args, tokenizer=tokenizer)
    batch, _ = trainer.rollout()
    shown = tokenizer.decode(batch.prompt_ids[0][batch.prompt_mask[0].bool()])
    return seen, shown


def test_system_prompt_reaches_the_model_and_the_rewards(tmp_path):
    seen, shown = rollout_seen(tmp_path / "chat", [{"prompt": [{"role": "user", "content": "a"}]}])
    assert shown == "<|system|>be brief<|end|><|user|>a<|end|><|assistant|>"
    assert seen["prompts"][0][0] == {"role": "system", "content": SYSTEM}
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen["completions"])

    seen, shown = rollout_seen(tmp_path / "text", [{"prompt": "dab"}])
    assert shown == "be brief\n\ndab" and seen["prompts"][0] == "be brief\n\ndab"
    assert all(isinstance(c, str) for c in seen["completions"])
