"""op.telemetry: numbers against independent computations, zero cost when off, readers, callbacks, plot."""
from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from torch import nn

import optim_plugins as op
from optim_plugins.kernels import cpp as cpp_kernels
from optim_plugins.telemetry import Telemetry, load, plot_heatmap, telemetry, unit_names


class Block(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))


class Net(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(2))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer.mlp(x)
        return self.head(x)


def make(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)
    nn.functional.mse_loss(model(x), y).backward()


def train(model: nn.Module, optimizer, steps: int, check=None) -> None:
    for i in range(steps):
        optimizer.zero_grad()
        backward(model, i)
        if check is not None:
            check(i, before=True)
        optimizer.step()
        if check is not None:
            check(i, before=False)


def measured(model, optimizer, steps, names):
    """Independent numbers per step: grad norms before the step, update norms from copies around it."""
    out = []
    copies = {}

    def check(i, before):
        params = dict(model.named_parameters())
        if before:
            copies.clear()
            copies.update({n: p.detach().clone() for n, p in params.items()})
            copies["grads"] = {n: p.grad.detach().clone() for n, p in params.items()}
        else:
            units = {}
            for n, p in params.items():
                unit = names(n)
                u = units.setdefault(unit, [0.0, 0.0, 0.0])
                u[0] += float(torch.linalg.vector_norm(copies["grads"][n])) ** 2
                u[1] += float(torch.linalg.vector_norm(p.detach() - copies[n])) ** 2
                u[2] += float(torch.linalg.vector_norm(copies[n])) ** 2
            out.append({k: [math.sqrt(x) for x in v] for k, v in units.items()})

    train(model, optimizer, steps, check)
    return out


def assert_matches(record, expected):
    assert set(record["units"]) == set(expected)
    for unit, (g, u, w) in expected.items():
        got = record["units"][unit]
        assert got["grad_norm"] == pytest.approx(g, rel=1e-5)
        assert got["update_norm"] == pytest.approx(u, rel=1e-4, abs=1e-9)
        assert got["weight_norm"] == pytest.approx(w, rel=1e-5)
        assert got["update_ratio"] == pytest.approx(u / w, rel=1e-4, abs=1e-9)


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
def test_layer_numbers_match_independent_computation(name):
    model = make()
    optimizer = op.create_optimizer(name, model, lr=1e-2, **({"momentum": 0.9} if name == "sgd" else {}))
    recorder = telemetry(optimizer, by="layer", model=model)
    expected = measured(model, optimizer, 3, lambda n: n.rsplit(".", 1)[0])
    assert len(recorder.history) == 3
    for record, exp in zip(recorder.history, expected):
        assert_matches(record, exp)
        assert set(record["units"]) == {"layers.0.mlp.0", "layers.0.mlp.2", "layers.1.mlp.0", "layers.1.mlp.2", "head"}
        assert all(v["lr"] == pytest.approx(1e-2) for v in record["units"].values())
    assert recorder.history[-1]["state_bytes"] == op.state_bytes(optimizer)
    if name == "adamw":  # RMS of sqrt(exp_avg_sq) over the unit's elements: sqrt(mean(v))
        states = [optimizer.state[p]["exp_avg_sq"] for p in model.head.parameters()]
        rms = math.sqrt(float(sum(s.double().sum() for s in states)) / sum(s.numel() for s in states))
        assert recorder.history[-1]["units"]["head"]["second_moment"] == pytest.approx(rms, rel=1e-5)
    else:
        assert "second_moment" not in recorder.history[-1]["units"]["head"]
    recorder.remove()


def test_by_group_param_and_depth_names():
    model = make()
    optimizer = op.create_optimizer("adamw", model, lr=1e-2, weight_decay=0.1)  # two groups: decay / no decay
    assert sorted(set(unit_names(optimizer, "group").values())) == ["group0", "group1"]
    assert set(unit_names(optimizer, "layer", model, depth=2).values()) == {"layers.0", "layers.1", "head"}
    assert "layers.1.mlp.2.bias" in unit_names(optimizer, "param", model).values()
    assert set(unit_names(optimizer, "param").values()) == {f"param{i}" for i in range(10)}
    with pytest.raises(ValueError, match="needs the model"):
        telemetry(optimizer, by="layer")
    with pytest.raises(ValueError, match="every"):
        telemetry(optimizer, every=0)
    recorder = telemetry(optimizer, by="group")
    groups = {gi: [n for n, p in model.named_parameters() if any(p is q for q in g["params"])]
              for gi, g in enumerate(optimizer.param_groups)}
    unit = {n: f"group{gi}" for gi, ns in groups.items() for n in ns}
    expected = measured(model, optimizer, 2, unit.get)
    for record, exp in zip(recorder.history, expected):
        assert_matches(record, exp)
    recorder.remove()


def test_torch_optimizer_falls_back_to_step_hooks():
    model = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    recorder = telemetry(optimizer, by="param", model=model)
    assert not recorder.native
    expected = measured(model, optimizer, 2, lambda n: n)
    for record, exp in zip(recorder.history, expected):
        assert_matches(record, exp)
    v = optimizer.state[model.head.weight]["exp_avg_sq"]
    assert recorder.history[-1]["units"]["head.weight"]["second_moment"] == pytest.approx(math.sqrt(float(v.double().mean())), rel=1e-5)
    recorder.remove()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_wrapper_is_measured_around_its_step():
    model = make()
    optimizer = op.create_optimizer("lookahead", model, lr=1e-2)
    recorder = telemetry(optimizer, by="layer", model=model)
    expected = measured(model, optimizer, 3, lambda n: n.rsplit(".", 1)[0])
    for record, exp in zip(recorder.history, expected):
        assert_matches(record, exp)
    recorder.remove()


def test_kahan_bf16_update_norm_is_the_true_change():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64).bfloat16())
    optimizer = op.create_optimizer("adamw", [p], lr=1e-4, compensation="kahan")
    recorder = telemetry(optimizer, by="param")
    for i in range(3):
        p.grad = torch.randn(64, generator=torch.Generator().manual_seed(i)).bfloat16()
        state = optimizer.state.get(p, {})
        old = p.detach().float() + state["compensation"] if "compensation" in state else p.detach().float()
        optimizer.step()
        new = p.detach().float() + optimizer.state[p]["compensation"]
        got = recorder.history[-1]["units"]["param0"]["update_norm"]
        assert got == pytest.approx(float(torch.linalg.vector_norm(new - old)), rel=1e-4)
        assert got > 0  # bf16 alone would round most of these tiny updates away
    recorder.remove()


def test_effective_lr_prodigy_adafactor_maxfactor():
    model = make()
    optimizer = op.create_optimizer("prodigy", model, lr=1.0)
    recorder = telemetry(optimizer, by="group")
    for i in range(4):
        optimizer.zero_grad()
        backward(model, i)
        d_before = optimizer.param_groups[0]["d"]  # the step uses the d estimated before it
        optimizer.step()
        lrs = [v["lr"] for v in recorder.history[-1]["units"].values()]
        assert lrs == [pytest.approx(d_before * optimizer.param_groups[0]["lr"], rel=1e-12)] * 2
    assert optimizer.param_groups[0]["d"] > optimizer.param_groups[0]["d0"]
    recorder.remove()

    for name in ("adafactor", "maxfactor"):
        model = make()
        optimizer = op.create_optimizer(name, model.head, lr=None if name == "adafactor" else 1e-2)
        recorder = telemetry(optimizer, by="param", model=model.head)
        train(model, optimizer, 3)
        record = recorder.history[-1]["units"]["weight"]
        state = optimizer.state[model.head.weight]
        step, rms = float(state["step"]), float(state["RMS"])
        # adafactor: relative step min(1e-2, 1/sqrt(t)); maxfactor: min(lr, 1/sqrt(t)); both times max(eps2, RMS(p))
        expected = max(1e-3, rms) * min(1e-2, 1 / math.sqrt(step))
        assert record["lr"] == pytest.approx(expected, rel=1e-5)
        assert optimizer.effective_lr(optimizer.param_groups[0], state) == pytest.approx(expected, rel=1e-5)
        recorder.remove()


def test_skipped_steps_and_state_bytes():
    model = make()
    optimizer = op.create_optimizer("adamw", model, lr=1e-2, nonfinite="skip")
    recorder = telemetry(optimizer)
    train(model, optimizer, 1)
    optimizer.zero_grad()
    backward(model, 1)
    model.head.bias.grad.fill_(float("nan"))
    optimizer.step()
    assert recorder.history[-1]["skipped_steps"] == 1 and recorder.history[-1]["units"] == {}
    assert recorder.history[0]["state_bytes"] == recorder.history[-1]["state_bytes"] == op.state_bytes(optimizer) > 0
    recorder.remove()


# ----------------------------------------------------------------------------- cost and cadence


def test_every_n_steps():
    model = make()
    optimizer = op.create_optimizer("adamw", model, lr=1e-2)
    recorder = telemetry(optimizer, every=3, keep=2)
    calls = []
    recorder.log_to(lambda values, step: calls.append((step, values)), pass_step=True)
    train(model, optimizer, 10)
    assert [r["step"] for r in recorder.history] == [6, 9]  # keep=2 of 3, 6, 9
    assert [step for step, _ in calls] == [3, 6, 9]
    assert calls[-1][1] == recorder.scalars()
    assert "_telemetry" not in optimizer.__dict__  # the probe is set on recording steps only
    recorder.remove()


def test_off_costs_nothing_and_removed_recorder_leaves_no_trace():
    a, b = make(), make()
    opt_a = op.create_optimizer("adamw", a, lr=1e-2)
    opt_b = op.create_optimizer("adamw", b, lr=1e-2)
    fresh = set(opt_a.__dict__)
    recorder = telemetry(opt_b, every=1, by="layer", model=b)
    train(a, opt_a, 3)
    train(b, opt_b, 3)
    recorder.remove()
    for pa, pb in zip(a.parameters(), b.parameters()):  # bitwise: the measurement changes nothing
        assert torch.equal(pa, pb)
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for optimizer in (opt_a, opt_b):
        assert "_telemetry" not in optimizer.__dict__ and "_telemetry_recorder" not in optimizer.__dict__
        assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
        assert set(optimizer.__dict__) == fresh
    assert type(opt_a).step is type(opt_b).step and "step" not in opt_b.__dict__
    n = len(recorder.history)
    train(b, opt_b, 2)  # removed: records no more
    assert len(recorder.history) == n == 3
    telemetry(opt_b).remove()  # attachable again after remove()
    with pytest.raises(ValueError, match="already"):
        telemetry(opt_b), telemetry(opt_b)


def test_released_gradients_are_refused_clearly():
    model = make()
    optimizer = op.create_optimizer("adamw", model, lr=1e-2)
    handle = op.release_gradients(model, optimizer)
    with pytest.raises(ValueError, match="release_gradients"):
        telemetry(optimizer)
    handle.remove()
    telemetry(optimizer).remove()


# ----------------------------------------------------------------------------- readers


def test_snapshot_save_load_and_plot(tmp_path):
    model = make()
    optimizer = op.create_optimizer("adamw", model, lr=1e-2)
    recorder = telemetry(optimizer, by="layer", model=model, path=tmp_path / "stream" / "telemetry.jsonl")
    train(model, optimizer, 6)
    recorder.remove()
    snap = recorder.snapshot()
    assert json.loads(json.dumps(snap)) == snap and snap["step"] == 6 and snap is not recorder.history[-1]
    saved = recorder.save(tmp_path / "run" / "telemetry.jsonl")
    assert load(saved) == load(tmp_path / "run") == load(tmp_path / "stream") == recorder.history

    from optim_plugins.cli import main

    out = tmp_path / "heat.png"
    assert main(["plot-telemetry", str(tmp_path / "run"), "-o", str(out)]) == 0
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width >= 300 and height >= 200
    assert plot_heatmap(recorder.history, tmp_path / "g.png", metric="grad_norm", log=False)
    assert main(["plot-telemetry", str(tmp_path / "missing"), "-o", str(out)]) == 2


# ----------------------------------------------------------------------------- trainers


def test_hf_trainer_logs_telemetry(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from optim_plugins.integrations.telemetry_callbacks import add_telemetry
    from test_hf import Counting, tiny_llama

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Counting(n=16))
    callback = add_telemetry(trainer, by="layer", depth=3)
    trainer.train()
    entries = [e for e in trainer.state.log_history if "telemetry/state_bytes" in e]
    assert [e["step"] for e in entries] == [2, 4]
    keys = set(entries[-1])
    assert {"telemetry/model.layers.0/update_ratio", "telemetry/model.layers.1/grad_norm",
            "telemetry/model.layers.0/second_moment", "telemetry/skipped_steps"} <= keys
    assert not callback.recorder.active and (tmp_path / "out" / "telemetry.jsonl").exists()

    # passed to Trainer(callbacks=...) without the trainer: the values join the Trainer's next log
    from optim_plugins.integrations.telemetry_callbacks import HFTelemetryCallback

    args = TrainingArguments(output_dir=str(tmp_path / "out2"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Counting(n=8), callbacks=[HFTelemetryCallback(by="group")])
    trainer.train()
    entries = [e for e in trainer.state.log_history if "telemetry/group0/update_ratio" in e]
    assert [e["step"] for e in entries] == [1, 2] and all("loss" in e for e in entries)


def lightning_module(pl):
    """A LightningModule class around :func:`make`: MSE on (x, y) batches, our adamw at lr 1e-2."""
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return op.create_optimizer("adamw", self, lr=1e-2)

    return Module


def test_lightning_callback_logs_to_csv(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from optim_plugins.integrations.telemetry_callbacks import LightningTelemetryCallback

    Module = lightning_module(pl)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g))
    callback = LightningTelemetryCallback(every=2, depth=3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert {"telemetry/net.layers.0/update_ratio", "telemetry/net.head/grad_norm", "telemetry/state_bytes"} <= set(header)
    column, step = header.index("telemetry/net.layers.0/update_ratio"), header.index("step")
    rows = [row.split(",") for row in metrics[1:] if row.split(",")[column]]
    assert [int(row[step]) for row in rows] == [2, 4, 6]  # every=2 optimizer steps, once each
    assert [float(row[column]) for row in rows] == pytest.approx(
        [r["units"]["net.layers.0"]["update_ratio"] for r in callback.recorder.history])
    assert not callback.recorder.active
    assert (tmp_path / "lightning_logs" / "version_0" / "telemetry.jsonl").exists()


# ----------------------------------------------------------------------------- benchmark suite (smoke size)


def test_bench_suite_telemetry_smoke(tmp_path):
    from optim_plugins.bench.telemetry import VARIANTS
    from optim_plugins.cli import main

    out = tmp_path / "telemetry.md"
    assert main(["bench", "--suite", "telemetry", "--params", "3000", "--optimizers", "adamw@reference,adam8bit",
                 "--repeats", "2", "-o", str(out)]) == 0
    table = out.read_text()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| adam")]
    # adam8bit at 3000 parameters: every tensor is below min_8bit_size, so auto hands them to torch's fused kernel
    expected = (("adamw", "reference"), ("adam8bit", "torch fused kernel"))
    assert [r[:3] for r in rows] == [[n, b, v] for n, b in expected for v in VARIANTS]
    # how the recording steps measured: the reference backend by a copy, torch's fused path in the C++ kernel
    in_kernel = "in the step's kernel" if cpp_kernels.unavailable_reason() is None else "a copy, sums around the step"
    assert [r[3] for r in rows] == ["-", "-", *["a copy, sums around the step"] * 2, "-", "-", *[in_kernel] * 2]
    for row in rows:
        assert float(row[4]) > 0 and float(row[5]) > 0
        if row[2] == "off":
            assert row[5] == "1.000" and row[6] == row[7] == "-"
        else:  # the middle half of the per-round ratios around their median, and the overhead
            low, high = (float(x) for x in row[6].split("-"))
            assert low <= float(row[5]) <= high and row[7].endswith("%")
    assert "one copy of the parameters" in table and "load average" in table
