"""Thin adapters between the registry and the trainers people already use.

Each adapter lives in its own module and imports its trainer library only there, so
``import optim_plugins.integrations`` stays as light as ``import optim_plugins``:

- :mod:`optim_plugins.integrations.hf`: the Hugging Face ``Trainer`` (``install()``,
  ``OptimPluginsTrainer``, ``OptimPluginsArguments``, ``make_parser``).
- :mod:`optim_plugins.integrations.release`: gradient release under the HF Trainer and Lightning.
"""
