"""W&B mode decision (no network), the offline WandbLogger with a tiny Lightning run, failures."""
from __future__ import annotations

import warnings

import pytest

from bench.tracking.wandb_setup import (
    WandbUnavailableWarning,
    finish_wandb_logger,
    make_wandb_logger,
    read_offline_history,
    read_offline_run_keys,
    wandb_mode,
    wandb_run_info,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("WANDB_MODE")
    return h


def test_mode_respects_wandb_mode(monkeypatch, home):
    for raw, mode in (("offline", "offline"), ("dryrun", "offline"), ("online", "online"), ("disabled", "disabled")):
        monkeypatch.setenv("WANDB_MODE", raw)
        assert wandb_mode() == (mode, f"WANDB_MODE={raw}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode()[0] == "offline"  # explicit mode wins over being logged in
    monkeypatch.setenv("WANDB_MODE", "bogus")
    mode, reason = wandb_mode()
    assert mode == "offline" and "bogus" in reason


def test_mode_from_login_state(monkeypatch, home):
    mode, reason = wandb_mode()
    assert mode == "offline" and "not logged in" in reason
    (home / ".netrc").write_text("machine example.com login u password p\n")
    assert wandb_mode()[0] == "offline"
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    mode, reason = wandb_mode()
    assert mode == "online" and ".netrc" in reason
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycorp.internal")
    assert wandb_mode()[0] == "offline"  # the key is for another host
    (home / ".netrc").write_text("machine api.wandb.ai login\n")  # broken file: not logged in, no crash
    monkeypatch.delenv("WANDB_BASE_URL")
    assert wandb_mode()[0] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == ("online", "logged in (WANDB_API_KEY is set)")


def test_disabled_mode_returns_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert make_wandb_logger("p", "n", None, {}, tmp_path) is None
    assert "disabled" in capsys.readouterr().err
    assert wandb_run_info(None)["mode"] == "disabled"


def test_offline_logger_with_lightning_trainer(tmp_path, capfd, monkeypatch):
    import torch

    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.loggers import WandbLogger
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            loss = self.layer(x).pow(2).mean()
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            (x,) = batch
            self.log("val/quality", -self.layer(x).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monkeypatch.delenv("WANDB_SILENT")  # moe-bench's default, not the test suite's
    save_dir = tmp_path / "run"
    logger = make_wandb_logger("moe-bench-test", "tiny", "grp", {"model": {"d": 4}, "seed": 1}, save_dir,
                               tags=["test"])
    assert isinstance(logger, WandbLogger)
    out = capfd.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.startswith("wandb:")]
    assert len(lines) == 1 and "offline" in lines[0] and "wandb sync" in lines[0]  # ours, and only ours
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = Trainer(max_steps=2, accelerator="cpu", devices=1, logger=[logger], enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1,
                      limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(Tiny(), data, data)
    info = wandb_run_info(logger)
    finish_wandb_logger(logger)

    assert info["mode"] == "offline" and info["run_id"]
    runs = list((save_dir / "wandb").glob("offline-run-*"))
    assert [str(r) for r in runs] == [info["dir"]]
    assert (runs[0] / f"run-{info['run_id']}.wandb").is_file()
    keys = read_offline_run_keys(runs[0])
    assert {"train/loss", "val/quality"} <= keys
    assert read_offline_run_keys(save_dir) == keys  # a folder holding one run works too
    history = read_offline_history(runs[0])
    assert [row["train/loss"] for row in history if "train/loss" in row][-1] == pytest.approx(
        trainer.callback_metrics["train/loss"].item())
    out = capfd.readouterr()
    wandb_lines = [line for line in (out.out + out.err).splitlines() if line.startswith("wandb:")]
    assert wandb_lines == [], wandb_lines  # W&B's banner, history and summary are off


def test_wandb_project_and_entity_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "my-proj")
    logger = make_wandb_logger("moe-bench", "n", None, {}, tmp_path / "run")
    try:
        assert logger.experiment.project == "my-proj"
    finally:
        finish_wandb_logger(logger)


def test_init_failure_returns_none_and_warns_once(tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("simulated wandb failure")

    monkeypatch.setattr(wandb, "init", broken_init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert make_wandb_logger("p", "a", None, {}, tmp_path) is None
        assert make_wandb_logger("p", "b", None, {}, tmp_path) is None
    ours = [w for w in caught if issubclass(w.category, WandbUnavailableWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "simulated wandb failure" in msg and "CSV" in msg


def test_online_failure_falls_back_to_offline(tmp_path, monkeypatch):
    import wandb

    real_init = wandb.init

    def init(*args, mode=None, **kwargs):
        if mode == "online":
            raise RuntimeError("no route to api.wandb.ai")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.warns(WandbUnavailableWarning, match="no route to api.wandb.ai"):
        logger = make_wandb_logger("p", "fallback", None, {"x": 1}, tmp_path)
    assert logger is not None and wandb_run_info(logger)["mode"] == "offline"
    logger.log_metrics({"train/loss": 1.0}, step=0)
    finish_wandb_logger(logger)
    assert "train/loss" in read_offline_run_keys(tmp_path)


def test_read_offline_stops_at_truncation(tmp_path):
    logger = make_wandb_logger("p", "trunc", None, {}, tmp_path)
    for i in range(50):
        logger.experiment.log({"m": i})
    finish_wandb_logger(logger)
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert len(read_offline_history(path)) == 50
    path.write_bytes(path.read_bytes()[:-30])  # a run still being written / killed mid-record
    assert 0 < len(read_offline_history(path)) <= 50
    with pytest.raises(FileNotFoundError):
        read_offline_run_keys(tmp_path / "nothing-here")
