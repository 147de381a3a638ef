"""GRPOConfig: defaults, validation naming the field, YAML round trip, unknown keys with suggestions."""

import pytest

from grpokit.config import GRPOConfig, field_docs
from grpokit.losses import LossConfig


def test_defaults_match_trl_optimisation():
    c = GRPOConfig()
    assert (c.learning_rate, c.adam_beta1, c.adam_beta2, c.adam_epsilon) == (1e-6, 0.9, 0.999, 1e-8)
    assert (c.lr_scheduler, c.weight_decay, c.max_grad_norm, c.temperature) == ("linear", 0.0, 1.0, 1.0)
    assert c.beta == 0.0 and c.num_generations == 8


def test_every_field_has_a_docstring():
    assert set(field_docs()) == set(GRPOConfig.field_names())


@pytest.mark.parametrize("changes, field", [
    ({"num_generations": 1}, "num_generations"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"max_completion_length": 0}, "max_completion_length"),
    ({"prompts_per_step": 3, "num_generations": 2, "steps_per_rollout": 4}, "steps_per_rollout"),
    ({"prompts_per_step": 2, "num_generations": 4, "micro_batch_size": 3}, "micro_batch_size"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"lr_scheduler": "step"}, "lr_scheduler"),
    ({"scale_rewards": "yes"}, "scale_rewards"),
    ({"loss_type": "ppo"}, "loss_type"),
    ({"epsilon_low": 1.5}, "epsilon_low"),
    ({"dtype": "int8"}, "dtype"),
    ({"reward_weights": [1.0, "x"]}, "reward_weights"),
    ({"num_iterations": 0}, "num_iterations"),
    ({"max_steps": 1.5}, "max_steps"),
])
def test_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**changes)


def test_mini_and_micro_batch_arithmetic():
    c = GRPOConfig(prompts_per_step=4, num_generations=4, steps_per_rollout=2, micro_batch_size=4, num_iterations=3)
    assert (c.rollout_size, c.mini_batch_size, c.micro_batch, c.steps_per_rollout_cycle) == (16, 8, 4, 6)
    assert GRPOConfig(prompts_per_step=2, num_generations=4).micro_batch == 8


def test_epsilon_is_trl_alias_of_epsilon_low():
    c = GRPOConfig.from_dict({"epsilon": 0.3})
    assert c.epsilon_low == 0.3 and c.epsilon is None
    assert "epsilon" not in c.to_dict()


def test_loss_config_carries_every_loss_field():
    c = GRPOConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28, delta=2.0, importance_sampling_level="sequence",
                   kl_estimator="k2", max_completion_length=64, sapo_temperature_neg=2.0)
    assert c.loss_config() == LossConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28, delta=2.0,
                                         importance_sampling_level="sequence", kl_estimator="k2",
                                         max_completion_length=64, sapo_temperature_neg=2.0)


def test_yaml_round_trip(tmp_path):
    c = GRPOConfig(learning_rate=3e-3, reward_weights=[1.0, 0.5], micro_batch_size=16, top_k=5)
    path = tmp_path / "c.yaml"
    c.to_yaml(path)
    assert GRPOConfig.from_yaml(path) == c


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-3\nmax_steps: 5\n")  # YAML 1.1 reads 1e-3 as a string
    assert GRPOConfig.from_yaml(path).learning_rate == 1e-3


@pytest.mark.parametrize("key, hint", [("learning_rte", "learning_rate"), ("num_generation", "num_generations"),
                                       ("micro_batch", "micro_batch_size")])
def test_unknown_key_suggests_closest(key, hint):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'; did you mean '{hint}'"):
        GRPOConfig.from_dict({key: 1})


def test_unknown_key_without_close_match():
    with pytest.raises(ValueError, match="unknown config key 'zzzz'"):
        GRPOConfig.from_dict({"zzzz": 1})
