"""`moe-bench evaluate` / `translate`: a run's final metrics again, new text and file pairs, clear errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

from bench.cli import main
from bench.data.tasks import METRICS, load_task
from bench.models import model_config
from bench.tracking.records import ResultsStore
from bench.train.module import EVAL_ACTIVATION_BYTES, eval_batch_size
from bench.train.run import train
from bench.train.task_metrics import listed_first, reports_bits_per_char
from tests.train.conftest import SMALL

LM_TASK, MT_TASK = "tinyshakespeare-char", "multi30k-de-en"
MT = SMALL + ["decode_batches=1", "eval_batch_size=32", "beam_size=2", "max_decode_len=10"]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 12  # 3 blocks of 256
SRC = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."]
REF = ["A man rides a bike.", "Two dogs play in the snow.", "A woman reads a book."]


def _evaluate(run_env, capsys, *args) -> tuple[int, dict | str]:
    rc = main(["evaluate", *args, "--storage", run_env["storage"], "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else err.strip())


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_lm_evaluate_reproduces_the_run_and_scores_a_text_file(run_env, capsys, tmp_path):
    record = train(LM_TASK, "switch", "tiny", overrides=SMALL, budget={"kind": "steps", "value": 5},
                   storage=run_env["storage"], progress=False)
    model_file = Path(record.paths["model"])
    assert model_file == Path(record.paths["run_dir"]) / "model.pt" and model_file.is_file()

    rc, result = _evaluate(run_env, capsys, record.run_id)
    assert rc == 0 and result["source"] == {"split": "final"}
    assert result["metrics"]["val_loss"] == pytest.approx(record.metrics["val_loss"], abs=1e-6)
    assert result["metrics"]["unigram_baseline_val_loss"] == record.metrics["unigram_baseline_val_loss"]

    text = tmp_path / "speech.txt"
    text.write_text(TEXT, encoding="utf-8")
    rc, result = _evaluate(run_env, capsys, record.run_id, "--text", str(text))
    assert rc == 0 and result["metrics"]["tokens"] == 3 * 256
    loss = result["metrics"]["loss"]
    # by hand: the model's mean cross-entropy over the same non-overlapping blocks of seq_len + 1
    from bench.data.datamodules import LMDataModule
    from bench.train.evaluate import load_run

    dm = LMDataModule(LM_TASK)
    dm.prepare_data()
    ids = torch.tensor(dm.tokenizer.encode(TEXT))
    blocks = torch.stack([ids[s:s + 257] for s in range(0, len(ids) - 256, 256)])
    model = load_run(record.run_id, run_env["storage"], "test").module.model.eval()
    with torch.no_grad():
        logits = model(blocks[:, :-1]).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert len(blocks) == 3 and loss == pytest.approx(float(expected), rel=1e-5)
    assert math.isfinite(loss) and loss < math.log(65)
    assert result["metrics"]["bits_per_char"] == result["metrics"]["bits_per_token"]  # char: one token per character
    assert result["metrics"]["bits_per_token"] == pytest.approx(loss / math.log(2))
    assert "test_loss" not in record.metrics  # the task has no test split
    assert record.metrics["val_bits_per_char"] == record.metrics["val_bits_per_token"]
    assert {f"val_{m}" for m in METRICS["lm"]} <= set(record.metrics)  # all an LM task may list

    stored = ResultsStore(run_env["storage"]).get(record.run_id)
    assert stored.metrics == record.metrics  # the run's own numbers never change
    assert [e["source"] for e in stored.extra["evaluations"]] == [{"split": "final"}, {"text": str(text.resolve())}]
    assert all(e["at"] and e["metrics"] for e in stored.extra["evaluations"])

    # the readable table
    assert main(["evaluate", record.run_id, "--text", str(text), "--storage", run_env["storage"]]) == 0
    out = capsys.readouterr().out
    assert "text " in out and f"{loss:.4f}" in out and "perplexity" in out

    # bad input: one clear line each
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    (tmp_path / "short.txt").write_text("Speak, speak.\n", encoding="utf-8")
    (tmp_path / "odd.txt").write_text("Speak {\u00e9}\n" * 40, encoding="utf-8")
    for args, needle in [
        (["--text", str(tmp_path / "none.txt")], "none.txt does not exist"),
        (["--text", str(tmp_path / "empty.txt")], "empty.txt is empty"),
        (["--text", str(tmp_path / "short.txt")], "fewer than one block of seq_len + 1 = 257"),
        (["--text", str(tmp_path / "odd.txt")], "cannot be tokenized like task tinyshakespeare-char"),
        (["--src", str(text), "--ref", str(text)], "is a language model (task tinyshakespeare-char): --src/--ref"),
        (["--beam-size", "2"], "--beam-size applies to translation runs"),
        (["--ref", str(text)], "--src and --ref go together"),
    ]:
        rc, err = _evaluate(run_env, capsys, record.run_id, *args)
        assert rc == 2 and needle in err and len(err.splitlines()) == 2, (args, err)  # header + the problem
    rc, err = _evaluate(run_env, capsys, "no-such-run")
    assert rc == 2 and "run_id='no-such-run' is not in the results store" in err
    model_file.unlink()
    rc, err = _evaluate(run_env, capsys, record.run_id)
    assert rc == 2 and "has no saved model: neither" in err and len(err.splitlines()) == 2
    assert len(ResultsStore(run_env["storage"]).get(record.run_id).extra["evaluations"]) == 3


def test_a_kept_checkpoint_is_evaluated_when_there_is_no_model_file(run_env, capsys):
    record = train(LM_TASK, "dense", "tiny", overrides=SMALL, budget={"kind": "steps", "value": 5},
                   storage=run_env["storage"], progress=False, keep_checkpoints=True)
    Path(record.paths["model"]).unlink()
    rc, result = _evaluate(run_env, capsys, record.run_id)
    assert rc == 0 and result["metrics"]["val_loss"] == pytest.approx(record.metrics["val_loss"], abs=1e-6)


def test_sweep_trials_save_no_model(run_env):
    record = train(LM_TASK, "dense", "tiny", overrides=SMALL, budget={"kind": "steps", "value": 5},
                   storage=run_env["storage"], progress=False, tags={"study": "s", "trial": 0})
    assert "model" not in record.paths and not (Path(record.paths["run_dir"]) / "model.pt").exists()


def test_translation_evaluate_reproduces_the_run_scores_a_file_pair_and_translates(run_env, capsys, tmp_path):
    record = train(MT_TASK, "dense", "tiny", overrides=MT, budget={"kind": "steps", "value": 5},
                   storage=run_env["storage"], progress=False)
    assert record.status == "finished"
    run_dir = Path(record.paths["run_dir"])

    rc, result = _evaluate(run_env, capsys, record.run_id)
    assert rc == 0 and result["source"] == {"split": "final", "beam_size": 2}
    m = result["metrics"]
    for split in ("val", "test"):
        assert {f"{split}_{name}" for name in METRICS["translation"]} <= set(record.metrics)  # all it may list
        assert m[f"{split}_loss"] == pytest.approx(record.metrics[f"{split}_loss"], abs=1e-6)
        assert m[f"{split}_bleu"] == record.metrics[f"{split}_bleu"]
        assert m[f"{split}_chrf"] == record.metrics[f"{split}_chrf"]
        assert m[f"{split}_bleu_signature"] == record.metrics[f"{split}_bleu_signature"]
        assert (run_dir / f"eval-{split}.hyp.txt").read_text() == (run_dir / f"{split}.hyp.txt").read_text()

    rc, result = _evaluate(run_env, capsys, record.run_id, "--split", "test", "--beam-size", "1")
    assert rc == 0 and set(k.split("_")[0] for k in result["metrics"]) <= {"test", "quality"}
    assert result["source"] == {"split": "test", "beam_size": 1}

    src, ref = _write(tmp_path / "new.de", SRC), _write(tmp_path / "new.en", REF)
    rc, result = _evaluate(run_env, capsys, record.run_id, "--src", src, "--ref", ref)
    assert rc == 0
    hyps = (run_dir / "eval-new.de.hyp.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 3 and result["hypotheses"] == str(run_dir / "eval-new.de.hyp.txt")
    assert result["metrics"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [REF]).score)
    assert result["metrics"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [REF]).score)
    assert result["metrics"]["bleu_signature"].startswith("nrefs:1") and result["metrics"]["sentences"] == 3
    assert math.isfinite(result["metrics"]["loss"])

    out = tmp_path / "out.en"
    assert main(["translate", record.run_id, "--src", src, "--out", str(out), "--storage", run_env["storage"],
                 "--beam-size", "2"]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == hyps  # the same decoding as evaluate
    capsys.readouterr()
    assert main(["translate", record.run_id, "--src", src, "--storage", run_env["storage"]]) == 0
    assert capsys.readouterr().out.splitlines() == hyps  # stdout; the run's own beam size (2)

    short = _write(tmp_path / "short.en", REF[:2])
    for args, needle in [
        (["--src", src, "--ref", short], "--src has 3 lines but --ref has 2"),
        (["--src", src, "--ref", _write(tmp_path / "empty.en", [])], "empty.en is empty"),
        (["--text", src], "is a translation model (task multi30k-de-en): --text"),
        (["--beam-size", "0"], "beam_size=0 is not allowed"),
    ]:
        rc, err = _evaluate(run_env, capsys, record.run_id, *args)
        assert rc == 2 and needle in err and len(err.splitlines()) == 2, (args, err)  # header + the problem
    stored = ResultsStore(run_env["storage"]).get(record.run_id)
    assert stored.metrics == record.metrics and len(stored.extra["evaluations"]) == 3


def test_clean_removes_models_only_with_models(run_env, capsys):
    record = train(LM_TASK, "dense", "tiny", overrides=SMALL, budget={"kind": "steps", "value": 5},
                   storage=run_env["storage"], progress=False)
    model = Path(record.paths["model"])
    args = ["clean", "--storage", run_env["storage"]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "keep" in out and "final model of a finished run (kept:" in out
    assert "--models also removes model.pt files" in out
    assert main(args + ["--yes"]) == 0 and model.is_file()
    capsys.readouterr()
    assert main(args + ["--models"]) == 0
    assert "remove" in capsys.readouterr().out and model.is_file()
    assert main(args + ["--models", "--yes"]) == 0
    assert not model.exists() and Path(record.paths["csv_file"]).is_file()


# --- a word-level LM that lists bits_per_char -----------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "quickly"]


def _word_text(n_lines: int, seed: int, extra: str = "") -> str:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_lines):
        n = int(torch.randint(3, 9, (1,), generator=g))
        lines.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)))
    return "\n".join(lines) + extra + "\n"


@pytest.fixture
def word_task(tmp_path):
    corpus = tmp_path / "data" / "words"
    corpus.mkdir(parents=True)
    texts = {"train.txt": _word_text(200, 0), "val.txt": _word_text(40, 1, " zebra"),  # zebra: <unk>
             "test.txt": _word_text(40, 2)}
    for name, text in texts.items():
        (corpus / name).write_text(text, encoding="utf-8")
    task = {"name": "words", "type": "lm", "corpus": {"dir": "words", "files": [{"name": n} for n in texts]},
            "splits": {s: {"file": f"{s}.txt"} for s in ("train", "val", "test")},
            "tokenizer": {"kind": "word"}, "seq_len": 8, "metrics": ["bits_per_char", "loss", "perplexity"]}
    path = tmp_path / "words.yaml"
    path.write_text(json.dumps(task), encoding="utf-8")  # JSON is YAML
    return path, tmp_path / "data", texts


def test_word_lm_reports_the_bits_per_char_its_task_lists(run_env, capsys, tmp_path, word_task, monkeypatch):
    import bench.train.loss
    from bench.data.tokenizers import WordTokenizer

    path, data_dir, texts = word_task
    with monkeypatch.context() as patch:
        # Logits in chunks of 5 rows (a batch has 4 x 8): training and final evaluation take the chunked paths
        patch.setattr(bench.train.loss, "LOGITS_CHUNK_BYTES", 5 * 4 * (len(WORDS) + 2))
        assert bench.train.loss.chunk_rows(len(WORDS) + 2) == 5
        chunked, real = [], bench.train.loss._chunked
        patch.setattr(bench.train.loss, "_chunked", lambda *a, **kw: chunked.append(kw["with_grad"]) or real(*a, **kw))
        record = train(str(path), "dense", "tiny", overrides=SMALL, budget={"kind": "steps", "value": 3},
                       storage=run_env["storage"], progress=False, data_dir=str(data_dir))
    assert chunked.count(True) == 3 and False in chunked  # 3 training steps; evaluation batches
    assert record.status == "finished" and record.config["model"]["vocab_size"] == len(WORDS) + 2
    assert bench.train.loss.chunk_rows(len(WORDS) + 2) > 64 * 8  # `evaluate` below: whole batches, same numbers
    tok = WordTokenizer.train([texts["train.txt"]])
    for split in ("val", "test"):
        text = texts[f"{split}.txt"]
        tokens, chars = len(tok.encode(text)), len(text)  # words + one <eos> per line; every character
        assert 3 * tokens < chars
        m = record.metrics
        # by hand: total nats (mean loss x tokens of the split) over characters x ln 2 (the reported
        # bits per token is the logged fp32 value, so equal to ~1e-7)
        assert m[f"{split}_bits_per_char"] == pytest.approx(m[f"{split}_loss"] * tokens / (chars * math.log(2)),
                                                            rel=1e-6)
        assert m[f"{split}_bits_per_char"] == m[f"{split}_bits_per_token"] * (tokens / chars)
        assert m[f"{split}_bits_per_char"] < m[f"{split}_bits_per_token"] / 3
        assert {f"{split}_{name}" for name in METRICS["lm"]} <= set(m)

    rc, result = _evaluate(run_env, capsys, record.run_id)
    assert rc == 0
    assert list(result["metrics"])[:4] == ["val_bits_per_char", "test_bits_per_char", "val_loss", "test_loss"]
    for split in ("val", "test"):
        assert result["metrics"][f"{split}_bits_per_char"] == pytest.approx(record.metrics[f"{split}_bits_per_char"],
                                                                            abs=1e-6)
    new = tmp_path / "new.txt"
    new.write_text(_word_text(30, 3), encoding="utf-8")
    rc, result = _evaluate(run_env, capsys, record.run_id, "--text", str(new))
    body = new.read_text(encoding="utf-8")
    m = result["metrics"]
    assert rc == 0 and list(m)[:3] == ["bits_per_char", "loss", "perplexity"]
    assert m["bits_per_char"] == pytest.approx(m["loss"] * len(tok.encode(body)) / (len(body) * math.log(2)),
                                               rel=1e-6)


def test_text_is_prepared_like_the_tasks_corpus(run_env, capsys, tmp_path, word_task):
    """A tagged corpus with blank lines skipped: `evaluate --text` of a file in the corpus's own
    format (word/TAG, blank lines) scores exactly like the same words without tags or blank lines."""
    path, data_dir, texts = word_task
    task = json.loads(path.read_text(encoding="utf-8"))
    task["corpus"].update(tag_separator="/", blank_lines="skip")
    for name, text in texts.items():  # the corpus itself in the tagged format
        tagged = "\n\n".join(" ".join(f"{w}/nn" for w in line.split()) for line in text.splitlines())
        (data_dir / "words" / name).write_text(tagged + "\n", encoding="utf-8")
    path.write_text(json.dumps(task), encoding="utf-8")
    record = train(str(path), "dense", "tiny", overrides=SMALL, budget={"kind": "steps", "value": 2},
                   storage=run_env["storage"], progress=False, data_dir=str(data_dir))
    assert record.status == "finished" and record.config["model"]["vocab_size"] == len(WORDS) + 2  # no "cat/nn"
    plain = _word_text(30, 3)
    tagged = "\n\n".join(" ".join(f"{w}/nn" for w in line.split()) for line in plain.splitlines()) + "\n"
    (tmp_path / "plain.txt").write_text(plain, encoding="utf-8")
    (tmp_path / "tagged.txt").write_text(tagged, encoding="utf-8")
    rc_plain, want = _evaluate(run_env, capsys, record.run_id, "--text", str(tmp_path / "plain.txt"))
    rc_tagged, got = _evaluate(run_env, capsys, record.run_id, "--text", str(tmp_path / "tagged.txt"))
    assert rc_plain == rc_tagged == 0
    assert got["metrics"] == want["metrics"]  # same tokens, same characters
    (tmp_path / "tags-only.txt").write_text("/nn /at\n\n", encoding="utf-8")
    rc, err = _evaluate(run_env, capsys, record.run_id, "--text", str(tmp_path / "tags-only.txt"))
    assert rc == 2 and "has no text left once prepared like task words" in err


def test_which_tasks_report_bits_per_char_and_the_listed_metrics_come_first():
    char, words, mt = load_task(LM_TASK), load_task("wikitext2"), load_task(MT_TASK)
    assert "bits_per_char" not in words.metrics and words.tokenizer.kind == "word"
    assert reports_bits_per_char(char)  # a char task always did: it is bits_per_token
    assert not reports_bits_per_char(words) and not reports_bits_per_char(mt)
    words.metrics = ["loss", "bits_per_char"]
    assert reports_bits_per_char(words)
    metrics = {"val_loss": 1.0, "val_bits_per_token": 2.0, "test_loss": 3.0, "unigram_baseline_val_loss": 4.0,
               "val_bits_per_char": 5.0, "quality": 6.0}
    assert list(listed_first(words, metrics)) == ["val_loss", "test_loss", "val_bits_per_char", "val_bits_per_token",
                                                  "unigram_baseline_val_loss", "quality"]


def test_eval_batch_size_is_bounded_by_activation_memory():
    task = load_task(LM_TASK)  # seq_len 256
    cfg = model_config("dense", "tiny", {"d_model": 32, "d_ff": 64}, vocab_size=65, max_seq_len=256)
    per_sequence = 256 * 4 * (8 * 32 + 2 * 64)  # tokens x fp32 x (8 d_model + 2 d_ff) = 393,216 bytes
    assert eval_batch_size(64, cfg, task) == 64  # EVAL_ACTIVATION_BYTES holds 5461 such sequences
    assert EVAL_ACTIVATION_BYTES // per_sequence == 5461
    assert eval_batch_size(64, cfg, task, budget_bytes=10 * per_sequence + 1) == 10
    assert eval_batch_size(64, cfg, task, budget_bytes=1) == 1
    moe = model_config("moe", "tiny", {"d_model": 32, "d_ff": 64, "d_expert": 64, "num_experts": 4}, vocab_size=65,
                       max_seq_len=256)
    assert moe.moe.top_k == 2  # a token visits 2 experts of width 64: 4 x (256 + 256) bytes per token
    assert eval_batch_size(64, moe, task, budget_bytes=10 * 256 * 4 * (8 * 32 + 2 * 2 * 64)) == 10
    mt = load_task(MT_TASK)  # a translation batch holds src_len + tgt_len = 128 tokens per sentence
    assert eval_batch_size(64, cfg, mt, budget_bytes=10 * 128 * 4 * (8 * 32 + 2 * 64)) == 10


def test_shipped_presets_and_tasks_keep_the_recorded_eval_batch_size():
    """Runs recorded before the bound evaluated 64 sequences per batch; `evaluate` must batch them alike
    (capacity-limited MoE evaluation depends on the batch)."""
    from bench.data.tasks import available_tasks
    from bench.models.config import FAMILIES, PRESETS

    for name in available_tasks():
        task = load_task(name)
        for preset in PRESETS:
            for family in FAMILIES:
                cfg = model_config(family, preset, vocab_size=task.vocab_size or 50_000, max_seq_len=task.max_seq_len)
                assert eval_batch_size(64, cfg, task) == 64, (name, preset, family)
