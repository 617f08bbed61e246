"""A researcher's own corpus from a task YAML alone: many word/TAG files, globs, a document-level
split, tag stripping and a capped word vocabulary (a small synthetic corpus made in tmp_path)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from bench.config import ConfigError
from bench.data.datamodules import build_datamodule
from bench.data.sources import ChecksumError, DataError, resolve_corpus
from bench.data.tasks import load_task, parse_task
from bench.data.text import lm_text, split_documents
from bench.data.tokenizers import VocabSizeError, WordTokenizer, derive_vocab_size, get_tokenizer

N_DOCS = 30
DOCS = [f"c{i:02d}" for i in range(1, N_DOCS + 1)]
VAL = ["c01", "c11", "c21"]  # every: 10, offset: 0 over the sorted c01..c30
TEST = ["c06", "c16", "c26"]  # every: 10, offset: 5
TRAIN = [d for d in DOCS if d not in VAL + TEST]


def _document(i: int) -> str:
    # Tagged like the Brown corpus; "1/2/cd" is the word "1/2" (the tag follows the LAST separator).
    lines = ["\tThe/at cat/nn sat/vbd ./.", f"\tdoc{i}/np said/vbd 1/2/cd ./."]
    if i % 3 == 0:
        lines.append("\ta/at dog/nn ./.")
    return "\n".join(lines) + "\n"


TASK = {
    "name": "mini-brown",
    "type": "lm",
    "description": "synthetic word/TAG corpus, one document per file",
    "corpus": {"dir": "mini-brown", "format": "text", "tag_separator": "/"},
    "splits": {
        "train": {"files": ["c*"]},
        "val": {"files": ["c*"], "every": 10, "offset": 0},
        "test": {"files": ["c*"], "every": 10, "offset": 5},
    },
    "tokenizer": {"kind": "word", "min_count": 2},
    "seq_len": 8,
    "metrics": ["loss", "perplexity"],
}
# Words seen at least twice in the 24 training documents (each doc{i} occurs once: <unk>).
KEPT = {".", "The", "cat", "sat", "said", "1/2", "a", "dog"}
VOCAB = len(KEPT) + 2  # + <unk>, <eos>


@pytest.fixture
def data_root(tmp_path):
    corpus = tmp_path / "data" / "mini-brown"
    corpus.mkdir(parents=True)
    for i, name in enumerate(DOCS, 1):
        (corpus / name).write_text(_document(i))
    (corpus / "README").write_text("not/nn a/at document/nn\n")  # not matched by c*
    return tmp_path / "data"


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "mini-brown.yaml"
    path.write_text(yaml.safe_dump(TASK))
    return path


def test_glob_every_nth_split_and_tag_stripping(data_root, task_file):
    task = load_task(task_file)
    assert task.vocab_size is None  # left out: derived from the data
    corpus = resolve_corpus(task, data_root)
    assert corpus.matches["c*"] == DOCS  # expanded and sorted; README is not a match
    assert split_documents(task, corpus) == {"train": TRAIN, "val": VAL, "test": TEST}
    train = lm_text(task, corpus, "train")
    assert train == "".join(
        f"The cat sat .\ndoc{i} said 1/2 .\n" + ("a dog .\n" if i % 3 == 0 else "")
        for i in range(1, N_DOCS + 1) if f"c{i:02d}" in TRAIN)
    for tag in ("/at", "/nn", "/vbd", "/np", "/cd", "/."):
        assert tag not in train and tag not in lm_text(task, corpus, "val")


def test_capped_word_vocabulary_and_unknown_words(data_root, task_file):
    task = load_task(task_file)
    corpus = resolve_corpus(task, data_root)
    tok = get_tokenizer(task, corpus)
    assert isinstance(tok, WordTokenizer) and tok.vocab_size == VOCAB
    assert set(tok.words) == KEPT | {"<unk>", "<eos>"} and tok.words[2] == "."
    assert not any("/" in w for w in tok.words if w != "1/2")
    unk, eos = tok.unk_id, tok.eos_id
    assert tok.encode("doc2 said zebra") == [unk, tok.stoi["said"], unk, eos]  # seen once / never
    val_ids = tok.encode(lm_text(task, corpus, "val"))
    assert val_ids.count(unk) == len(VAL)  # exactly each val document's own doc{i}
    # The vocabulary is counted on train only: c06's doc6 is in test, so it is <unk> as well.
    assert tok.encode("doc6") == [unk, eos]
    # max_vocab keeps the most frequent words: with room for one word, only "." is left.
    one = load_task(task_file, overrides={"tokenizer.max_vocab": 3})
    tiny = get_tokenizer(one, corpus)
    assert tiny.words == ["<unk>", "<eos>", "."]
    assert tiny.encode("The cat .") == [unk, unk, 2, eos]


def test_vocab_size_is_derived_or_checked_with_advice_that_works(data_root, task_file):
    task = load_task(task_file)
    assert derive_vocab_size(task, data_root).vocab_size == VOCAB
    given = load_task(task_file, overrides={"vocab_size": VOCAB})
    assert derive_vocab_size(given, data_root).vocab_size == VOCAB
    wrong = load_task(task_file, overrides={"vocab_size": VOCAB + 1})
    with pytest.raises(VocabSizeError) as e:
        derive_vocab_size(wrong, data_root)
    msg = str(e.value)
    assert f"vocab_size={VOCAB + 1} does not match" in msg and f"vocab_size: {VOCAB}" in msg
    assert "remove the vocab_size line" in msg and "--set" not in msg


def test_lm_datamodule_yields_batches(data_root, task_file):
    dm = build_datamodule(task_file, data_dir=data_root, batch_size=4, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == VOCAB
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 8) and int(x.max()) < VOCAB
    assert (x[:, 1:] == y[:, :-1]).all()
    vx, _ = next(iter(dm.val_dataloader()))
    assert vx.shape[1] == 8
    assert next(iter(dm.test_dataloader()))[0].shape[1] == 8


def test_a_pattern_that_matches_nothing_names_it_and_the_directories(data_root, tmp_path):
    task = parse_task({**TASK, "splits": {**TASK["splits"], "val": {"files": ["x*", "c0[1-3]"]}}})
    with pytest.raises(DataError) as e:
        resolve_corpus(task, data_root)
    msg = str(e.value)
    assert "no file matches 'x*'" in msg and str(data_root / "mini-brown") in msg
    assert "'c*'" not in msg.splitlines()[0] and "c0[1-3]" not in msg  # only the failing pattern


def test_matched_files_are_verified_against_sha256sums(data_root, task_file):
    corpus_dir = data_root / "mini-brown"
    good = hashlib.sha256((corpus_dir / "c05").read_bytes()).hexdigest()
    (corpus_dir / "SHA256SUMS").write_text(f"{good}  c05\n")
    task = load_task(task_file)
    assert "SHA256SUMS" not in resolve_corpus(task, data_root).matches["c*"]
    (corpus_dir / "c05").write_text("changed/vb\n")
    with pytest.raises(ChecksumError, match="c05 is corrupt"):
        resolve_corpus(task, data_root)


def test_explicit_file_lists_keep_their_order_and_single_files_still_work(data_root):
    task = parse_task({**TASK, "corpus": {**TASK["corpus"], "files": [{"name": "c03"}, {"name": "c02"}]},
                       "splits": {"train": {"files": ["c03", "c02", "c1*"]}, "val": {"file": "c02"}},
                       "tokenizer": {"kind": "word"}})
    corpus = resolve_corpus(task, data_root)
    docs = split_documents(task, corpus)
    assert docs["train"] == ["c03", "c02", *[f"c{i}" for i in range(10, 20)]] and docs["val"] == ["c02"]


def test_val_and_test_may_not_share_documents(data_root):
    task = parse_task({**TASK, "splits": {**TASK["splits"], "test": {"files": ["c*"], "every": 5}}})
    with pytest.raises(DataError, match="document c01 is in both val and test"):
        split_documents(task, resolve_corpus(task, data_root))


@pytest.mark.parametrize("change, expect", [
    ({"splits": {"train": {"files": ["c*"], "every": 10}, "val": {"files": ["c*"], "every": 10}}},
     "splits.train.every is not allowed on train"),
    ({"splits": {"train": {"files": ["c*"]}, "val": {"files": ["c*"], "every": 10, "offset": 10}}},
     "splits.val.offset=10 is not allowed: need 0 <= offset < every=10"),
    ({"splits": {"train": {"files": ["c*"]}, "val": {"files": ["c*"], "every": 1}}},
     "splits.val.every=1 is not allowed"),
    ({"splits": {"train": {"file": ["c01", "c02"]}, "val": {"files": ["c*"], "every": 10}}},
     "for several use files: ['c01', 'c02']"),
    ({"splits": {"train": {"files": ["../c*"]}, "val": {"files": ["c*"], "every": 10}}},
     "splits.train.files[0]='../c*' is not allowed"),
    ({"tokenizer": {"kind": "char", "min_count": 2}}, "tokenizer.min_count=2 is not allowed for kind='char'"),
    ({"tokenizer": {"kind": "word", "max_vocab": 2}}, "tokenizer.max_vocab=2 is not allowed: must be > 2"),
    ({"tokenizer": {"kind": "word", "vocab_size": 100}}, "or tokenizer.max_vocab to cap a word vocabulary"),
    ({"corpus": {"dir": "mini-brown", "tag_separator": " "}}, "corpus.tag_separator=' ' is not allowed"),
    ({"corpus": {"dir": "mini-brown", "files": [{"name": "c*", "sha256": "0" * 64}]}},
     "corpus.files[0].name='c*' is a glob pattern, so sha256 is not allowed"),
])
def test_bad_settings_are_clear_config_errors(change, expect):
    with pytest.raises(ConfigError) as e:
        parse_task({**TASK, **change})
    assert expect in str(e.value)
    assert "splits.train is required" not in str(e.value)


def test_a_list_under_file_is_one_clear_error():
    with pytest.raises(ConfigError) as e:
        parse_task({**TASK, "splits": {"train": {"file": ["c01", "c02"]}, "val": {"file": "c03"}}})
    # one message about the list, not a follow-up "splits.train is required"
    assert "for several use files" in str(e.value) and "is required" not in str(e.value)


def test_train_end_to_end_from_the_task_yaml(data_root, task_file, tmp_path, monkeypatch, capsys):
    import json

    from bench.cli import main
    from bench.tracking.records import ResultsStore

    for var, value in (("MOE_BENCH_RUNS", tmp_path / "runs"), ("WANDB_DIR", tmp_path / "wandb")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    sets = ["d_model=32", "n_layers=2", "n_heads=2", "d_ff=64", "batch_size=4", "eval_every=3", "eval_batches=1",
            "warmup_steps=1"]
    rc = main(["train", "--task", str(task_file), "--model", "dense", "--budget-steps", "3", "--data-dir",
               str(data_root), "--storage", storage, "--json", *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    record = ResultsStore(storage).get(summary["run_id"])
    assert record.status == "finished" and record.steps == 3
    assert record.config["model"]["vocab_size"] == VOCAB  # derived from the data and recorded
    assert record.config["task_file"]["path"] == str(task_file.resolve())
    # A declared vocab_size the data does not have: one clear error, and nothing left behind.
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({**TASK, "vocab_size": VOCAB + 5}))
    runs_before = sorted((tmp_path / "runs").iterdir())
    rc = main(["train", "--task", str(wrong), "--model", "dense", "--budget-steps", "3", "--data-dir",
               str(data_root), "--storage", storage, *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc != 0 and f"vocab_size: {VOCAB}" in err and "Traceback" not in err
    assert sorted((tmp_path / "runs").iterdir()) == runs_before
    assert len(ResultsStore(storage).list()) == 1


def test_flops_and_plans_size_the_model_from_the_data_as_train_does(data_root, task_file, monkeypatch, capsys):
    import json

    from bench.cli import main
    from bench.data.tasks import load_task
    from bench.train.run import resolve_configs

    monkeypatch.setenv("MOE_BENCH_DATA", str(data_root))  # commands without --data-dir find it here
    assert main(["flops", "--task", str(task_file), "--model", "dense", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["vocab_size"] == VOCAB
    cfg, _ = resolve_configs(load_task(task_file), "dense", "tiny", [], None)  # what plans and sweeps compare
    assert cfg.vocab_size == VOCAB


def test_a_model_vocabulary_smaller_than_the_data_is_refused_before_work(data_root, task_file, train_cli, tmp_path):
    from bench.train.run import resolve_configs

    task = load_task(task_file)
    cfg, _ = resolve_configs(task, "dense", "tiny", [f"vocab_size={VOCAB + 6}"], None, str(data_root))
    assert cfg.vocab_size == VOCAB + 6  # a larger output layer only pads: allowed
    rc, _, err = train_cli("--task", task_file, "--model", "dense", "--budget-steps", 2, "--data-dir", data_root,
                           "--set", "vocab_size=5")
    assert rc == 2 and "Traceback" not in err
    assert f"vocab_size=5 is not allowed: the model must cover the task's {VOCAB} tokens" in err
    assert not (tmp_path / "runs").exists()


class _InterruptAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_rechecks_the_data_and_its_derived_vocabulary(data_root, task_file, train_cli):
    from bench.tracking.records import ResultsStore
    from bench.train.run import train

    settings = ["d_model=32", "n_layers=2", "n_heads=2", "d_ff=64", "batch_size=4", "eval_every=2",
                "eval_batches=1", "warmup_steps=1", "precision=32"]
    cut = train(str(task_file), "dense", "tiny", overrides=settings, budget={"kind": "steps", "value": 4},
                storage=train_cli.storage, data_dir=str(data_root), progress=False, extra_callbacks=[_InterruptAt(3)])
    assert cut.status == "interrupted" and cut.config["data_vocab_size"] == VOCAB
    assert sorted(cut.config["data_sha256"]) == DOCS  # the files it read (c*; not README)
    run_dir = Path(cut.paths["run_dir"])
    files = sorted(run_dir.rglob("*"))
    store = ResultsStore(train_cli.storage)
    doc = data_root / "mini-brown" / "c02"
    original = doc.read_text()
    # A word seen once more becomes one more <unk>: same vocabulary size, other data.
    doc.write_text(original + "\tdoc99/np ./.\n")
    rc, _, err = train_cli("--resume", cut.run_id)
    assert rc == 2 and "Traceback" not in err
    was = cut.config["data_sha256"]["c02"][:12]
    assert (f"run {cut.run_id} trained on other data: the task's files changed since it started: c02 "
            f"(sha256 {was} -> ") in err and "Put back the data it trained on" in err
    assert store.get(cut.run_id).status == "interrupted" and sorted(run_dir.rglob("*")) == files
    # A record made before the fingerprint was kept: the vocabulary size is still checked.
    old = store.get(cut.run_id)
    del old.config["data_sha256"]
    store.save(old)
    # A training document gains a word seen twice: the derived vocabulary has one more token.
    doc.write_text(original + "\tzebra/nn zebra/nn ./.\n")
    rc, _, err = train_cli("--resume", cut.run_id)
    assert rc == 2 and "Traceback" not in err
    assert (f"run {cut.run_id} was built for a vocabulary of {VOCAB} tokens, but the word tokenizer built from the "
            f"task's training split now has {VOCAB + 1}") in err
    stored = ResultsStore(train_cli.storage).get(cut.run_id)
    assert (stored.status, stored.steps, stored.curve) == ("interrupted", cut.steps, cut.curve)
    assert sorted(run_dir.rglob("*")) == files  # no lock, no new log folder
    doc.write_text(original)  # the data it trained on: it resumes
    rc, _, err = train_cli("--resume", cut.run_id)
    assert rc == 0, err
    assert ResultsStore(train_cli.storage).get(cut.run_id).status == "finished"
