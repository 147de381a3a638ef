"""``report_to`` trackers, each run offline as a user without network would (wandb offline, Trackio's local
database, an MLflow file store, TensorBoard event files), and read back from what they wrote: the config, the
reward of every step, the completions table, ``metrics.png``; a resumed run continues the same tracker runs."""

import json
import struct
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grpokit import GRPOConfig
from grpokit.config import REPORT_TO
from grpokit.reporting import trackers
from grpokit.reporting.mlflow import metric_key, metric_keys
from grpokit.reporting.trackers import TRACKERS, TRACKERS_FILE, check_trackers, read_run_ids, tracker_names
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.trainer import GRPOTrainer

ALL = ["wandb", "trackio", "tensorboard", "mlflow"]


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Every tracker's local store under tmp_path, nothing sent anywhere."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_root"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    (tmp_path / "wandb_root").mkdir()
    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    for name, module in list(sys.modules.items()):  # Trackio reads TRACKIO_DIR once, when first imported
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path


def trainer(output_dir, **config):
    tokenizer = char_tokenizer("abcd")
    fields = dict(output_dir=str(output_dir), seed=0, max_steps=4, learning_rate=1e-2, prompts_per_step=2,
                  num_generations=3, max_completion_length=4, save_steps=2, logging_steps=1000, report_to=ALL,
                  run_name="tiny", project="grpokit-tests", log_completions_steps=2)
    args = GRPOConfig(**{**fields, **config})
    return GRPOTrainer(tiny_model(tokenizer, hidden_size=16), count_a, [{"prompt": p} for p in ["ab", "c", "dd"]],
                       args=args, tokenizer=tokenizer)


def wandb_records(path):
    """The records of a ``.wandb`` file: W&B's 7-byte header, then 32 KiB blocks of chunks (crc32, length,
    type: full / first / middle / last), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buffer = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buffer += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buffer)
            buffer = b""
            yield record


def wandb_run(root, run_id):
    """(config, {step: history row}, completions tables) of the offline runs with this id, in order."""
    config, history, tables = {}, {}, []
    for run_dir in sorted((root / "wandb").glob(f"offline-run-*-{run_id}")):
        for record in wandb_records(run_dir / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                       for item in record.history.item}
                history.setdefault(row["_step"], {}).update(row)
        tables += [json.loads(p.read_text()) for p in sorted((run_dir / "files" / "media" / "table").glob("*.json"))]
    return config, history, tables


def test_every_tracker_offline_receives_config_rewards_completions_and_plot(offline):
    out = offline / "run"
    history = trainer(out).train()
    rewards = {r["step"]: r["reward"] for r in history}
    as_float32 = lambda v: torch.tensor(v).float().item()
    ids = read_run_ids(out)
    assert set(ids) == {"wandb", "trackio", "mlflow"}  # TensorBoard has no run to resume by id

    # wandb: the offline run file
    config, logged, tables = wandb_run(offline / "wandb_root", ids["wandb"])
    assert config["learning_rate"] == 0.01 and config["reward_funcs"] == ["count_a"] and config["max_steps"] == 4
    assert {s: logged[s]["reward"] for s in rewards} == pytest.approx(rewards)
    assert logged[4]["plots/metrics/_type"] == "image-file"  # metrics.png at the last step
    assert len(tables) == 2 and tables[0]["columns"] == ["step", "prompt", "completion", "reward",
                                                         "rewards/count_a", "advantage"]
    assert [row[0] for row in tables[0]["data"]] == [2] * 6  # the whole rollout of step 2 (2 prompts x 3)

    # Trackio: its local database
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_run_config("grpokit-tests", "tiny")["learning_rate"] == 0.01
    logs = SQLiteStorage.get_logs("grpokit-tests", "tiny")
    assert {r["step"]: r["reward"] for r in logs if "reward" in r} == pytest.approx(rewards)
    table = next(r["completions"] for r in logs if "completions" in r and r["step"] == 4)
    assert table["_type"] == "trackio.table" and len(table["_value"]) == 6
    assert {"prompt", "completion", "reward", "advantage"} <= set(table["_value"][0])
    assert [r["step"] for r in logs if "plots/metrics" in r] == [4]

    # TensorBoard: the event files
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [(s, as_float32(r)) for s, r in rewards.items()]
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
             for tag in ("config/text_summary", "completions/text_summary")}
    assert "learning_rate: 0.01" in texts["config/text_summary"][0][1]
    assert [s for s, _ in texts["completions/text_summary"]] == [2, 4]
    assert texts["completions/text_summary"][0][1].startswith("| step | prompt | completion |")
    assert [e.step for e in events.Images("plots/metrics")] == [4]

    # MLflow: the file store, through its client
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(ids["mlflow"])
    assert run.info.run_name == "tiny" and run.data.params["learning_rate"] == "0.01"
    assert client.get_experiment(run.info.experiment_id).name == "grpokit-tests"
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "reward")} == pytest.approx(rewards)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "metrics.png" in artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "completions")] == [
        "completions/step_2.json", "completions/step_4.json"]

    # resumed from checkpoint-2: the same tracker runs carry on
    trainer(out).train(resume_from_checkpoint=out / "checkpoint-2")
    assert read_run_ids(out) == ids
    _, logged, _ = wandb_run(offline / "wandb_root", ids["wandb"])
    assert len(list((offline / "wandb_root" / "wandb").glob(f"offline-run-*-{ids['wandb']}"))) == 2
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "reward")] == [1, 2, 3, 4, 3, 4]
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    assert [r["step"] for r in SQLiteStorage.get_logs("grpokit-tests", "tiny") if "reward" in r][-2:] == [3, 4]
    # a fresh run (overwrite) starts a new tracker run, and drops the earlier run's ids
    trainer(out, overwrite_output_dir=True, max_steps=1, report_to="mlflow", log_completions_steps=0).train()
    fresh = read_run_ids(out)
    assert set(fresh) == {"mlflow"} and fresh["mlflow"] != ids["mlflow"]


def test_report_to_names_and_missing_packages(monkeypatch):
    assert set(TRACKERS) == set(REPORT_TO) - {"none", "jsonl", "all"}
    assert tracker_names("jsonl") == [] and tracker_names("none") == [] and tracker_names("tensorboard") == [
        "tensorboard"]
    assert tracker_names(["jsonl", "wandb", "tensorboard", "wandb"]) == ["wandb", "tensorboard"]
    assert tracker_names("all") == list(TRACKERS)  # every package is installed here (the dev extra)
    monkeypatch.setattr(trackers, "_installed", lambda package: package != "trackio")
    assert "trackio" not in tracker_names("all")
    with pytest.raises(ImportError, match=r"report_to: trackio needs the trackio package: pip install "
                                          r"'grpokit\[trackio\]'"):
        check_trackers(["tensorboard", "trackio"])
    with pytest.raises(ValueError, match="stand alone"):
        GRPOConfig(report_to=["all", "wandb"])
    with pytest.raises(ValueError, match="report_to must be one of"):
        GRPOConfig(report_to=["wandb", "neptune"])
    assert GRPOConfig(report_to="tensorboard").report_to == "tensorboard"  # the old single names still work


def test_mlflow_metric_keys_fit_its_alphabet():
    assert metric_key("eval/pass@4") == "eval/pass_at_4"
    assert metric_key("rewards/char_match") == "rewards/char_match" and metric_key("a(b)") == "a_b_"
    assert metric_keys({"reward": 1.0, "rewards/f": 0.5, "rewards/f/errors": 0.0, "eval/pass@1": 0.2}) == {
        "reward": 1.0, "rewards/f/value": 0.5, "rewards/f/errors": 0.0, "eval/pass_at_1": 0.2}


def test_trackers_file_is_read_back(tmp_path):
    assert read_run_ids(tmp_path) == {}
    (tmp_path / TRACKERS_FILE).write_text("not json")
    assert read_run_ids(tmp_path) == {}
