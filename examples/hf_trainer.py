"""Train a tiny LLaMA-style causal LM with the Hugging Face Trainer and an optim_plugins optimizer.

    python examples/hf_trainer.py --output_dir out --optim adabelief \\
        --optim_args "beta2=0.99,rectify=true" --lr_scheduler_type warmup_cosine --warmup_steps 2 \\
        --learning_rate 3e-3 --max_steps 20 --layer_decay 0.8

Every Trainer option works (``--help`` lists them, ``--optim`` and ``--lr_scheduler_type``
with our names). Bare names transformers owns (``adafactor``, ``cosine``...) keep transformers'
meaning; ``op_adafactor`` / ``op_cosine`` are ours (``OPTIM_PLUGINS_HF_INSTALL=override``
makes the bare ones ours too). The model is built from a config and the data is made here:
nothing is downloaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from optim_plugins.integrations import hf


@dataclass
class ScriptArguments:
    num_samples: int = field(default=64, metadata={"help": "synthetic training sequences"})
    seq_len: int = field(default=16, metadata={"help": "tokens per sequence"})


class PatternData(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start: easy to learn."""

    def __init__(self, n: int, seq_len: int, vocab: int = 100, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> dict:
    from transformers import TrainingArguments

    override = os.environ.get(hf.INSTALL_ENV, "").lower() == "override"
    parser = hf.make_parser(TrainingArguments, hf.OptimPluginsArguments, ScriptArguments, override=override)
    args, op_args, script = parser.parse_args_into_dataclasses(args=argv)
    torch.manual_seed(args.seed)
    trainer = hf.OptimPluginsTrainer(
        model=tiny_llama(), args=args, optim_plugins_args=op_args,
        train_dataset=PatternData(script.num_samples, script.seq_len, seed=args.seed),
    )
    result = trainer.train()
    optimizer = hf._unwrap(trainer.optimizer)
    summary = {
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "scheduler": f"{type(trainer.lr_scheduler).__module__}.{type(trainer.lr_scheduler).__qualname__}",
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": next((e["loss"] for e in trainer.state.log_history if "loss" in e), None),
        "last_logged_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
        "last_lr": trainer.lr_scheduler.get_last_lr()[0],
    }
    print("optim_plugins summary:", summary)
    return summary


if __name__ == "__main__":
    main()
