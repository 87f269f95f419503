"""Eva (Zhang, Shi & Li, ICLR 2023) against its equations written out plainly.

The reference below builds each layer's Kronecker-vectorized curvature as a matrix,
F = (a aᵀ) ⊗ (g gᵀ) + γ I, inverts it with ``torch.linalg.inv``, applies the KL clip
ν = min(1, sqrt(κ / Σ lr² vec(G)ᵀ F⁻¹ vec(G))) and hands ν F⁻¹ vec(G) to ``torch.optim.SGD``
(the official code's usage: a preconditioner that rewrites the gradients, then SGD).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import optim_plugins as op
from optim_plugins.optimizers.eva import Eva


class Net(nn.Module):
    """Linear (bias) -> tanh * scale -> Linear (no bias); ``scale`` is outside any Linear."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(5, 4), nn.Linear(4, 3, bias=False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) * self.scale)


def batches(count: int, size: int = 12, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (size,), generator=generator)) for _ in range(count)]


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)


def reference_run(net: Net, data, lr, momentum, weight_decay, damping, kl_clip, factor_decay, freq, kbs):
    """The paper's Eva step written out: KVs, explicit F and inverse, KL clip, then torch SGD."""
    W1, b1, W2, s = net.fc1.weight, net.fc1.bias, net.fc2.weight, net.scale
    sgd = torch.optim.SGD([{"params": [W1, W2], "weight_decay": weight_decay}, {"params": [b1, s], "weight_decay": 0.0}],
                          lr=lr, momentum=momentum, foreach=False)
    kv, nus = {}, []
    for step, (x, y) in enumerate(data):
        sgd.zero_grad()
        h = x @ W1.T + b1
        z = torch.tanh(h) * s
        out = z @ W2.T
        h.retain_grad()
        out.retain_grad()
        loss_fn(out, y).backward()
        n = kbs or len(x)
        new = {"fc1": (torch.cat([x[:n].mean(0), torch.ones(1, dtype=x.dtype)]), h.grad[:n].mean(0)),
               "fc2": (z.detach()[:n].mean(0), out.grad[:n].mean(0))}
        if step % freq == 0:
            kv = {k: new[k] if k not in kv else tuple((1 - factor_decay) * old + factor_decay * nw
                                                     for old, nw in zip(kv[k], new[k])) for k in new}
        grads = {"fc1": torch.cat([W1.grad, b1.grad[:, None]], 1), "fc2": W2.grad}
        preconditioned, total = {}, 0.0
        for name, G in grads.items():
            a, g = kv[name]
            F = torch.kron(torch.outer(a, a), torch.outer(g, g)) + damping * torch.eye(a.numel() * g.numel(), dtype=a.dtype)
            vec_G = G.T.reshape(-1)  # column stacking: vec(g aᵀ) = a ⊗ g
            v = torch.linalg.inv(F) @ vec_G
            total += lr**2 * float(v @ vec_G)
            preconditioned[name] = v.reshape(G.shape[1], G.shape[0]).T
        nu = min(1.0, (kl_clip / total) ** 0.5) if kl_clip else 1.0
        nus.append(nu)
        with torch.no_grad():
            W1.grad.copy_(nu * preconditioned["fc1"][:, :-1])
            b1.grad.copy_(nu * preconditioned["fc1"][:, -1])
            W2.grad.copy_(nu * preconditioned["fc2"])
        sgd.step()
    return nus


def eva_run(net: Net, data, **options):
    opt = op.create_optimizer("eva", net, **options)
    for x, y in data:
        def closure():
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return opt


@pytest.mark.parametrize("options", [
    dict(lr=0.1, momentum=0.9, weight_decay=0.0, damping=0.03, kl_clip=0.001, factor_decay=0.95, fac_update_freq=1,
         kfac_batch_size=None),
    dict(lr=0.05, momentum=0.9, weight_decay=5e-4, damping=0.1, kl_clip=10.0, factor_decay=0.5, fac_update_freq=2,
         kfac_batch_size=5),
    dict(lr=0.2, momentum=0.0, weight_decay=1e-2, damping=1.0, kl_clip=None, factor_decay=0.9, fac_update_freq=3,
         kfac_batch_size=16),
], ids=["clip-active", "freq2-batch5", "no-clip"])
def test_matches_paper_equations_on_an_mlp(options):
    data = batches(7)
    ours, theirs = Net().double(), Net().double()
    opt = eva_run(ours, data, **options)
    nus = reference_run(theirs, data, options["lr"], options["momentum"], options["weight_decay"], options["damping"],
                        options["kl_clip"], options["factor_decay"], options["fac_update_freq"], options["kfac_batch_size"])
    if options["kl_clip"] == 0.001:
        assert max(nus) < 1  # the clip acts in this case
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert not torch.equal(a, Net().double().get_parameter(name))
        # float64; F⁻¹ by an explicit inverse vs Sherman-Morrison: measured max difference 7e-11 after 7 steps
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=name)
    buffers = {"momentum_buffer"} if options["momentum"] else set()
    assert set(opt.state[ours.fc1.weight]) == {"step", "eva_a", "eva_g", *buffers}
    assert set(opt.state[ours.scale]) == {"step", *buffers}


def test_conv2d_patch_vector_and_step_match_the_equations():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1).double()
    start = [p.detach().clone() for p in conv.parameters()]
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    opt = op.create_optimizer("eva", conv, lr=0.5, momentum=0.0, weight_decay=0.0, kl_clip=None, damping=0.1)
    out = conv(x)
    out.retain_grad()
    (out**2).mean().backward()
    opt.step()
    # the KV of a convolution: the mean of every input patch (zero padded), over batch and positions
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    patches = [padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(4, -1) for i in range(3) for j in range(3)]
    a = torch.cat([torch.cat(patches).mean(0), torch.ones(1, dtype=x.dtype)])
    g = out.grad.mean((0, 2, 3))
    torch.testing.assert_close(opt.state[conv.weight]["eva_a"], a)
    torch.testing.assert_close(opt.state[conv.weight]["eva_g"], g)
    G = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], 1)
    F = torch.kron(torch.outer(a, a), torch.outer(g, g)) + 0.1 * torch.eye(a.numel() * 3, dtype=x.dtype)
    V = (torch.linalg.inv(F) @ G.T.reshape(-1)).reshape(G.shape[1], 3).T
    torch.testing.assert_close(conv.weight.detach(), start[0] - 0.5 * V[:, :-1].reshape(conv.weight.shape))
    torch.testing.assert_close(conv.bias.detach(), start[1] - 0.5 * V[:, -1])


def test_other_tensors_take_torch_sgd():
    """A model without Linear/Conv2d layers (and a plain list of tensors) steps exactly like torch.optim.SGD."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4), nn.Conv1d(3, 2, 1))

    data = [torch.randint(0, 7, (3, 3)) for _ in range(5)]
    ours, theirs = model(), model()
    opt = op.create_optimizer("eva", ours, lr=0.05, momentum=0.9, weight_decay=0.0, nesterov=True)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=False)
    for tokens in data:
        for net, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            (net(tokens) ** 2).sum().backward()
            o.step()
    assert opt._layers == []
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_invalid_options_name_option_and_value():
    net = Net()
    for options, text in [(dict(damping=0.0), "damping: 0.0"), (dict(kl_clip=-1.0), "kl_clip: -1.0"),
                          (dict(factor_decay=1.5), "factor_decay: 1.5"), (dict(fac_update_freq=0), "fac_update_freq: 0"),
                          (dict(kfac_batch_size=2.5), "kfac_batch_size: 2.5"), (dict(model="net"), "model: 'net'")]:
        with pytest.raises(ValueError, match=text):
            Eva(net.parameters(), **options)
    with pytest.raises(ValueError, match="invalid model"):
        Eva(net, model=Net())
    with pytest.raises(ValueError, match="damping"):
        op.create_optimizer("eva", net, damping=-1.0)
    assert not any(module._forward_hooks for module in net.modules())  # nothing was hooked


def test_kvs_average_micro_batches_and_ignore_passes_without_backward():
    net = Net()
    opt = op.create_optimizer("eva", net, kfac_batch_size=None)
    x1, x2, other = torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 3, (6,))
    with torch.no_grad():
        net(other)  # evaluation: no record
    net(other)  # grad enabled, but never backpropagated: no record
    for x in (x1, x2):  # gradient accumulation: two micro-batches, one step
        loss_fn(net(x), y).backward()
    opt.step()
    expected = torch.cat([(x1.mean(0) + x2.mean(0)) / 2, torch.ones(1)])
    torch.testing.assert_close(opt.state[net.fc1.weight]["eva_a"], expected)


def test_skipped_step_leaves_the_kvs_alone_and_forgets_its_batch():
    net = Net()
    opt = op.create_optimizer("eva", net, nonfinite="skip", kfac_batch_size=None, factor_decay=0.5)
    xs = [torch.randn(6, 5) for _ in range(3)]
    y = torch.randint(0, 3, (6,))
    for i, x in enumerate(xs):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        if i == 1:
            net.fc2.weight.grad[0, 0] = float("nan")
            before = opt.state[net.fc1.weight]["eva_a"].clone()
        opt.step()
        if i == 1:
            assert opt.skipped_steps == 1 and torch.equal(opt.state[net.fc1.weight]["eva_a"], before)
    mean = lambda x: torch.cat([x.mean(0), torch.ones(1)])  # noqa: E731
    torch.testing.assert_close(opt.state[net.fc1.weight]["eva_a"], 0.5 * mean(xs[0]) + 0.5 * mean(xs[2]))


def test_state_dict_round_trip_resumes_bitwise_and_checks_kv_shapes():
    data = batches(6, seed=3)
    straight, resumed = Net().double(), Net().double()
    opt = eva_run(straight, data[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed.load_state_dict(straight.state_dict())
    buffer.seek(0)
    fresh = op.create_optimizer("eva", resumed)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.state[resumed.fc1.weight]["eva_a"], opt.state[straight.fc1.weight]["eva_a"])
    for net, o in ((straight, opt), (resumed, fresh)):
        for x, y in data[3:]:
            o.zero_grad()
            loss_fn(net(x), y).backward()
            o.step()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    bad = copy.deepcopy(opt.state_dict())
    index = next(i for i, state in bad["state"].items() if "eva_a" in state and state["eva_a"].shape == (6,))  # fc1
    bad["state"][index]["eva_a"] = torch.zeros(5, dtype=torch.float64)
    kept = opt.state[straight.fc1.weight]["eva_a"].clone()
    with pytest.raises(ValueError, match=r"'eva_a'.*shape \(5,\), expected \(6,\)"):
        opt.load_state_dict(bad)
    assert torch.equal(opt.state[straight.fc1.weight]["eva_a"], kept)


def test_hooks_are_removable_and_a_copied_model_does_not_carry_the_optimizer():
    net = Net()
    opt = op.create_optimizer("eva", net)
    twin = copy.deepcopy(net)  # a dead hook travels with the copy, not the optimizer and its state
    loss_fn(twin(torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()
    assert opt._pending == {}
    opt.remove_hooks()
    assert not any(module._forward_hooks for module in net.modules())
    loss_fn(net(torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()
    opt.step()
    assert "eva_a" not in opt.state[net.fc1.weight]  # plain SGD now
