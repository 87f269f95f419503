"""Every optimizer in the database learns a real task: scikit-learn's handwritten digits."""
from __future__ import annotations

import pytest
import torch

import optim_plugins as op
from optim_db import OPTIMIZER_DB

EPOCHS = 15
BATCH = 64


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)  # 1797 8x8 images shipped inside scikit-learn
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    as_tensors = lambda a, dtype: torch.tensor(a, dtype=dtype)
    return (as_tensors(x_train, torch.float32), as_tensors(y_train, torch.long),
            as_tensors(x_test, torch.float32), as_tensors(y_test, torch.long))


@pytest.mark.parametrize("name", sorted(OPTIMIZER_DB))
def test_reaches_stated_accuracy_on_digits(name, digits):
    info = OPTIMIZER_DB[name]
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    opt = op.create_optimizer(name, model, **info.recommended)
    generator = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), BATCH):
            batch = order[start:start + BATCH]

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                loss.backward(create_graph=opt.capabilities.needs_create_graph if hasattr(opt, "capabilities") else False)
                return loss

            opt.step(closure)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= info.accuracy, f"{name} reached {accuracy:.3f} < {info.accuracy}"
