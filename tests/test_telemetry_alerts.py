"""op.telemetry alerts: update/weight ratio out of band for K records, non-finite gradients, naming the layer."""
from __future__ import annotations

import math
import warnings

import pytest

import optim_plugins as op
from optim_plugins.telemetry import Alerts, TelemetryWarning, telemetry
from test_telemetry import backward, make, measured

HOT = "layers.1.mlp.2"  # the layer given a huge learning rate


def hot_lr_optimizer(model, **options):
    hot = list(model.layers[1].mlp[2].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in hot)]
    return op.create_optimizer("adamw", [{"params": rest}, {"params": hot, "lr": 10.0}], lr=1e-3, weight_decay=0.0, **options)


def alerts_of(caught):
    return [w for w in caught if issubclass(w.category, TelemetryWarning)]


def test_band_alert_after_exactly_k_records_names_the_layer():
    model = make()
    optimizer = hot_lr_optimizer(model)
    recorder = telemetry(optimizer, by="layer", model=model, alerts=Alerts(patience=3))
    per_step = []
    ratios = []

    def record_ratios(check):  # independent update/weight ratios from copies around each step
        for record in check:
            ratios.append({unit: u / w for unit, (g, u, w) in record.items()})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            before = len(alerts_of(caught))
            record_ratios(measured(model, optimizer, 1, lambda n: n.rsplit(".", 1)[0]))
            per_step.append(alerts_of(caught)[before:])
    # the hot layer is out of the default band 1e-5..1e-1 from the first step, every other layer inside it
    assert all(r[HOT] > 0.1 for r in ratios)
    assert all(1e-5 < v < 0.1 for r in ratios for unit, v in r.items() if unit != HOT)
    assert [len(w) for w in per_step] == [0, 0, 1, 0, 0]  # at the 3rd record, once per excursion
    message = str(per_step[2][0].message)
    assert repr(HOT) in message and "outside [1e-05, 0.1]" in message and "3 recorded steps" in message
    alert = recorder.history[2]["alerts"][0]
    assert (alert["kind"], alert["unit"], alert["step"]) == ("update_ratio", HOT, 3)
    assert alert["value"] == pytest.approx(ratios[2][HOT], rel=1e-4)
    assert alert["params"] == [f"{HOT}.weight", f"{HOT}.bias"]
    assert [len(r["alerts"]) for r in recorder.history] == [0, 0, 1, 0, 0]
    scalars = recorder.scalars(recorder.history[2])
    assert scalars["telemetry/alerts"] == 1.0 and scalars[f"telemetry/{HOT}/alert_update_ratio"] == 1.0
    assert recorder.scalars(recorder.history[3])["telemetry/alerts"] == 0.0
    recorder.remove()


def test_band_counts_recorded_steps_and_is_off_by_default():
    model = make()
    optimizer = hot_lr_optimizer(model)
    recorder = telemetry(optimizer, every=2, by="layer", model=model, alerts={"patience": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(6):
            optimizer.zero_grad()
            backward(model, i)
            optimizer.step()
            assert len(alerts_of(caught)) == (1 if i >= 3 else 0)  # the 2nd record is step 4
    assert recorder.alerts[0]["step"] == 4
    recorder.remove()

    model = make()
    optimizer = hot_lr_optimizer(model)
    recorder = telemetry(optimizer, by="layer", model=model)  # no alerts unless asked for
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4):
            optimizer.zero_grad()
            backward(model, i)
            optimizer.step()
    assert not alerts_of(caught) and "alerts" not in recorder.history[-1] and "telemetry/alerts" not in recorder.scalars()
    recorder.remove()


def test_nonfinite_gradient_alert_names_layer_and_parameter():
    model = make()
    optimizer = op.create_optimizer("adamw", model, lr=1e-3)
    recorder = telemetry(optimizer, by="layer", model=model, alerts=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            optimizer.zero_grad()
            backward(model, i)
            if i == 2:
                model.layers[0].mlp[0].weight.grad[1, 2] = float("nan")
            optimizer.step()
    found = alerts_of(caught)
    assert len(found) == 1
    assert "non-finite gradient" in str(found[0].message) and "'layers.0.mlp.0'" in str(found[0].message)
    alert = recorder.history[-1]["alerts"][0]
    assert (alert["kind"], alert["unit"], alert["params"], alert["step"]) == ("nonfinite", "layers.0.mlp.0", ["layers.0.mlp.0.weight"], 3)
    assert math.isnan(recorder.history[-1]["units"]["layers.0.mlp.0"]["grad_norm"])
    assert recorder.scalars()["telemetry/layers.0.mlp.0/alert_nonfinite"] == 1.0
    recorder.remove()


def test_nonfinite_alert_when_the_optimizer_skips_an_unrecorded_step():
    model = make()
    optimizer = op.create_optimizer("adamw", model, lr=1e-3, nonfinite="skip")
    recorder = telemetry(optimizer, every=2, by="param", model=model, alerts=Alerts(band=None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4):
            optimizer.zero_grad()
            backward(model, i)
            if i == 2:  # step 3: not a recording step
                model.head.bias.grad.fill_(float("inf"))
            optimizer.step()
    found = alerts_of(caught)
    assert len(found) == 1 and "skipped the step" in str(found[0].message) and "'head.bias'" in str(found[0].message)
    assert optimizer.skipped_steps == 1
    assert [r["step"] for r in recorder.history] == [2, 4]
    assert [a["step"] for a in recorder.history[1]["alerts"]] == [3]  # reported with the next record
    recorder.remove()


def test_no_alert_in_a_normal_run():
    model = make()
    optimizer = op.create_optimizer("adamw", model, lr=1e-3)
    recorder = telemetry(optimizer, by="layer", model=model, alerts=True)
    expected = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = measured(model, optimizer, 8, lambda n: n.rsplit(".", 1)[0])
    assert all(1e-5 < u / w < 0.1 for record in expected for g, u, w in record.values())
    assert not alerts_of(caught) and recorder.alerts == []
    assert all(r["alerts"] == [] for r in recorder.history) and len(recorder.history) == 8
    recorder.remove()


@pytest.mark.parametrize("options, match", [
    ({"band": (1e-1, 1e-5)}, "band"),
    ({"band": (1e-5,)}, "band"),
    ({"patience": 0}, "patience"),
    ({"patience": 2.5}, "patience"),
    ({"nonfinite": "yes"}, "nonfinite"),
])
def test_bad_alert_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        Alerts(**options)
    optimizer = op.create_optimizer("adamw", make(), lr=1e-3)
    with pytest.raises(ValueError, match=match):
        telemetry(optimizer, alerts=options)
    with pytest.raises(ValueError, match="alerts"):
        telemetry(optimizer, alerts="on")
    with pytest.raises(ValueError, match="'K'"):
        telemetry(optimizer, alerts={"K": 3})
    assert "_telemetry_recorder" not in optimizer.__dict__ and not optimizer._optimizer_step_pre_hooks
