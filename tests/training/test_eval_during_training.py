"""Evaluation during training (``eval_steps``) and the shared result folder: eval rows at steps 0, eval_steps,
2 * eval_steps... and the last, rising on the demo task; evaluation leaves the training's random stream alone;
``output_dir/final`` loads with from_pretrained and carries a model card."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpokit import GRPOConfig
from grpokit.cli.demo import build_demo, demo_config
from grpokit.reporting.metrics import read_metrics
from grpokit.rollout import SamplingParams
from grpokit.tasks.demo import char_tokenizer, letter_task, tiny_model
from grpokit.training.evaluate import eval_sampling
from grpokit.training.model_card import model_card, run_description
from grpokit.training.trainer import GRPOTrainer

EVAL_KEYS = {"eval/reward", "eval/rewards/char_match", "eval/pass@1", "eval/pass@2", "eval/pass@4",
             "eval/completion_length"}


def test_eval_rows_at_their_steps_and_rising_on_the_demo(tmp_path):
    config = demo_config(output_dir=str(tmp_path / "run"), max_steps=35, eval_steps=15, num_generations_eval=4,
                         eval_temperature=0.0, eval_threshold=0.5, logging_steps=1000)
    model_path, dataset = build_demo(config)
    history = GRPOTrainer(model_path, "char_match", dataset, args=config,
                          eval_dataset=letter_task(copies=1)).train()

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows == json.loads(json.dumps(history))
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 15, 30, 35]  # before training, every 15 steps, and the last
    assert set(rows[0]) == {"step"} | EVAL_KEYS  # step 0: a row of its own
    assert [r["step"] for r in rows[1:]] == list(range(1, 36)) and "reward" in evals[1]
    first, last = evals[0], evals[-1]
    assert last["eval/reward"] > first["eval/reward"] + 0.15, [r["eval/reward"] for r in evals]
    assert last["eval/pass@1"] > first["eval/pass@1"]
    for r in evals:  # greedy: the 4 completions of a prompt are one, so pass@k does not grow with k
        assert r["eval/pass@1"] == r["eval/pass@2"] == r["eval/pass@4"]
        assert r["eval/reward"] == r["eval/rewards/char_match"]

    final = tmp_path / "run" / "final"  # the result as it is shared
    assert sorted(p.name for p in final.iterdir() if p.suffix in (".md", ".png", ".safetensors")) == [
        "README.md", "metrics.png", "model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(final)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-35")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    assert AutoTokenizer.from_pretrained(final).chat_template == char_tokenizer().chat_template
    card = ModelCard.load(final / "README.md")
    assert "`char_match`" in card.text and "eval/pass@1" in card.text and "![" in card.text
    assert card.data.library_name == "transformers"


ROWS = [{"prompt": p, "target": p * 2} for p in ["ab", "c", "dd"]]


def small_trainer(output_dir, eval_dataset=None, **config):
    tokenizer = char_tokenizer("abcd")
    args = GRPOConfig(output_dir=str(output_dir), seed=0, max_steps=3, learning_rate=1e-2, prompts_per_step=2,
                      num_generations=3, max_completion_length=4, save_steps=0, logging_steps=1000, **config)
    return GRPOTrainer(tiny_model(tokenizer, hidden_size=16), "char_match", ROWS, args=args, tokenizer=tokenizer,
                       eval_dataset=eval_dataset)


def test_evaluation_leaves_the_training_stream_alone(tmp_path):
    plain = small_trainer(tmp_path / "plain").train()
    evaluated = small_trainer(tmp_path / "eval", eval_dataset=ROWS, eval_steps=2, eval_temperature=0.7).train()
    training = [r for r in evaluated if r["step"] > 0]
    assert [r["step"] for r in evaluated if "eval/reward" in r] == [0, 2, 3]
    for a, b in zip(plain, training):
        assert a["reward"] == b["reward"] and a["loss"] == b["loss"]


def test_eval_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="eval_steps is 0"):
        GRPOConfig(eval_dataset="prompts.jsonl")
    with pytest.raises(ValueError, match="eval_steps needs eval_dataset"):
        small_trainer(tmp_path / "a", eval_steps=2)
    with pytest.raises(ValueError, match="eval_split 'test' without eval_dataset"):
        small_trainer(tmp_path / "b", eval_steps=2, eval_split="test")
    with pytest.raises(ValueError, match="num_generations_eval must be an integer >= 1"):
        GRPOConfig(num_generations_eval=0)
    params = SamplingParams(max_new_tokens=4, eos_token_ids=(0,), pad_token_id=0, temperature=0.7, top_k=5)
    assert eval_sampling(params, None) == params
    greedy = eval_sampling(params, 0.0)
    assert (greedy.temperature, greedy.top_k, greedy.top_p) == (1.0, 1, 1.0)
    assert eval_sampling(params, 0.3).temperature == 0.3 and eval_sampling(params, 0.3).top_k == 5


def test_model_card_names_model_data_rewards_and_config():
    run = run_description({"learning_rate": 1e-6, "dataset_split": "train"}, model="Qwen/Qwen2.5-0.5B-Instruct",
                          dataset="openai/gsm8k", reward_funcs=["accuracy", "think_format"])
    history = [{"step": 0, "eval/reward": 0.2, "eval/pass@4": 0.5},
               {"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.4, "eval/reward": 0.3, "eval/pass@4": 0.6}]
    text = model_card(run, history, adapters=True, location="runs/x/final", repo_id="me/qwen-grpo")
    card = ModelCard(text)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and card.data.datasets == ["openai/gsm8k"]
    assert card.data.library_name == "peft" and "lora" in card.data.tags and "grpo" in card.data.tags
    assert "# qwen-grpo" in text and "LoRA adapters of `Qwen/Qwen2.5-0.5B-Instruct`" in text
    assert "`accuracy`, `think_format`" in text and "(split `train`)" in text
    assert "| reward | 0.1 (step 1) | 0.4 (step 2) |" in text
    assert "| eval/pass@4 | 0.5 (step 0) | 0.6 (step 2) |" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/qwen-grpo")' in text
    assert "learning_rate: 1.0e-06" in text and "![" in text and "metrics.png" in text
    local = ModelCard(model_card(run_description({}, model="/tmp/base", dataset=None, reward_funcs=["f"]), [],
                                 adapters=False, location="runs/x/final", has_plot=False))
    assert local.data.base_model is None and "metrics.png" not in local.text  # a local path is not a hub id
    assert 'AutoModelForCausalLM.from_pretrained("runs/x/final")' in local.text
