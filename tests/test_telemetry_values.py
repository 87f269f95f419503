"""op.telemetry numbers for elementwise, factored and 8-bit optimizers in every backend, against a
plain re-computation from the parameters before and after each step."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import optim_plugins as op
from optim_plugins.kernels import compiled
from optim_plugins.telemetry import telemetry


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    # 64 x 64 = 4096 elements: 8-bit states (min_8bit_size 4096) and factored second moments for the
    # 2-D weights; the biases keep full fp32 states (unfactored, not quantised)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(seed)
    return model, torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g)


def expected_lr(name: str, group, old: torch.Tensor, step: int) -> float:
    if name == "adafactor":  # relative step (paper / transformers): min(1e-2, 1/sqrt(t)) * max(eps2, RMS(p))
        rms = float(torch.linalg.vector_norm(old.double())) / math.sqrt(old.numel())
        return min(1e-2, 1 / math.sqrt(step)) * max(1e-3, rms)
    return group["lr"]


CASES = {
    "adamw": {"lr": 1e-2},
    "lion": {"lr": 1e-3},
    "adafactor": {},
    "came": {"lr": 1e-3},
    "adam8bit": {"lr": 1e-2},
    "adamw4bit": {"lr": 1e-2},  # the 2-D weight's second moment rank-1 4-bit: decoded around the compiled loop
}
# which parameters have a raw fp32 second moment shaped like them: 8/4-bit states from 4096 elements
# (min_8bit_size, min_4bit_size), factored row/column moments for 2-D tensors, none for Lion
SECOND_MOMENT = {"adamw": lambda p: True, "lion": lambda p: False, "adam8bit": lambda p: p.numel() < 4096,
                 "adamw4bit": lambda p: p.numel() < 4096,
                 "adafactor": lambda p: p.dim() < 2, "came": lambda p: p.dim() < 2}


# auto adamw: the C++ Adam kernel's sums; compiled adamw, lion and adam8bit: the sums of the compiled C++ loop
@pytest.mark.parametrize("backend", ["reference", "foreach", "auto", "compiled"])
@pytest.mark.parametrize("name", list(CASES))
def test_numbers_equal_recomputation(name, backend):
    model, x, y = model_and_data()
    optimizer = op.create_optimizer(name, model, backend=backend, **CASES[name])
    names = {id(p): n for n, p in model.named_parameters()}
    recorder = telemetry(optimizer, by="param", model=model)
    for step in range(1, 4):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        old = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        record = recorder.history[-1]
        assert record["step"] == step and set(record["units"]) == set(old)
        for group in optimizer.param_groups:
            for p in group["params"]:
                n = names[id(p)]
                got = record["units"][n]
                g = float(torch.linalg.vector_norm(grads[n].double()))
                u = float(torch.linalg.vector_norm(p.detach().double() - old[n].double()))
                w = float(torch.linalg.vector_norm(old[n].double()))
                assert got["grad_norm"] == pytest.approx(g, rel=1e-5)
                assert got["update_norm"] == pytest.approx(u, rel=1e-4, abs=1e-10)
                assert got["weight_norm"] == pytest.approx(w, rel=1e-5)
                assert got["update_ratio"] == pytest.approx(u / w, rel=1e-4, abs=1e-10) if w > 0 else math.isnan(got["update_ratio"])
                assert got["lr"] == pytest.approx(expected_lr(name, group, old[n], step), rel=1e-5)
                state = optimizer.state[p]
                if SECOND_MOMENT[name](p):  # RMS of sqrt(v): sqrt(mean(v)) of the raw fp32 state
                    v = state["exp_avg_sq"]
                    assert v.dtype == torch.float32 and v.shape == p.shape
                    assert got["second_moment"] == pytest.approx(math.sqrt(float(v.double().mean())), rel=1e-5)
                else:
                    assert "second_moment" not in got
        if name in ("adam8bit", "adamw4bit"):  # the 4096-element weight's states are 8/4-bit codes (left out above)
            assert optimizer.state[model[2].weight]["exp_avg_sq"].dtype == torch.uint8
        if name in ("adafactor", "came"):
            assert "exp_avg_sq_row" in optimizer.state[model[2].weight]
    assert record["state_bytes"] == op.state_bytes(optimizer)
    if backend == "compiled" and name in ("adamw", "lion", "adam8bit", "adamw4bit") and compiled.unavailable_reason() is None:
        assert recorder._copies == {}  # summed inside the loop's pass: no parameter copy was taken
    recorder.remove()


@pytest.mark.parametrize("backend", ["reference", "foreach", "auto", "compiled"])
def test_gradient_norm_is_the_unscaled_one_under_grad_scaler(backend):
    """Under GradScaler (which hands the compiled backend its loss scale to unscale inside the step)
    the recorded gradient norm is that of the unscaled gradient and the update the step's own."""
    model, x, y = model_and_data()
    optimizer = op.create_optimizer("adamw", model, backend=backend, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    recorder = telemetry(optimizer, by="param", model=model)
    for _ in range(2):
        optimizer.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        grads = {n: p.grad.detach().double() / 1024.0 for n, p in model.named_parameters()}
        old = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        scaler.step(optimizer)
        scaler.update()
        units = recorder.history[-1]["units"]
        for n, p in model.named_parameters():
            assert units[n]["grad_norm"] == pytest.approx(float(grads[n].norm()), rel=1e-5)
            assert units[n]["update_norm"] == pytest.approx(float((p.detach().double() - old[n]).norm()), rel=1e-4)
    recorder.remove()


def test_compiled_buckets_the_loop_cannot_sum_are_measured_around_the_step(monkeypatch):
    """One group, two buckets (fp32, fp64) on the compiled backend: the fp32 one summed inside the C++
    loop, the fp64 one (its loop made unavailable here) by the copy path; every number still equals
    the re-computation, and only the fp64 parameters were copied."""
    if compiled.unavailable_reason() is not None or not compiled.loops_cover({torch.float32}):
        pytest.skip("no C++ loop here")
    original = compiled.run_with_sums
    monkeypatch.setattr(compiled, "run_with_sums",
                        lambda update, p, *rest, **kwargs: None if p[0].dtype == torch.float64
                        else original(update, p, *rest, **kwargs))
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(n, generator=g, dtype=dtype)) for n, dtype in
              ((300, torch.float32), (40, torch.float64), (7, torch.float32), (9, torch.float64))]
    optimizer = op.create_optimizer("lion", params, lr=1e-2, backend="compiled")
    recorder = telemetry(optimizer, by="param")
    for step in range(2):
        old = [p.detach().double().clone() for p in params]
        for i, p in enumerate(params):
            p.grad = torch.sin(p.detach() * (step + 2) + i)
        grads = [p.grad.double() for p in params]
        optimizer.step()
        units = recorder.history[-1]["units"]
        for i, p in enumerate(params):
            got = units[f"param{i}"]
            assert got["grad_norm"] == pytest.approx(float(grads[i].norm()), rel=1e-5)
            assert got["update_norm"] == pytest.approx(float((p.detach().double() - old[i]).norm()), rel=1e-4)
            assert got["weight_norm"] == pytest.approx(float(old[i].norm()), rel=1e-5)
    assert set(recorder._copies) == {id(params[1]), id(params[3])}
    recorder.remove()


def test_state_bytes_follow_new_and_replaced_states():
    """The record's state_bytes (counted again only when state tensors change) after a group is added
    and after a state tensor is replaced by a copy."""
    model, x, y = model_and_data()
    optimizer = op.create_optimizer("adamw", model[0].parameters(), lr=1e-2)
    recorder = telemetry(optimizer)
    counted = []
    for step in range(3):
        if step == 1:
            optimizer.add_param_group({"params": list(model[2].parameters())})
        if step == 2:
            state = optimizer.state[model[0].weight]
            state["exp_avg"] = state["exp_avg"].clone()  # another storage of the same size
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        counted.append(recorder.history[-1]["state_bytes"])
        assert counted[-1] == op.state_bytes(optimizer)
    assert counted[0] < counted[1] == counted[2]
    recorder.remove()


@pytest.mark.parametrize("name,options", [("adamw", {}), ("adamw8bit", {"min_8bit_size": 0})])
@pytest.mark.parametrize("backend", ["foreach", "compiled"])
def test_kahan_compensated_bf16_parameters_measure_the_working_value(backend, name, options, monkeypatch):
    """bf16 parameters with Kahan compensation (and 8-bit states): the update and weight norms are those of
    p + compensation (the value the optimizer steps), before and after, in the foreach backend (measured
    around the step) and in the compiled backend, whose C++ loop reads and writes the compensation (and
    codes the states) and sums in that pass."""
    summed = []
    original = compiled.run_with_sums
    monkeypatch.setattr(compiled, "run_with_sums",
                        lambda *args, **kwargs: summed.append(original(*args, **kwargs)) or summed[-1])
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(n, generator=g).bfloat16()) for n in (300, 7)]
    optimizer = op.create_optimizer(name, params, lr=1e-2, backend=backend, **options)
    recorder = telemetry(optimizer, by="param")
    for step in range(3):
        value = lambda p: p.detach().double() + optimizer.state[p]["compensation"].double() if optimizer.state[p] \
            else p.detach().double()
        old = [value(p) for p in params]
        for i, p in enumerate(params):
            p.grad = torch.sin(p.detach().float() * (step + 2) + i).bfloat16()
        optimizer.step()
        units = recorder.history[-1]["units"]
        for i, p in enumerate(params):
            got = units[f"param{i}"]
            assert got["grad_norm"] == pytest.approx(float(p.grad.double().norm()), rel=1e-5)
            assert got["update_norm"] == pytest.approx(float((value(p) - old[i]).norm()), rel=1e-3)
            assert got["weight_norm"] == pytest.approx(float(old[i].norm()), rel=1e-5)
    in_loop = backend == "compiled" and compiled.loops_cover({torch.bfloat16})
    assert (len(summed) == 3 and all(rows is not None for rows in summed)) if in_loop else not summed
    recorder.remove()


def test_auto_8bit_group_is_summed_in_both_kernels_it_runs():
    """adam8bit under backend="auto" on CPU past LOOP_THRESHOLD: its 8-bit tensors step on the compiled C++
    loop and its small fp32-state tensors on torch's fused Adam kernel; a recording step sums each bucket
    in the kernel that steps it (the C++ Adam kernel for the small ones), copies no parameter, and gives the
    bits of an unrecorded step."""
    from optim_plugins.optimizers.base import LOOP_THRESHOLD

    if compiled.unavailable_reason() is not None or not compiled.loops_cover({torch.float32}):
        pytest.skip("no C++ loop here")
    results = []
    for record in (False, True):
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(n, generator=g) * 0.1) for n in (LOOP_THRESHOLD, 64, 4096)]
        optimizer = op.create_optimizer("adam8bit", params, lr=1e-2)
        recorder = telemetry(optimizer, by="param") if record else None
        for step in range(2):
            old = [p.detach().double().clone() for p in params]
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (step + 2) + i)
            optimizer.step()
            if recorder is not None:
                units = recorder.history[-1]["units"]
                for i, p in enumerate(params):
                    got = units[f"param{i}"]
                    assert got["grad_norm"] == pytest.approx(float(p.grad.double().norm()), rel=1e-5)
                    assert got["update_norm"] == pytest.approx(float((p.detach().double() - old[i]).norm()), rel=1e-4)
                    assert got["weight_norm"] == pytest.approx(float(old[i].norm()), rel=1e-5)
                assert "second_moment" in units["param1"] and "second_moment" not in units["param0"]
        assert optimizer.state[params[0]]["exp_avg"].dtype == torch.uint8  # coded
        assert optimizer.state[params[1]]["exp_avg"].dtype == torch.float32  # below min_8bit_size
        if recorder is not None:
            assert recorder._copies == {}
            recorder.remove()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
