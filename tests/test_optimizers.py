"""One suite over every registered optimizer (the entries of ``optim_db.OPTIMIZER_DB``)."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import optim_plugins as op
from optim_plugins.kernels import compiled as compiled_kernels
from optim_db import OPTIMIZER_DB

NAMES = sorted(OPTIMIZER_DB)
SHAPES = [(5, 3), (3,), (2, 2, 2)]


def make_params(seed: int = 0, dtype=torch.float32, shapes=SHAPES) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]


def objective(params) -> torch.Tensor:
    """A non-quadratic objective with a different curvature per tensor."""
    return sum(((p.float() - 0.3) ** 2 * (i + 1)).sum() + torch.sin(3 * p.float()).sum() for i, p in enumerate(params))


def backward(loss: torch.Tensor, optimizer) -> None:
    """``loss.backward()``, keeping the graph for optimizers that differentiate the gradient (Sophia-H)."""
    capabilities = getattr(optimizer, "capabilities", None)
    loss.backward(create_graph=bool(capabilities and capabilities.needs_create_graph))


def run(optimizer, params, steps: int, objective=objective) -> None:
    """``steps`` optimizer steps, each with a closure (as Lightning steps; SAM-style optimizers need it).

    The global generator is seeded first, so optimizers that draw random numbers (Hutchinson
    probes, stochastic rounding) repeat exactly across the runs a test compares.
    """
    torch.manual_seed(0)
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = objective(params)
            backward(loss, optimizer)
            return loss
        optimizer.step(closure)


def first_options(name: str) -> dict:
    return dict(OPTIMIZER_DB[name].option_sets[0])


def snapshot(optimizer, params):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def assert_unchanged(before, optimizer, params):
    old_params, old_state = before
    for a, b in zip(old_params, params):
        assert torch.equal(a, b.detach())
    new_state = optimizer.state_dict()
    assert new_state["param_groups"] == old_state["param_groups"]
    assert new_state["state"].keys() == old_state["state"].keys()
    for index, entries in old_state["state"].items():
        for key, value in entries.items():
            other = new_state["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


@pytest.fixture(autouse=True)
def _not_applicable(request):
    """Skip a generic test that an entry declares not applicable, with the entry's reason."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("name") if callspec else None
    if name is not None:
        reason = OPTIMIZER_DB[name].not_applicable.get(request.node.originalname)
        if reason:
            pytest.skip(f"{name}: {reason}")


def test_every_optimizer_has_an_entry():
    assert sorted(op.list_optimizers()) == NAMES, "add an OptimInfo for every registered optimizer"
    tests = {key for key in globals() if key.startswith("test_")}
    for info in OPTIMIZER_DB.values():
        assert set(info.not_applicable) <= tests, f"{info.name}: not_applicable names unknown tests"
        assert all(info.not_applicable.values()), f"{info.name}: every not_applicable entry needs a reason"


# ----------------------------------------------------------------------------- exactness

def backends(name: str) -> tuple[str, ...]:
    """Both backends for elementwise optimizers; whole-tensor ones always step tensor by tensor."""
    return ("reference", "foreach") if op.get_optimizer_spec(name).capabilities.elementwise else ("reference",)


REFERENCE_CASES = [
    pytest.param(name, i, backend, id=f"{name}-{i}-{backend}")
    for name in NAMES
    if OPTIMIZER_DB[name].reference is not None
    for i in range(len(OPTIMIZER_DB[name].option_sets))
    for backend in backends(name)
]


@pytest.mark.parametrize("name,index,backend", REFERENCE_CASES)
def test_matches_reference_for_200_steps(name, index, backend):
    info = OPTIMIZER_DB[name]
    options = info.option_sets[index]
    loss = (lambda ps: -objective(ps)) if options.get("maximize") else objective  # bounded either way
    ours, theirs = make_params(), make_params()
    run(op.create_optimizer(name, ours, backend=backend, **options), ours, info.reference_steps, loss)
    run(info.reference(theirs, dict(options)), theirs, info.reference_steps, loss)
    for a, b in zip(ours, theirs):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=info.rtol, atol=info.rtol * float(b.detach().abs().max()))


@pytest.mark.parametrize("name", NAMES)
def test_backends_agree(name):
    """reference == foreach (and == compiled, the C++ loop of kernels/cpp/loops.py, for elementwise
    optimizers where a C++ compiler is found) to fp32 rounding over 30 steps."""
    backends = ["reference", "foreach"]
    if op.get_optimizer_spec(name).capabilities.elementwise and compiled_kernels.unavailable_reason() is None:
        backends.append("compiled")
    results = {}
    for backend in backends:
        params = make_params()
        run(op.create_optimizer(name, params, backend=backend, **first_options(name)), params, 30)
        results[backend] = params
    for backend in backends[1:]:
        for a, b in zip(results["reference"], results[backend]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_seed_worked_example_adam_on_x_squared():
    """The deep-dive seed: Adam on f(x) = x^2 from 3.0, lr 1e-3 -> 2.999, 2.998, 2.997."""
    x = torch.nn.Parameter(torch.tensor([3.0]))
    opt = op.create_optimizer("adam", [x], lr=1e-3)
    seen = []
    for _ in range(3):
        opt.zero_grad()
        (x**2).sum().backward()
        opt.step()
        seen.append(x.item())
    assert seen == pytest.approx([2.999, 2.998, 2.997], abs=1e-6)
    state = opt.state[x]
    # m_1..m_3 and v_3 from the seed's hand computation
    assert state["exp_avg"].item() == pytest.approx(1.62542, rel=1e-4)
    assert state["exp_avg_sq"].item() == pytest.approx(0.107820, rel=1e-4)


@pytest.mark.parametrize("name", [n for n in NAMES if OPTIMIZER_DB[n].reference is not None])
def test_mixed_dtypes_in_one_group_match_reference(name):
    """fp32 and fp64 tensors in one group: bucketed per dtype, each exact to the reference."""
    info = OPTIMIZER_DB[name]
    options = info.option_sets[0]

    def params():
        return [p.to(torch.float64) if i == 1 else p for i, p in enumerate(make_params())]

    ours, theirs = [torch.nn.Parameter(p.detach()) for p in params()], [torch.nn.Parameter(p.detach()) for p in params()]
    # foreach: the multi-tensor path buckets by dtype (backend="auto" may hand a bucket to torch's fused
    # kernel instead, whose numbers are fused=True's: tests/test_backends.py)
    run(op.create_optimizer(name, ours, **options, backend="foreach"), ours, 20)
    run(info.reference(theirs, dict(options)), theirs, 20)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in NAMES if OPTIMIZER_DB[n].reference is not None and OPTIMIZER_DB[n].supports_complex])
def test_complex_parameters_match_reference(name):
    info = OPTIMIZER_DB[name]
    options = info.option_sets[0]

    def params():
        g = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=g))]

    def complex_objective(ps):
        return sum((p.abs() ** 2).sum() + (p.real * 0.5).sum() for p in ps)

    ours, theirs = params(), params()
    run(op.create_optimizer(name, ours, **options), ours, 20, complex_objective)
    run(info.reference(theirs, dict(options)), theirs, 20, complex_objective)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [n for n in NAMES if OPTIMIZER_DB[n].reference is not None])
def test_low_precision_without_compensation_matches_torch(name, dtype, backend):
    """compensation=None is torch's behaviour: state and math in the parameter's dtype.

    The reference backend is bitwise torch's single-tensor path. torch's foreach kernels
    round bf16/fp16 differently from its single-tensor ones, and its multi-tensor
    functions order some operations differently, so our foreach backend is held to
    dtype-level tolerance against torch's foreach path.
    """
    info = OPTIMIZER_DB[name]
    options = info.option_sets[0]
    ours, theirs = make_params(dtype=dtype), make_params(dtype=dtype)
    run(op.create_optimizer(name, ours, compensation=None, backend=backend, **options), ours, 20)
    run(info.reference(theirs, dict(options, foreach=backend == "foreach")), theirs, 20)
    for a, b in zip(ours, theirs):
        assert a.dtype == dtype
        if backend == "reference":
            assert torch.equal(a, b)
        else:
            scale = float(b.detach().abs().max())
            torch.testing.assert_close(a, b, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps * scale)


@pytest.mark.parametrize("name", NAMES)
def test_low_precision_default_keeps_dtype_and_learns(name):
    params = make_params(dtype=torch.bfloat16)
    opt = op.create_optimizer(name, params, **first_options(name))
    start = objective(params).item()
    run(opt, params, 20)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all() for p in params)
    if OPTIMIZER_DB[name].low_precision_learns:
        assert objective(params).item() < start
    assert all(opt.state[p]["compensation"].dtype == torch.bfloat16 for p in params)  # "auto" = Kahan for bf16


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_state_dict_round_trip_is_bitwise(name, backend):
    """10 steps, save (torch.save, weights_only load), load into a fresh optimizer, 10 more == 20 straight."""
    options = dict(first_options(name), backend=backend)
    straight = make_params()
    opt = op.create_optimizer(name, straight, **options)
    run(opt, straight, 10)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in straight]
    run(opt, straight, 10)

    buffer.seek(0)
    fresh = op.create_optimizer(name, resumed, **options)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    run(fresh, resumed, 10)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_loaded_state_is_not_shared_with_the_state_dict(name):
    params = make_params()
    opt = op.create_optimizer(name, params, **first_options(name))
    run(opt, params, 3)
    saved = opt.state_dict()
    twin = op.create_optimizer(name, [torch.nn.Parameter(p.detach().clone()) for p in params], **first_options(name))
    twin.load_state_dict(saved)
    for state in twin.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim():
                assert all(value.data_ptr() != other.data_ptr() for s in opt.state.values() for other in s.values() if torch.is_tensor(other))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_with_wrong_shapes_is_rejected_and_changes_nothing(name):
    params = make_params()
    opt = op.create_optimizer(name, params, **first_options(name))
    run(opt, params, 3)
    bad = copy.deepcopy(opt.state_dict())
    shaped = [k for k, v in bad["state"][0].items() if torch.is_tensor(v) and v.dim() > 0]
    if not shaped:
        pytest.skip(f"{name} with these options keeps no parameter-shaped state")  # e.g. plain SGD
    bad["state"][0][shaped[0]] = torch.zeros(7, 7)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=shaped[0]):
        opt.load_state_dict(bad)
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_with_wrong_group_sizes_or_options_is_rejected(name):
    params = make_params()
    opt = op.create_optimizer(name, params, **first_options(name))
    run(opt, params, 2)
    before = snapshot(opt, params)
    fewer = copy.deepcopy(opt.state_dict())
    fewer["param_groups"][0]["params"] = fewer["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(fewer)
    bad_lr = copy.deepcopy(opt.state_dict())
    bad_lr["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad_lr)
    missing = copy.deepcopy(opt.state_dict())
    del missing["state"][0]["step"]
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(missing)
    assert_unchanged(before, opt, params)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", NAMES)
def test_none_gradients_are_skipped(name):
    params = make_params()
    opt = op.create_optimizer(name, params, **first_options(name))
    frozen = params[1].detach().clone()
    for _ in range(3):
        opt.zero_grad()
        backward(objective([params[0], params[2]]), opt)
        assert params[1].grad is None
        opt.step()
    assert torch.equal(params[1].detach(), frozen)
    assert len(opt.state[params[1]]) == 0
    assert not torch.equal(params[0].detach(), make_params()[0])


@pytest.mark.parametrize("name", NAMES)
def test_no_gradients_at_all_is_a_no_op(name):
    params = make_params()
    opt = op.create_optimizer(name, params, **first_options(name))
    before = snapshot(opt, params)
    opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("name", NAMES)
def test_empty_param_group_is_accepted(name):
    params = make_params()
    opt = op.create_optimizer(name, [{"params": []}, {"params": params}], **first_options(name))
    run(opt, params, 3)
    assert opt.param_groups[0]["params"] == []
    opt.add_param_group({"params": []})
    run(opt, params, 1)


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients(name):
    info = OPTIMIZER_DB[name]
    options = first_options(name)
    if "weight_decay" in op.get_optimizer_spec(name).options:
        options["weight_decay"] = 0.0
    params = make_params()
    start = [p.detach().clone() for p in params]
    opt = op.create_optimizer(name, params, **options)
    for _ in range(5):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, s in zip(params, start):
        assert torch.isfinite(p).all()
        if info.zero_grads_keep_params:
            assert torch.equal(p.detach(), s)


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradients_propagate_by_default_like_torch(name):
    params = make_params()
    opt = op.create_optimizer(name, params, **first_options(name))
    run(opt, params, 2)
    opt.zero_grad()
    backward(objective(params), opt)
    params[0].grad.data[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(params[0]).any()
    assert torch.isfinite(params[1]).all()  # other tensors are untouched by the NaN


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_skip_or_raise(name, bad):
    for policy in ("skip", "raise"):
        params = make_params()
        opt = op.create_optimizer(name, params, nonfinite=policy, **first_options(name))
        run(opt, params, 2)
        opt.zero_grad()
        backward(objective(params), opt)
        params[2].grad.data.view(-1)[3] = bad
        before = snapshot(opt, params)
        if policy == "raise":
            with pytest.raises(FloatingPointError, match="parameter 2"):
                opt.step()
        else:
            opt.step()
            assert opt.skipped_steps == 1
        assert_unchanged(before, opt, params)
        run(opt, params, 1)  # a finite step afterwards works
        assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_are_rejected_before_any_change(name):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Parameter(torch.randn(3))
    opt = op.create_optimizer(name, [dense, embedding.weight], **first_options(name))
    backward(embedding(torch.tensor([1, 4])).sum() + dense.sum(), opt)
    before = snapshot(opt, [dense, embedding.weight])
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(before, opt, [dense, embedding.weight])


@pytest.mark.parametrize("name", NAMES)
def test_closure_returns_the_loss_and_runs_with_grad_enabled(name):
    params = make_params()
    opt = op.create_optimizer(name, params, **first_options(name))

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = objective(params)
        backward(loss, opt)
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() == pytest.approx(objective(make_params()).item())


@pytest.mark.parametrize("name", [n for n in NAMES if OPTIMIZER_DB[n].reference is not None])
def test_add_param_group_mid_training_matches_reference(name):
    info = OPTIMIZER_DB[name]
    options = info.option_sets[0]
    results = []
    for make in (lambda ps: op.create_optimizer(name, ps, **options, backend="foreach"),
                 lambda ps: info.reference(ps, dict(options))):
        params = make_params()
        opt = make(params[:2])
        run(opt, params[:2], 5)
        opt.add_param_group({"params": [params[2]], "lr": options.get("lr", 1e-3) * 0.5})
        run(opt, params, 5)
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_options_are_rejected_with_the_option_named(name):
    params = make_params()
    for options, fragment in OPTIMIZER_DB[name].invalid:
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            op.create_optimizer(name, params, **options)
    with pytest.raises(ValueError, match="nosuch_option"):
        op.create_optimizer(name, params, nosuch_option=1)
    with pytest.raises(ValueError, match="backend"):
        op.create_optimizer(name, params, backend="cuda-magic")


@pytest.mark.parametrize("name", NAMES)
def test_bad_add_param_group_changes_nothing(name):
    params = make_params()
    opt = op.create_optimizer(name, params[:2], **first_options(name))
    run(opt, params[:2], 2)
    before = snapshot(opt, params[:2])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [params[2]], "lr": -1.0})
    assert len(opt.param_groups) == 1
    assert_unchanged(before, opt, params[:2])


@pytest.mark.parametrize("name", NAMES)
def test_foreach_flag_maps_onto_backend(name):
    params = make_params()
    assert op.create_optimizer(name, params, foreach=False, **first_options(name))._backend(
        op.create_optimizer(name, params, foreach=False, **first_options(name)).param_groups[0]) == "reference"
    with pytest.raises(ValueError, match="foreach"):
        op.create_optimizer(name, params, foreach=True, backend="reference", **first_options(name))
    for flag in ("capturable", "differentiable", "fused"):
        with pytest.raises(ValueError, match=flag):
            op.create_optimizer(name, params, **{flag: True}, **first_options(name))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_loads_a_torch_optim_checkpoint(name):
    """A checkpoint of torch.optim.Adam/AdamW resumes in ours with identical numbers."""
    torch_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    ours, theirs = make_params(), make_params()
    reference = torch_cls(theirs, lr=0.01, foreach=False)
    run(reference, theirs, 5)
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    opt = op.create_optimizer(name, ours, lr=0.01)
    opt.load_state_dict(copy.deepcopy(reference.state_dict()))
    run(reference, theirs, 5)
    run(opt, ours, 5)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
