"""Gradient release under real trainers (optim_plugins.integrations.release): a real HF
``Trainer.train()`` on a tiny LLaMA built from a config and a real Lightning ``fit`` give the
same parameters as the ordinary step order, or refuse what they cannot do with a clear error."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

from optim_plugins.release import is_released

warnings.filterwarnings("ignore", ".*does not have many workers.*")


# ----------------------------------------------------------------------------- Hugging Face

VOCAB = 64


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def token_data(n: int = 16, length: int = 12):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def hf_train(tmp_path, release: bool, optim: str = "adamw_torch", steps: int = 4, **overrides):
    """Train a fresh tiny LLaMA ``steps`` optimizer steps; returns (model, trainer)."""
    from transformers import Trainer, TrainingArguments

    from optim_plugins.integrations.release import HFGradientReleaseCallback

    options = dict(output_dir=str(tmp_path / ("released" if release else "ordinary")), per_device_train_batch_size=4,
                   max_steps=steps, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1, optim=optim,
                   max_grad_norm=0.0, weight_decay=0.1, logging_steps=1, save_strategy="no", report_to=[],
                   use_cpu=True, seed=0, disable_tqdm=True)
    options.update(overrides)
    model = tiny_llama()
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=token_data(),
                      callbacks=[HFGradientReleaseCallback()] if release else None)
    trainer.train()
    return model, trainer


@pytest.fixture(scope="module")
def hf_ordinary(tmp_path_factory):
    pytest.importorskip("transformers")
    return hf_train(tmp_path_factory.mktemp("hf"), release=False)


def test_hf_trainer_with_release_equals_ordinary_steps(hf_ordinary, tmp_path):
    """torch's AdamW built by the Trainer (optim="adamw_torch"), linear schedule with warmup, weight
    decay on some groups only: 4 released steps == 4 ordinary steps, bitwise."""
    ordinary, _ = hf_ordinary
    released, trainer = hf_train(tmp_path, release=True)
    assert trainer.state.global_step == 4
    optimizer = trainer.optimizer.optimizer  # under accelerate's wrapper
    assert not is_released(optimizer)  # the callback removed its hooks when training ended
    assert all(p.grad is None for p in released.parameters())
    moved = 0
    for (name, a), b in zip(ordinary.named_parameters(), released.parameters()):
        assert torch.equal(a, b), name
        moved += int(not torch.equal(a, tiny_llama().state_dict()[name]))
    assert moved == len(list(ordinary.parameters()))  # every tensor was trained
    assert optimizer.state[next(released.parameters())]["step"].item() == 4
    assert trainer.lr_scheduler.last_epoch == 4  # the schedule advanced once per optimizer step


@pytest.mark.parametrize("overrides,message", [
    (dict(max_grad_norm=1.0), "max_grad_norm=1.0 clips by the global gradient norm"),
    (dict(gradient_accumulation_steps=2), "accumulation_steps > 1 is not supported for AdamW"),
    (dict(gradient_accumulation_steps=3, optim="sgd", optim_args="momentum=0.9"), "whole number of optimizer steps"),
])
def test_hf_trainer_refuses_what_release_cannot_do(tmp_path, overrides, message):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from optim_plugins.integrations.release import HFGradientReleaseCallback

    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
                   save_strategy="no", max_grad_norm=0.0, disable_tqdm=True)
    options.update(overrides)
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=token_data(),
                      callbacks=[HFGradientReleaseCallback()])
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any step


# ----------------------------------------------------------------------------- Lightning


def lightning_fit(release: bool, steps: int = 4, **trainer_options):
    pl = pytest.importorskip("lightning.pytorch")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from lightning_module import TinyData, TinyRegressor

    from optim_plugins.integrations.release import LightningGradientReleaseCallback

    torch.manual_seed(0)
    model = TinyRegressor(optimizer="adamw", lr=0.05, weight_decay=0.1, scheduler="warmup_cosine", num_warmup_steps=2)
    options = dict(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                   callbacks=[LightningGradientReleaseCallback()] if release else None)
    options.update(trainer_options)
    trainer = pl.Trainer(**options)
    trainer.fit(model, TinyData(n=64, batch_size=8))
    return model, trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_fit_with_release_equals_ordinary_steps(precision):
    ordinary, _ = lightning_fit(release=False, precision=precision)
    released, trainer = lightning_fit(release=True, precision=precision)
    assert trainer.global_step == 4
    optimizer = trainer.optimizers[0]
    assert not is_released(optimizer) and optimizer.state[released.net[0].weight]["step"].item() == 4
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4
    for a, b in zip(ordinary.parameters(), released.parameters()):
        assert torch.equal(a, b)


def test_lightning_value_clipping_runs_in_the_release_hook():
    """gradient_clip_algorithm="value" is done by the hook: same parameters as Lightning's own value clipping."""
    options = dict(gradient_clip_val=0.05, gradient_clip_algorithm="value")
    ordinary, _ = lightning_fit(release=False, **options)
    released, _ = lightning_fit(release=True, **options)
    unclipped, _ = lightning_fit(release=False)
    assert not torch.equal(ordinary.net[0].weight, unclipped.net[0].weight)  # the clipping did something
    for a, b in zip(ordinary.parameters(), released.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options,message", [
    (dict(gradient_clip_val=1.0), r"gradient_clip_val\)=1.0 clips by the global gradient norm"),
    (dict(accumulate_grad_batches=2), "accumulation_steps > 1 is not supported for AdamW"),
])
def test_lightning_refuses_what_release_cannot_do(options, message):
    with pytest.raises(ValueError, match=message):
        lightning_fit(release=True, **options)
