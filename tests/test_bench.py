"""The benchmark runs (smoke size) and writes its table; numbers are not asserted (no wall clock in tests)."""
from __future__ import annotations

from optim_plugins.bench.speed import make_params, markdown, run


def test_bench_smoke_writes_a_table(tmp_path):
    from optim_plugins.cli import main

    out = tmp_path / "results.md"
    assert main(["bench", "--optimizers", "adamw,sgd", "--params", "20000", "--repeats", "2", "-o", str(out)]) == 0
    table = out.read_text()
    for variant in ("torch AdamW fused=True", "optim_plugins backend=foreach", "optim_plugins backend=reference"):
        assert f"| adamw | {variant} |" in table
    assert "| sgd | torch foreach=True |" in table


def test_bench_counts_state_bytes():
    rows, numel = run(["adamw", "sgd"], total=5000, warmup=1, repeats=1)
    assert numel == sum(p.numel() for p in make_params(5000))
    for row in rows:
        assert row.state_bytes_per_param == (8.0 if row.name == "adamw" else 4.0)  # fp32 moments / momentum buffer
    assert "x fastest torch AdamW" in markdown(rows, numel, "test")
    assert "optim_plugins backend=compiled" not in {r.variant for r in rows}  # compiled only from COMPILED_FROM


def test_per_byte_ratio_is_the_time_ratio_scaled_by_bytes_moved():
    from optim_plugins.bench.speed import Row

    lion = Row("lion", "x", ms_per_step=10.0, state_bytes_per_param=4.0, bytes_per_param=20, baseline_ms=10.0)
    assert lion.ratio == 1.0 and abs(lion.per_byte_ratio - 28 / 20) < 1e-12  # 20 B in the time fused AdamW moves 28


def test_state_memory_table_counts_bytes_per_parameter():
    from optim_plugins.bench.memory import memory_markdown, state_memory

    rows = dict((name, state) for name, state, _ in state_memory(["adamw", "adamw8bit", "adafactor", "sgd"]))
    assert abs(rows["adamw"] - 8.0) < 1e-3  # two fp32 moments (+ two 0-d step tensors)
    assert 2.0 <= rows["adamw8bit"] <= 2.1  # int8 codes + fp32 absmax per 256-block, the bound
    assert rows["adafactor"] < 0.05  # factored row/column moments of the 1024x1024 weight
    assert rows["sgd"] < 1e-3  # no momentum: only step counters
    assert "| adamw | 8.00 |" in memory_markdown(list(zip(rows, rows.values(), rows.values())), None, "test")


def test_bf16_suite_times_every_variant_beside_torchs_fused_adamw(tmp_path):
    from optim_plugins.cli import main

    out = tmp_path / "bf16.md"
    assert main(["bench", "--suite", "bf16", "--optimizers", "lion", "--params", "20000", "--repeats", "1",
                 "-o", str(out)]) == 0
    table = out.read_text()
    for variant in ("torch AdamW fused=True, fp32", "torch AdamW fused=True, bf16", "lion Kahan, backend=compiled",
                    "lion Kahan, backend=foreach", "lion no compensation, backend=compiled"):
        assert f"| {variant} |" in table
    assert "(Inductor)" not in table  # Inductor's variant only from COMPILED_FROM parameters


def test_gpu_suite_refuses_without_cuda_and_its_table_counts_bandwidth(capsys):
    """The GPU suite: a clear error where torch sees no CUDA device; its measuring and table code run on
    the CPU here (host clock instead of CUDA events), with bandwidth = bytes moved / step time."""
    import torch

    from optim_plugins.bench import gpu
    from optim_plugins.cli import main

    if not torch.cuda.is_available():
        assert main(["bench", "--suite", "gpu", "-o", ""]) != 0
        assert "needs a CUDA GPU" in capsys.readouterr().err
    rows, numel = gpu.run(["adamw", "lion"], 20000, torch.device("cpu"), repeats=2, warmup=1, backends=("foreach",))
    variants = {(row.name, row.variant) for row in rows}
    assert ("adamw", "torch AdamW fused=True") in variants and ("lion", "optim_plugins backend=foreach") in variants
    assert ("adamw", "optim_plugins backend=auto") in variants  # "(torch's fused kernel)" dropped: on CUDA, Triton
    assert not any("Inductor" in variant for _, variant in variants) and not any(row.error for row in rows)
    table = gpu.markdown(rows, numel, "test", "NVIDIA H100 80GB HBM3", gpu.nominal_peak("NVIDIA H100 80GB HBM3"),
                         copy=100.0)
    lion = next(row for row in rows if row.variant == "optim_plugins backend=foreach" and row.name == "lion")
    bandwidth = 20 * numel / (lion.ms_per_step * 1e-3) / 1e9  # Lion moves 20 bytes per parameter
    expected = f"{bandwidth:,.0f} | {100 * bandwidth / 3350:.0f}% | {100 * bandwidth / 100:.0f}% |"
    assert f"| lion | optim_plugins backend=foreach | {lion.ms_per_step:.3f} | " in table and expected in table
    assert gpu.nominal_peak("NVIDIA H200") == 4800 and gpu.nominal_peak("NVIDIA H100 PCIe") == 2000
    assert gpu.nominal_peak("some other card") is None


def test_scale_suite_reads_its_numbers_from_its_rows():
    """The scale table's reading notes are computed from the rows (so a rerun keeps them true)."""
    from optim_plugins.bench import scale

    names = list(scale._variants())
    def ms(fused, compiled, auto, lion_foreach, lion_compiled):
        values = dict.fromkeys(names, 1.0)
        values.update({"torch AdamW fused=True": fused, "ours adamw compiled": compiled, "ours adamw auto": auto,
                       "ours lion foreach": lion_foreach, "ours lion compiled": lion_compiled})
        return values
    points = [("params", 1_000_000, 21, ms(1.0, 1.5, 1.1, 4.0, 1.2), 0.0),
              ("params", 20_000_000, 21, ms(10.0, 9.5, 10.2, 30.0, 7.0), 0.0),
              ("params", 70_000_000, 21, ms(40.0, 40.0, 40.0, 160.0, 28.0), 0.0),
              ("tensors", 1_024_000, 1000, ms(10.0, 18.0, 11.0, 24.0, 15.0), 0.0)]
    table = scale.markdown(points, "test", "scale.png")
    assert "| tensors | 1,024,000 | 1000 |" in table and "18.00 (1.80x)" in table
    assert "1.00-1.10x torch's `AdamW(fused=True)` from 1,000,000 to 70,000,000 parameters" in table
    assert "0.95-1.00x torch's fused kernel from 16M parameters, 1.50-1.50x below" in table
    assert "3.33-5.71x faster on it than on foreach, 0.70-1.20x the time of a fused AdamW step" in table
    assert "compiled AdamW 1.80x torch's fused AdamW (8.0 us more per tensor: our per-parameter host code" in table
    faster = [*points[:3], ("tensors", 1_024_000, 1000, ms(10.0, 8.0, 7.0, 24.0, 9.0), 0.0)]
    assert "compiled AdamW 0.80x torch's fused AdamW (2.0 us less per tensor: its per-parameter host code" in \
        scale.markdown(faster, "test", "scale.png")
