"""Prompts in: dataset loading from every supported source, prompt encoding, left padding, data order."""

import json

import datasets
import pytest

from grpokit.rollout.engine import left_pad
from grpokit.tasks.demo import char_tokenizer
from grpokit.training.data import PromptOrder, encode_prompt, eval_prompts, is_chat, load_prompts

ROWS = [{"prompt": "ab", "answer": "x"}, {"prompt": "cd", "answer": "y"}, {"prompt": "ef", "answer": "z"}]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.mark.parametrize("fmt", ["list", "dataset", "jsonl", "json", "parquet", "csv", "disk"])
def test_load_prompts_from_every_source(tmp_path, fmt):
    ds = datasets.Dataset.from_list(ROWS)
    source = {"list": ROWS, "dataset": ds}.get(fmt)
    if fmt in ("jsonl", "json"):
        source = tmp_path / f"d.{fmt}"
        source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "parquet":
        source = tmp_path / "d.parquet"
        ds.to_parquet(str(source))
    elif fmt == "csv":
        source = tmp_path / "d.csv"
        ds.to_csv(str(source), index=False)
    elif fmt == "disk":
        source = tmp_path / "saved"
        ds.save_to_disk(str(source))
    loaded = load_prompts(source if fmt in ("list", "dataset") else str(source))
    assert loaded.column_names == ["prompt", "answer"] and len(loaded) == 3 and loaded[1]["answer"] == "y"


def test_load_prompts_errors(tmp_path):
    with pytest.raises(ValueError, match="no 'prompt' column"):
        load_prompts([{"question": "a"}])
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported format"):
        load_prompts(str(tmp_path / "d.txt"))


def test_chat_prompt_uses_chat_template(tokenizer):
    chat = [{"role": "user", "content": "ab"}]
    assert is_chat(chat) and not is_chat("ab")
    ids = encode_prompt(tokenizer, chat)
    assert tokenizer.decode(ids) == "<|user|>ab<|end|><|assistant|>"  # generation prompt appended


def test_string_prompt_and_left_truncation(tokenizer):
    assert tokenizer.decode(encode_prompt(tokenizer, "abcdef")) == "abcdef"
    assert tokenizer.decode(encode_prompt(tokenizer, "abcdef", max_length=2)) == "ef"


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_prompt_order_covers_each_epoch_and_resumes():
    order = PromptOrder(num_rows=5, seed=3)
    drawn = [order.take(2) for _ in range(5)]  # 10 rows: exactly two epochs
    flat = [i for d in drawn for i in d]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))
    assert flat[:5] != flat[5:]  # a new permutation each epoch (for this seed)
    replay = PromptOrder(num_rows=5, seed=3)
    replay.take(2)
    replay.take(2)
    state = replay.state_dict()
    resumed = PromptOrder(num_rows=5, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.take(2) for _ in range(3)] == drawn[2:]


def test_dataset_folder_loads_by_path_with_a_named_split(tmp_path):
    folder = tmp_path / "letters"  # a folder of data files, as a dataset repository is laid out
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "data" / "test.jsonl").write_text(json.dumps({"prompt": "gh", "answer": "w"}) + "\n")
    assert load_prompts(str(folder))["prompt"] == ["ab", "cd", "ef"]  # split "train" by default
    test = load_prompts(str(folder), split="test")
    assert test["prompt"] == ["gh"] and test.column_names == ["prompt", "answer"]
    with pytest.raises(ValueError, match=r"dataset '.*letters' has no split 'validation'"):
        load_prompts(str(folder), split="validation")
    assert eval_prompts(None, str(folder), eval_split="test", dataset_config=None)["prompt"] == ["gh"]
    assert eval_prompts(None, str(folder), eval_split=None, dataset_config=None) is None

    saved = tmp_path / "saved"  # a DatasetDict written by save_to_disk: its splits by name too
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(saved))
    assert len(load_prompts(str(saved), split="test")) == 1 and len(load_prompts(str(saved))) == 3
    with pytest.raises(ValueError, match=r"has no split 'dev' \(splits: train, test\)"):
        load_prompts(str(saved), split="dev")
    with pytest.raises(ValueError, match=r"has no split 'dev' \(splits: train, test\)"):
        load_prompts(datasets.load_from_disk(str(saved)), split="dev")


def test_dataset_by_name_errors_name_the_dataset_and_split(tmp_path, monkeypatch):
    def missing(path, name=None, split=None):
        raise FileNotFoundError(f"Couldn't find a dataset script or data at {path}")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(ValueError, match=r"cannot load dataset 'someone/gsm' \(config 'main'\), split 'test': "
                                         "FileNotFoundError"):
        load_prompts("someone/gsm", name="main", split="test")
