"""Task YAML files: every shipped file loads; bad values are reported by field."""
from __future__ import annotations

import copy

import pytest
import yaml

from bench.config import ConfigError
from bench.data.tasks import available_tasks, default_tasks_dir, load_task, parse_task

TASKS = available_tasks()


def test_expected_tasks_are_shipped():
    assert {"tinyshakespeare-char", "wikitext2-small", "wikitext2", "wikitext103", "multi30k-de-en",
            "multi30k-en-de", "wmt14-en-de"} <= set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_every_task_yaml_loads_and_validates(name):
    path = default_tasks_dir() / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# moe-bench train --task " + name), f"{path} must start with its command"
    task = load_task(name)
    assert task.name == name
    assert task.vocab_size > 0 and task.max_seq_len > 0
    assert task.has_split("train") and task.has_split("val")
    assert task.description and task.metrics
    # the same task loads by path too
    assert load_task(path) == task


def _raw(name="tinyshakespeare-char"):
    return yaml.safe_load((default_tasks_dir() / f"{name}.yaml").read_text())


def _problems(data) -> str:
    with pytest.raises(ConfigError) as e:
        parse_task(data)
    return str(e.value)


@pytest.mark.parametrize("path, value, expect", [
    (("type",), "classification", "type='classification' is not allowed: expected one of 'lm', 'translation'"),
    (("tokenizer", "kind"), "sentencepiece", "tokenizer.kind='sentencepiece' is not allowed: expected one of"),
    (("corpus", "format"), "csv", "corpus.format='csv' is not allowed"),
    (("seq_len",), "long", "seq_len='long' is not allowed"),
    (("seq_len",), 0, "seq_len=0 is not allowed"),
    (("vocab_size",), -5, "vocab_size=-5 is not allowed"),
    (("metrics",), ["bleu"], "metrics entry 'bleu' is not allowed for type='lm'"),
    (("splits", "train", "end"), 1.5, "splits.train.start=0.0, end=1.5 is not allowed"),
    (("splits", "val", "file"), "nope.txt", "splits.val file 'nope.txt' is not allowed: not in corpus.files"),
    (("corpus", "files", 0, "sha256"), "abc", "corpus.files[0].sha256='abc' is not allowed"),
    (("corpus", "files", 0, "url"), "ftp://x", "corpus.files[0].url='ftp://x' is not allowed"),
    (("tokenizer", "vocab_size"), 100, "tokenizer.vocab_size=100 is not allowed for kind='char'"),
])
def test_bad_values_name_the_field(path, value, expect):
    data = _raw()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert expect in _problems(data)


def test_unknown_keys_and_all_problems_reported_at_once():
    data = _raw()
    data["seq_length"] = 128
    data["tokenizer"]["kind"] = "bytes"
    msg = _problems(data)
    assert "unknown key 'seq_length'" in msg and "valid keys:" in msg
    assert "tokenizer.kind='bytes'" in msg


def test_translation_rules():
    data = _raw("multi30k-de-en")
    bad = copy.deepcopy(data)
    bad["tokenizer"]["joint"] = False
    bad["src_len"] = None
    bad["corpus"]["format"] = "text"
    bad["splits"]["train"] = {"file": "train.de.gz"}
    msg = _problems(bad)
    for expect in ("tokenizer.joint=false is not allowed", "src_len=None is not allowed",
                   "corpus.format='text' is not allowed for type='translation'",
                   "splits.train is not allowed as {file: train.de.gz}"):
        assert expect in msg
    small = copy.deepcopy(data)
    small["vocab_size"] = 100
    assert "vocab_size=100 is not allowed for byte_level BPE" in _problems(small)


def test_unknown_task_lists_available_ones():
    with pytest.raises(ConfigError) as e:
        load_task("tinyshakespeare")
    msg = str(e.value)
    assert "task='tinyshakespeare' is not allowed" in msg
    for name in TASKS:
        assert name in msg


def test_missing_file_and_custom_tasks_dir(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_task(tmp_path / "nope.yaml")
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**_raw(), "name": "mine"}))
    assert load_task("mine", tasks_dir=tmp_path).name == "mine"
    assert available_tasks(tmp_path) == ["mine"]


def test_overrides_are_validated():
    task = load_task("multi30k-de-en", overrides=["vocab_size=1000", "splits.train.end=0.1"])
    assert task.vocab_size == 1000 and task.splits.train.end == 0.1
    assert task.corpus.files[0].name == "train.de.gz"  # list items survive the round trip
    with pytest.raises(ConfigError, match="seq_len=-1 is not allowed"):
        load_task("tinyshakespeare-char", overrides={"seq_len": -1})


def test_sizes_for_the_model_config():
    ts = load_task("tinyshakespeare-char")
    assert (ts.vocab_size, ts.seq_len, ts.max_seq_len) == (65, 256, 256)
    mt = load_task("multi30k-en-de")
    assert (mt.src_lang, mt.tgt_lang, mt.max_seq_len) == ("en", "de", 64)
    assert not ts.has_split("test") and mt.has_split("test")
