"""The telemetry callbacks across checkpoint/resume: real HF ``Trainer.train(resume_from_checkpoint=...)``
and Lightning ``fit(ckpt_path=...)``; the resumed run attaches to its new optimizer and goes on with the
same steps, cadence and values as the uninterrupted run."""
from __future__ import annotations

import pytest
import torch

from optim_plugins.telemetry import load


def test_hf_trainer_resume_keeps_logging(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from optim_plugins.integrations.telemetry_callbacks import HFTelemetryCallback
    from test_hf import Counting, tiny_llama

    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="steps",
                             save_steps=3, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                             dataloader_pin_memory=False, seed=0)

    def run(resume=None):
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Counting(n=16))
        callback = HFTelemetryCallback(every=2, by="layer", depth=3, alerts=True, trainer=trainer)
        trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    full, full_cb = run()  # uninterrupted: saves checkpoint-3 and checkpoint-6
    assert [r["step"] for r in full_cb.recorder.history] == [2, 4, 6]
    resumed, cb = run(resume=str(out / "checkpoint-3"))
    # a recorder on the resumed run's own optimizer, numbered by the global step: records 4 and 6, not 5
    assert cb.recorder is not full_cb.recorder and cb.recorder.optimizer is resumed.optimizer.optimizer
    assert [r["step"] for r in cb.recorder.history] == [4, 6]
    # log history: step 2 from the checkpoint's trainer state, then 4 and 6, each once
    entries = [e for e in resumed.state.log_history if "telemetry/state_bytes" in e]
    assert [e["step"] for e in entries] == [2, 4, 6]
    assert "telemetry/alerts" in entries[-1] and "telemetry/model.layers.1/update_ratio" in entries[-1]
    full_entries = {e["step"]: e for e in full.state.log_history if "telemetry/state_bytes" in e}
    for entry in entries[1:]:  # the same numbers as the uninterrupted run
        for key in ("telemetry/model.layers.0/grad_norm", "telemetry/model.layers.1/update_ratio",
                    "telemetry/model.embed_tokens/update_norm", "telemetry/state_bytes"):
            assert entry[key] == pytest.approx(full_entries[entry["step"]][key], rel=1e-4)
    # telemetry.jsonl: the earlier run's records before step 4, then the resumed run's
    records = load(out / "telemetry.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[1:] == cb.recorder.history and records[0] == full_cb.recorder.history[0]


def test_lightning_fit_resume_keeps_logging(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from optim_plugins.integrations.telemetry_callbacks import LightningTelemetryCallback
    from test_telemetry import lightning_module

    Module = lightning_module(pl)

    g = torch.Generator().manual_seed(0)
    # one batch per epoch: every step sees the same data, however Lightning replays a resumed epoch
    data = torch.utils.data.TensorDataset(torch.randn(4, 6, generator=g), torch.randn(4, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4)

    def run(version, ckpt_path=None):
        callback = LightningTelemetryCallback(every=2, depth=3)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1,
                                      filename="{epoch}", save_on_train_epoch_end=True)
        trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=CSVLogger(tmp_path, version=version),
                             log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback, checkpoints])
        trainer.fit(Module(), loader, ckpt_path=ckpt_path)
        return trainer, callback

    _, full = run(0)
    assert [r["step"] for r in full.recorder.history] == [2, 4, 6]
    trainer, resumed = run(1, ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt")  # resume at global step 3
    assert resumed.recorder.optimizer is trainer.optimizers[0]
    assert [r["step"] for r in resumed.recorder.history] == [4, 6]
    for record, expected in zip(resumed.recorder.history, full.recorder.history[1:]):
        for unit, values in record["units"].items():
            assert values == pytest.approx(expected["units"][unit], rel=1e-5)
    metrics = (tmp_path / "lightning_logs" / "version_1" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    column, step = header.index("telemetry/net.layers.0/update_ratio"), header.index("step")
    rows = [row.split(",") for row in metrics[1:] if row.split(",")[column]]
    assert [int(row[step]) for row in rows] == [4, 6]
    assert [float(row[column]) for row in rows] == pytest.approx(
        [r["units"]["net.layers.0"]["update_ratio"] for r in resumed.recorder.history])
