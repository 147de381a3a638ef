"""Bad input: ``grpokit train --config X.yaml`` prints one line naming the culprit, exits 2, and leaves the output
folder as it was (even with ``--overwrite``); numerics stay finite, and a non-finite update stops the run at
the last good checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from grpokit import GRPOConfig
from grpokit.cli import main
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.checkpoint import list_checkpoints
from grpokit.training.guards import TrainingError
from grpokit.training.trainer import GRPOTrainer, quiet_transformers

REWARDS = """
import math

def has_a(prompts, completions, completion_ids, answer, **kwargs):
    return [float(a in c) for c, a in zip(completions, answer)]

def raises(prompts, completions, **kwargs):
    raise KeyError("oops")

def too_few(prompts, completions, **kwargs):
    return [1.0]

def gives_nan(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1) + [math.nan]

def gives_inf(prompts, completions, **kwargs):
    return [math.inf] + [0.0] * (len(completions) - 1)

def gives_text(prompts, completions, **kwargs):
    return ["1"] * len(completions)

def huge(prompts, completions, **kwargs):
    return [3e38 if i % 2 else -3e38 for i in range(len(completions))]

not_a_function = 3
"""

EARLIER = {"notes.txt": "keep me\n", "metrics.jsonl": '{"step": 1, "reward": 0.5}\n',
           "checkpoint-1/trainer_state.json": '{"step": 1}'}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tokenizer = char_tokenizer("abcd")
    with quiet_transformers():
        tiny_model(tokenizer, hidden_size=32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def run(tmp_path, model_dir):
    """A valid run config, plus an output folder that holds an earlier run and a user's file."""
    (tmp_path / "data.jsonl").write_text("".join(
        json.dumps({"prompt": [{"role": "user", "content": c}], "answer": c}) + "\n" for c in "abcd"))
    (tmp_path / "rewards.py").write_text(REWARDS)
    config = {"model": str(model_dir), "dataset": str(tmp_path / "data.jsonl"),
              "reward_funcs": [f"{tmp_path / 'rewards.py'}:has_a"], "output_dir": str(tmp_path / "out"),
              "max_steps": 2, "learning_rate": 1e-3, "prompts_per_step": 2, "num_generations": 2,
              "max_completion_length": 4, "save_steps": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    for name, text in EARLIER.items():
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_text(text)
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def reward(run: Path, name: str) -> str:
    return f"[{run / 'rewards.py'}:{name}]"


def write(run: Path, name: str, text: str | bytes) -> str:
    path = run / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return str(path)


def yaml_with(run: Path, **changes) -> str:
    config = yaml.safe_load((run / "run.yaml").read_text()) | changes
    return write(run, "changed.yaml", yaml.safe_dump(config))


# (id, argv after "train" built from the run folder, what the one line must contain)
CASES = [
    ("dataset-missing", lambda r: ["--dataset", str(r / "nowhere.jsonl")],
     "dataset path '{r}/nowhere.jsonl' does not exist"),
    ("dataset-not-utf8", lambda r: ["--dataset", write(r, "bin.jsonl", b"\xff\xfe{")], "'{r}/bin.jsonl' is not UTF-8"),
    ("dataset-not-a-dataset-folder", lambda r: ["--dataset", str(r)], "or was written by save_to_disk"),
    ("jsonl-bad-line", lambda r: ["--dataset", write(r, "bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",\n')],
     "dataset file '{r}/bad.jsonl', line 3: not valid JSON"),
    ("json-bad-line", lambda r: ["--dataset", write(r, "bad.json", '[{"prompt": "a"},\n {"prompt": }]')],
     "dataset file '{r}/bad.json', line 2: not valid JSON"),
    ("jsonl-not-an-object", lambda r: ["--dataset", write(r, "list.jsonl", '{"prompt": "a"}\n[1, 2]\n')],
     "'{r}/list.jsonl', line 2: expected a JSON object, got list"),
    ("no-prompt-column", lambda r: ["--dataset", write(r, "q.jsonl", '{"question": "a", "answer": "b"}\n')],
     "dataset '{r}/q.jsonl' has no 'prompt' column (columns: question, answer)"),
    ("empty-dataset", lambda r: ["--dataset", write(r, "empty.jsonl", "\n")], "dataset '{r}/empty.jsonl' has no rows"),
    ("unknown-key-flag", lambda r: ["--learning_rte", "1e-3"],
     "unknown config key 'learning_rte'; did you mean 'learning_rate'?"),
    ("unknown-key-yaml", lambda r: ["--config", write(r,
     "typo.yaml", (r / "run.yaml").read_text() + "num_generation: 4\n")],
     "unknown config key 'num_generation'; did you mean 'num_generations'?"),
    ("num-generations-1", lambda r: ["--num_generations", "1"], "num_generations must be an integer >= 2"),
    ("learning-rate-0", lambda r: ["--learning_rate", "0"], "learning_rate must be a finite number > 0.0, got 0"),
    ("learning-rate-negative", lambda r: ["--learning_rate", "-1e-3"], "learning_rate must be a finite number > 0.0"),
    ("learning-rate-text", lambda r: ["--config", yaml_with(r, learning_rate="abc")],
     "learning_rate must be a finite number > 0.0, got 'abc'"),
    ("max-steps-text", lambda r: ["--max_steps", "ten"], "max_steps must be an integer >= 1, got 'ten'"),
    ("bool-as-text", lambda r: ["--mask_truncated_completions", "maybe"],
     "mask_truncated_completions must be true or false"),
    ("completion-length-0", lambda r: ["--max_completion_length", "0"],
     "max_completion_length must be an integer >= 1"),
    ("steps-per-rollout-does-not-divide", lambda r: ["--steps_per_rollout", "3"],
     "steps_per_rollout=3 must divide prompts_per_step * num_generations = 2 * 2 = 4"),
    ("micro-batch-does-not-divide", lambda r: ["--micro_batch_size", "3"],
     "micro_batch_size=3 must divide the mini-batch of 4 completions"),
    ("model-path-missing", lambda r: ["--model", str(r / "no-model")],
     "cannot load model '{r}/no-model': no such folder"),
    ("model-relative-path-missing", lambda r: ["--model", "./no/such/model"],
     "cannot load model './no/such/model': no such folder"),
    ("model-folder-without-weights", lambda r: ["--model", str(r)], "cannot load model '{r}'"),
    ("ref-model-missing", lambda r: ["--ref_model", str(r / "no-ref")],
     "cannot load ref_model '{r}/no-ref': no such folder"),
    ("reward-module-missing", lambda r: ["--reward_funcs", "[no_such_module:f]"],
     "reward function 'no_such_module:f': cannot import module 'no_such_module'"),
    ("reward-file-missing", lambda r: ["--reward_funcs", f"[{r}/none.py:f]"], "file '{r}/none.py' does not exist"),
    ("reward-attribute-missing", lambda r: ["--reward_funcs", reward(r, "nope")], "has no attribute 'nope'"),
    ("reward-not-callable", lambda r: ["--reward_funcs", reward(r, "not_a_function")], "is not callable"),
    ("reward-file-broken", lambda r: ["--reward_funcs", f"[{write(r, 'syntax.py', 'def f(:')}:f]"],
     "importing '{r}/syntax.py' failed: SyntaxError"),
    ("reward-unknown-builtin", lambda r: ["--reward_funcs", "[char_mach]"], "did you mean 'char_match'?"),
    ("reward-raises", lambda r: ["--reward_funcs", reward(r, "raises")],
     "reward function 'raises' raised KeyError on sample 0"),
    ("reward-wrong-count", lambda r: ["--reward_funcs", reward(r, "too_few")],
     "reward function 'too_few' returned 1 rewards for 4 completions"),
    ("reward-nan", lambda r: ["--reward_funcs", reward(r, "gives_nan")],
     "reward function 'gives_nan' returned nan for sample 3"),
    ("reward-inf", lambda r: ["--reward_funcs", reward(r, "gives_inf")],
     "reward function 'gives_inf' returned inf for sample 0"),
    ("reward-not-a-number", lambda r: ["--reward_funcs", reward(r, "gives_text")], "returned '1' (str) for sample 0"),
    ("yaml-does-not-parse", lambda r: ["--config", write(r, "broken.yaml", "model: x\nlearning_rate: [1e-3\n")],
     "config file '{r}/broken.yaml' is not valid YAML: line 3"),
    ("config-missing", lambda r: ["--config", str(r / "missing.yaml")],
     "config file '{r}/missing.yaml' does not exist"),
    ("config-not-a-mapping", lambda r: ["--config", write(r, "list.yaml", "- 1\n- 2\n")], "must hold a mapping"),
    ("override-without-value", lambda r: ["--max_steps"], "--max_steps needs a value"),
    ("resume-and-overwrite", lambda r: ["--resume"], "give --resume (continue the run in output_dir) or --overwrite"),
]


@pytest.mark.parametrize("make_args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_lost(run, capsys, make_args, expected):
    before = snapshot(run / "out")
    argv = ["train", "--config", str(run / "run.yaml"), "--overwrite", *make_args(run)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("grpokit: error: "), captured.err
    assert expected.format(r=run) in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(run / "out") == before


def test_an_earlier_run_is_refused_before_the_model_loads(run, capsys, monkeypatch):
    before = snapshot(run / "out")
    monkeypatch.setattr("grpokit.training.trainer.load_policy", lambda *a: pytest.fail("the model was loaded"))
    assert main(["train", "--config", str(run / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"output_dir '{run / 'out'}' already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(run / "out") == before


def test_a_valid_config_still_trains(run, capsys):
    assert main(["train", "--config", str(run / "run.yaml"), "--overwrite"]) == 0
    assert "done, step 2" in capsys.readouterr().out
    out = run / "out"
    assert (out / "notes.txt").read_text() == "keep me\n"  # the user's own file survives an overwrite
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "grpokit", "train", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_subprocess_bad_jsonl_and_failing_reward_no_traceback(run):
    before = snapshot(run / "out")
    bad = write(run, "bad.jsonl", '{"prompt": "a"}\n{"prompt": \n')
    proc = run_cli("--config", str(run / "run.yaml"), "--overwrite", "--dataset", bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"grpokit: error: dataset file '{bad}', line 2: not valid JSON (Expecting value)"
    proc = run_cli("--config", str(run / "run.yaml"), "--overwrite", "--reward_funcs", reward(run, "raises"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "reward function 'raises' raised KeyError on sample 0" in proc.stderr
    assert snapshot(run / "out") == before


def test_subprocess_non_finite_loss_stops_with_exit_1(run):
    """Rewards of +-3e38 are finite, but unscaled advantages that large overflow float32 in the loss."""
    proc = run_cli("--config", str(run / "run.yaml"), "--reward_funcs", reward(run, "huge"), "--scale_rewards", "none",
                   "--output_dir", str(run / "huge"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().startswith("grpokit: error: step 1: the loss is ")
    assert "no checkpoint had been written yet" in proc.stderr
    assert not list_checkpoints(run / "huge")


# ----------------------------------------------------------------------------------------------------------
# numerics in the trainer

FUZZ: dict[str, GRPOTrainer] = {}


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]


def make_trainer(folder: Path, **config) -> GRPOTrainer:
    tokenizer = char_tokenizer("abcd")
    fields = dict(output_dir=str(folder), seed=0, max_steps=4, learning_rate=1e-2, prompts_per_step=2,
                  num_generations=4, max_completion_length=5, save_steps=2, logging_steps=1000, beta=0.1,
                  num_iterations=2)
    fields.update(config)
    return GRPOTrainer(tiny_model(tokenizer, hidden_size=32), count_a, [{"prompt": p} for p in ["ab", "c", "dd"]],
                       args=GRPOConfig(**fields), tokenizer=tokenizer)


@pytest.mark.parametrize("in_backward", [False, True])
def test_non_finite_gradient_skips_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, in_backward):
    import grpokit.training.trainer as trainer_module

    real_loss = trainer_module.grpo_loss
    trainer = make_trainer(tmp_path, optimizer_in_backward=in_backward)
    assert (trainer.stepper is not None) == in_backward

    def poisoned(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        if trainer.step == 2:  # step 3: after checkpoint-2
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "grpo_loss", poisoned)
    with pytest.raises(TrainingError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("step 3: the loss is nan") and f"'{tmp_path / 'checkpoint-2'}'" in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(p, saved[k]) for k, p in trainer.model.named_parameters() if k in saved)  # not stepped
    assert all(p.grad is None for p in trainer.model.parameters())
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("case", ["all-equal", "all-none", "empty-completions"])
def test_degenerate_rollouts_give_finite_losses(tmp_path, case):
    config = {"all-equal": {}, "all-none": {},
              "empty-completions": dict(mask_truncated_completions=True, max_completion_length=1)}[case]
    trainer = make_trainer(tmp_path, max_steps=2, **config)
    if case != "empty-completions":
        value = 0.5 if case == "all-equal" else None
        trainer.reward_funcs[0].func = lambda prompts, completions, **kw: [value] * len(completions)
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"], r["entropy"]])).all() for r in history)
    if case == "all-none":
        assert history[0]["reward"] is None


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rewards=st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)), min_size=8, max_size=8),
       scale=st.sampled_from(["group", "batch", "none"]))
def test_trainer_numerics_stay_finite_for_any_rewards(tmp_path, rewards, scale):
    """Any mix of None, equal, tiny and large rewards: finite advantages, losses and gradients over mu = 2
    updates (one trainer for all examples: the model drifts, which only widens what is tried)."""
    if "trainer" not in FUZZ:
        FUZZ["trainer"] = make_trainer(tmp_path, max_completion_length=3, save_steps=0)
    trainer = FUZZ["trainer"]
    trainer.args.scale_rewards = scale
    trainer.reward_funcs[0].func = lambda prompts, completions, **kw: rewards
    batch, _ = trainer.rollout()
    assert torch.isfinite(batch.advantages).all()
    for _ in range(2):  # mu = 2: the second update is off-policy
        metrics = trainer.update(batch)
        assert torch.isfinite(torch.tensor([metrics["loss"], metrics["grad_norm"]])).all()
