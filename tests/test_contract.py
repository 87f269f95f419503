"""torch.optim's contract (../shared/checks/contract.py) for every registered optimizer."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import optim_plugins as op

CONTRACT = Path(__file__).resolve().parents[2] / "shared" / "checks" / "contract.py"


@pytest.fixture(scope="module")
def contract():
    if not CONTRACT.exists():
        pytest.skip(f"{CONTRACT} is not beside this checkout")
    spec = importlib.util.spec_from_file_location("shared_contract", CONTRACT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name", op.list_optimizers())
def test_keeps_torch_optim_contract(name, contract):
    assert contract._contract_checks(op, name) == []
