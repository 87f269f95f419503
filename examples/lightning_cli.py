"""LightningCLI with optim_plugins: the YAML's ``lr_scheduler`` steps per optimizer step.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml

``optim_plugins.integrations.lightning.LightningCLI`` is Lightning's CLI, except that the schedule
is built when the trainer knows its length (``num_training_steps`` may be left out of the YAML) and
is returned with ``interval="step"``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning_module import TinyData, TinyRegressor  # noqa: E402

from optim_plugins.integrations.lightning import LightningCLI  # noqa: E402


def main(args=None, run=True):
    return LightningCLI(TinyRegressor, TinyData, args=args, run=run)


if __name__ == "__main__":
    main()
