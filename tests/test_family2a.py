"""Behaviour of family II part A beyond the generic suite: Sophia's Hessian estimates,
Prodigy's shared d, schedule-free train/eval, ADOPT's first step, AdEMAMix's schedules, FAM's mask."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import optim_plugins as op
from optim_db import OPTIMIZER_DB  # first: optim_db imports every optim_db_*.py itself
from optim_db_family2a import SeedFAM, prodigy_reference
from test_optimizers import make_params, objective, run


def run_graph(optimizer, params, steps, loss_fn=objective):
    """Like the generic ``run`` but the backward keeps its graph (Sophia-H needs it)."""
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = loss_fn(params)
            loss.backward(create_graph=True)
            return loss
        optimizer.step(closure)


def assert_params_close(ours, theirs, rtol=1e-6):
    for a, b in zip(ours, theirs):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.detach().abs().max()))


# ----------------------------------------------------------------------------- Sophia-G


def classification_problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, x, y


def test_sophiag_hessian_path_matches_sophia_opt():
    """update_hessian(logits_fn) every k steps == sophia-opt's loop (sampled-label backward, update_hessian())."""
    from sophia_opt import SophiaG

    ours_model, x, y = classification_problem()
    ref_model, _, _ = classification_problem()
    k, bs = 3, 32
    ours = op.create_optimizer("sophiag", list(ours_model.parameters()), lr=0.01, rho=0.05, bs=bs, hessian_interval=k)
    theirs = SophiaG(ref_model.parameters(), lr=0.01, rho=0.05)
    for step in range(30):
        if step % k == 0:
            assert ours.hessian_due()
            torch.manual_seed(step)
            grads = [p.grad for p in ours_model.parameters()]
            ours.update_hessian(lambda: ours_model(x))
            assert all(p.grad is g for p, g in zip(ours_model.parameters(), grads))  # .grad untouched
            torch.manual_seed(step)
            logits = ref_model(x)
            sampled = torch.distributions.Categorical(logits=logits).sample()
            theirs.zero_grad()
            F.cross_entropy(logits, sampled).backward()
            theirs.update_hessian()
        else:
            assert not ours.hessian_due()
        for model, opt, kwargs in ((ours_model, ours, {}), (ref_model, theirs, {"bs": bs})):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(**kwargs)
    assert_params_close(list(ours_model.parameters()), list(ref_model.parameters()))
    assert all(ours.state[p]["hessian"].abs().sum() > 0 for p in ours_model.parameters())


def test_sophiag_update_hessian_from_grad_and_clipped_step():
    """Without a logits_fn the current .grad is g_hat; the step never exceeds lr per coordinate."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = op.create_optimizer("sophiag", [p], lr=0.1, betas=(0.5, 0.5), rho=1.0, bs=1, weight_decay=0.0)
    p.grad = torch.tensor([2.0, 0.0, -1.0])
    opt.update_hessian()
    torch.testing.assert_close(opt.state[p]["hessian"], torch.tensor([2.0, 0.0, 0.5]))  # 0.5 * g^2
    before = p.detach().clone()
    p.grad = torch.tensor([4.0, 1e-3, -100.0])
    opt.step()
    m = torch.tensor([2.0, 5e-4, -50.0])
    expected = before - 0.1 * m.sign() * (m.abs() / (torch.tensor([2.0, 0.0, 0.5]) + 1e-15)).clamp(max=1)
    torch.testing.assert_close(p.detach(), expected)
    assert (p.detach() - before).abs().max() <= 0.1 + 1e-7


# ----------------------------------------------------------------------------- Sophia-H


def sophiah_paper(params, steps, lr, betas=(0.965, 0.99), rho=0.01, weight_decay=0.0, eps=1e-12, update_period=10,
                  distribution="gaussian"):
    """Algorithm 3 of the paper with the Hutchinson estimator, written out over a list of tensors.

    The EMAs are written in place (mul_/add_, lerp_) so that they round as ours do: with
    clipped steps on this non-convex objective a 1-ulp difference grows to 2e-6 by step 100
    and 2e-3 by step 200 (measured with the out-of-place form).
    """
    beta1, beta2 = betas
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        for p in params:
            p.grad = None
        loss = objective(params)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        with torch.no_grad():
            if (t - 1) % update_period == 0:
                us = [torch.randn_like(p) if distribution == "gaussian" else torch.randint_like(p, 0, 2) * 2.0 - 1.0
                      for p in params]
                hus = torch.autograd.grad(grads, params, grad_outputs=us)
                for i in range(len(params)):
                    h[i].lerp_(hus[i] * us[i], 1 - beta2)  # h = b2 h + (1 - b2) u * Hu
            for i, p in enumerate(params):
                p.mul_(1 - lr * weight_decay)
                m[i].mul_(beta1).add_(grads[i], alpha=1 - beta1)  # m = b1 m + (1 - b1) g
                p.sub_(lr * torch.clamp(m[i] / torch.clamp(rho * h[i], min=eps), -1, 1))


SOPHIAH_OPTIONS = [dict(lr=0.01), dict(lr=0.01, weight_decay=0.1, rho=0.05, update_period=3, distribution="rademacher")]


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("index", range(len(SOPHIAH_OPTIONS)))
def test_sophiah_matches_paper_equations_for_200_steps(index, backend):
    options = SOPHIAH_OPTIONS[index]
    ours, theirs = make_params(), make_params()
    torch.manual_seed(0)
    run_graph(op.create_optimizer("sophiah", ours, backend=backend, **options), ours, 200)
    torch.manual_seed(0)
    sophiah_paper(theirs, 200, **options)
    assert_params_close(ours, theirs)


def test_sophiah_agrees_with_pytorch_optimizer():
    """pytorch_optimizer's SophiaH clips m / max(h, eps) to p: ours with lr, rho, eps, wd is
    theirs with lr / rho, p = rho, eps / rho, wd * rho. The rescaling rounds differently, hence 1e-5."""
    from pytorch_optimizer import SophiaH

    ours, theirs = make_params(), make_params()
    lr, rho, eps, wd = 0.01, 0.02, 1e-12, 0.1
    torch.manual_seed(0)
    run_graph(op.create_optimizer("sophiah", ours, lr=lr, rho=rho, eps=eps, weight_decay=wd, update_period=5), ours, 100)
    torch.manual_seed(0)
    reference = SophiaH(theirs, lr=lr / rho, betas=(0.965, 0.99), p=rho, eps=eps / rho, weight_decay=wd * rho,
                        update_period=5, foreach=False)
    run_graph(reference, theirs, 100)
    assert_params_close(ours, theirs, rtol=1e-5)


def test_sophiah_without_the_graph_raises_and_changes_nothing():
    params = make_params()
    opt = op.create_optimizer("sophiah", params, lr=0.01)
    objective(params).backward()  # no create_graph
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, make_params()))
    assert not opt.state
    run_graph(opt, params, 12)  # with the graph: steps 1 and 11 estimate h
    assert all(opt.state[p]["step"].item() == 12 for p in params)


def test_sophiah_state_dict_round_trip_and_none_gradients():
    options = dict(lr=0.01, update_period=3)
    straight = make_params()
    opt = op.create_optimizer("sophiah", straight, **options)
    torch.manual_seed(1)
    run_graph(opt, straight, 10)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in straight]
    torch.manual_seed(2)
    run_graph(opt, straight, 10)
    buffer.seek(0)
    fresh = op.create_optimizer("sophiah", resumed, **options)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.manual_seed(2)
    run_graph(fresh, resumed, 10)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    frozen = make_params()
    opt = op.create_optimizer("sophiah", frozen, **options)
    run_graph(opt, frozen, 4, lambda ps: objective([ps[0], ps[2]]))
    assert torch.equal(frozen[1], make_params()[1]) and not opt.state[frozen[1]]


def test_sophiah_learns_digits_with_create_graph():
    """test_convergence's check, with the create_graph backward Sophia-H needs (fewer epochs: it learns fast)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    x_train, x_test = torch.tensor(x_train, dtype=torch.float32), torch.tensor(x_test, dtype=torch.float32)
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    opt = op.create_optimizer("sophiah", model, **OPTIMIZER_DB["sophiah"].recommended)
    generator = torch.Generator().manual_seed(0)
    for _ in range(7):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
                loss.backward(create_graph=True)
                return loss
            opt.step(closure)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.95


# ----------------------------------------------------------------------------- Prodigy


def test_prodigy_d_grows_and_is_shared_by_groups_like_prodigyopt():
    options = dict(weight_decay=0.01)
    results = []
    for make in (lambda ps: op.create_optimizer("prodigy", ps, **options), lambda ps: prodigy_reference(ps, dict(options))):
        params = make_params()
        opt = make(params[:2])
        run(opt, params[:2], 5)
        opt.add_param_group({"params": [params[2]]})  # same lr: one d for all
        run(opt, params, 30)
        results.append((params, opt))
    (ours, opt), (theirs, ref) = results
    assert_params_close(ours, theirs)
    assert opt.param_groups[0]["d"] == opt.param_groups[1]["d"] == ref.param_groups[0]["d"] > 1e-6 * 100


def test_prodigy_bf16_matches_prodigyopt_bitwise():
    ours, theirs = make_params(dtype=torch.bfloat16), make_params(dtype=torch.bfloat16)
    run(op.create_optimizer("prodigy", ours, compensation=None), ours, 20)
    run(prodigy_reference(theirs, {}), theirs, 20)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_prodigy_refuses_groups_with_different_lr():
    params = make_params()
    opt = op.create_optimizer("prodigy", [{"params": params[:2]}, {"params": params[2:], "lr": 0.5}])
    objective(params).backward()
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert not opt.state


# ----------------------------------------------------------------------------- schedule-free


SCHEDULEFREE = [("schedulefree_adamw", "AdamWScheduleFree", "AdamWScheduleFreeReference", dict(lr=0.01, weight_decay=0.1)),
                ("schedulefree_sgd", "SGDScheduleFree", "SGDScheduleFreeReference", dict(lr=0.05, weight_decay=0.1))]


@pytest.mark.parametrize("name,package_cls,theory_cls,options", SCHEDULEFREE)
def test_schedulefree_eval_train_and_the_theory_form(name, package_cls, theory_cls, options):
    """eval() gives the average x as the package does; the z/x/y reference form agrees to 1e-5
    (it stores x and y and rounds each sequence separately)."""
    import schedulefree

    ours, theirs, theory = make_params(), make_params(), make_params()
    opt = op.create_optimizer(name, ours, warmup_steps=10, **options)
    ref = getattr(schedulefree, package_cls)(theirs, warmup_steps=10, foreach=False, **options)
    slow = getattr(schedulefree, theory_cls)(theory, warmup_steps=10, **options)
    for o in (ref, slow):
        o.train()
    for o, ps in ((opt, ours), (ref, theirs), (slow, theory)):
        run(o, ps, 50)
        o.eval()
    assert_params_close(ours, theirs)
    assert_params_close(ours, theory, rtol=1e-5)
    with pytest.raises(RuntimeError, match="train()"):
        opt.step()
    for o, ps in ((opt, ours), (ref, theirs)):
        o.train()
        run(o, ps, 20)
    assert_params_close(ours, theirs)
    assert op.get_optimizer_spec(name).capabilities.train_eval


def test_schedulefree_checkpoint_saved_in_eval_mode_resumes_bitwise():
    straight = make_params()
    opt = op.create_optimizer("schedulefree_adamw", straight, lr=0.01)
    run(opt, straight, 10)
    opt.eval()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in straight]  # the model saved at x
    buffer.seek(0)
    fresh = op.create_optimizer("schedulefree_adamw", resumed, lr=0.01)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.param_groups[0]["train_mode"] is False
    for o, ps in ((opt, straight), (fresh, resumed)):
        o.train()
        run(o, ps, 10)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


# ----------------------------------------------------------------------------- ADOPT, AdEMAMix


def test_adopt_first_step_only_initialises_the_second_moment():
    params = make_params()
    opt = op.create_optimizer("adopt", params, lr=0.1)
    objective(params).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, make_params()))
    assert all(torch.equal(opt.state[p]["exp_avg_sq"], p.grad * p.grad) for p in params)


def ademamix_paper(params, steps, lr, betas, alpha, eps, weight_decay, t_alpha, t_beta3):
    beta1, beta2, beta3_final = betas
    m1, m2, nu = ([torch.zeros_like(p) for p in params] for _ in range(3))
    for t in range(1, steps + 1):
        loss = objective(params)
        grads = torch.autograd.grad(loss, params)
        alpha_t = min(t * alpha / t_alpha, alpha)
        ln1, ln3 = math.log(beta1), math.log(beta3_final)
        beta3 = min(math.exp(ln1 * ln3 / ((1 - t / t_beta3) * ln3 + (t / t_beta3) * ln1)), beta3_final)
        with torch.no_grad():
            for i, p in enumerate(params):
                g = grads[i]
                m1[i] = beta1 * m1[i] + (1 - beta1) * g
                m2[i] = beta3 * m2[i] + (1 - beta3) * g
                nu[i] = beta2 * nu[i] + (1 - beta2) * g * g
                m1_hat, nu_hat = m1[i] / (1 - beta1**t), nu[i] / (1 - beta2**t)
                p.sub_(lr * ((m1_hat + alpha_t * m2[i]) / (nu_hat.sqrt() + eps) + weight_decay * p))


def test_ademamix_separate_alpha_and_beta3_warmups_match_the_paper():
    """The paper's form (v / (1 - b2^t) under the root, decay inside the step) rounds differently
    from ours (sqrt(v) / sqrt(1 - b2^t), decay first): 6e-6 after 200 steps, hence rtol 1e-5."""
    options = dict(lr=0.01, betas=(0.9, 0.99, 0.999), alpha=3.0, eps=1e-8, weight_decay=0.1, t_alpha=40, t_beta3=120)
    ours, theirs = make_params(), make_params()
    run(op.create_optimizer("ademamix", ours, **options), ours, 200)
    ademamix_paper(theirs, 200, **options)
    assert_params_close(ours, theirs, rtol=1e-5)


def test_ademamix_schedules():
    from optim_plugins.optimizers.ademamix import alpha_schedule, beta3_schedule

    assert alpha_schedule(5.0, 100, 50) == 2.5 and alpha_schedule(5.0, 100, 500) == 5.0 and alpha_schedule(5.0, None, 1) == 5.0
    assert beta3_schedule(0.9, 0.9999, 100, 0) == pytest.approx(0.9)
    assert beta3_schedule(0.9, 0.9999, 100, 100) == pytest.approx(0.9999)
    half_lives = [math.log(0.5) / math.log(beta3_schedule(0.9, 0.9999, 100, t)) for t in (0, 50, 100)]
    assert half_lives[1] == pytest.approx((half_lives[0] + half_lives[2]) / 2)  # linear in the half-life


# ----------------------------------------------------------------------------- FAM


def test_fam_matrix_mask_after_100_steps_matches_the_seed():
    """Matrices take the seed's variance mask after step 100 (the generic shapes never do)."""
    def params():
        g = torch.Generator().manual_seed(5)
        return [torch.nn.Parameter(torch.randn(8, 6, generator=g)), torch.nn.Parameter(torch.randn(6, generator=g))]

    def loss_fn(ps):
        return ((ps[0] @ torch.linspace(-1, 1, 6) - 0.5) ** 4).sum() + torch.sin(ps[0] * ps[1]).sum() + (ps[1] ** 2).sum()

    ours, theirs = params(), params()
    opt = op.create_optimizer("fam", ours, lr=0.01, weight_decay=0.1)
    run(opt, ours, 130, loss_fn)
    run(SeedFAM(theirs, lr=0.01, weight_decay=0.1), theirs, 130, loss_fn)
    assert_params_close(ours, theirs)
    assert not opt.state[ours[0]].keys() - {"step"}  # no momentum kept for matrices
