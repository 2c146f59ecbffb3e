"""Smoke tests of the benchmark suite (bench/): runner, CSV schema, plots, README report, convergence and
open-set scripts, on tiny sizes.  The fused C++ backend is not used here (it may need a build); the
reference, the matmul anchor and torch's linear_cross_entropy stand in for every provider."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not installed: import it from the checkout (after an installed marginops)
    sys.path.append(str(ROOT))

import bench.__main__ as runner  # noqa: E402
from bench import cases, convergence, cosine_block, openset, plot, profile, report, results  # noqa: E402
from bench.providers import PROVIDERS  # noqa: E402


def _in_process(spec, timeout):
    """run_case without the subprocess (a fresh interpreter per case costs seconds)."""
    return cases.run(spec)


def _run(tmp_path, monkeypatch, *extra):
    monkeypatch.setattr(runner, "run_case", _in_process)
    argv = ["--out", str(tmp_path), "--repeats", "1", "--warmup", "0", "--min-seconds", "0", *extra]
    assert runner.main(argv) == 0
    return results.read_csv([tmp_path / "cpu.csv"])


def test_kernel_name_round_trip():
    name = results.kernel_name("arcface", "float32", 512, 200_000, 256)
    assert name == "arcface/float32/B=512/D=256"
    assert results.parse_kernel(name) == {"margin": "arcface", "dtype": "float32", "B": 512, "D": 256}
    assert results.kernel_name("cosface", "bfloat16", 512, 1000, 256, x_name="batch") == "cosface/bfloat16/C=1000/D=256"


def test_quantiles():
    assert results.quantiles([2.0]) == (2.0, 2.0, 2.0)
    p50, p20, p80 = results.quantiles([float(v) for v in range(1, 11)])
    assert p20 < p50 < p80 and p50 == 5.5


def test_runner_sweep_writes_csv_and_plots(tmp_path, monkeypatch, capsys):
    rows = _run(
        tmp_path,
        monkeypatch,
        "--quick",
        "--values",
        "300,700",
        "--batch",
        "8",
        "--dim",
        "16",
        "--backends",
        "reference,matmul,torch_lce,cuda",
        "--modes",
        "forward,backward,forward+backward",
    )
    out = capsys.readouterr().out
    assert "device:" in out
    if hasattr(torch.nn.functional, "linear_cross_entropy"):  # torch >= 2.13: the one provider here that runs
        assert "× reference" in out and "GEMM" in out  # beside the reference and the GEMMs, so ratios print
    with (tmp_path / "cpu.csv").open() as fh:
        assert next(csv.reader(fh)) == results.FIELDS
    device = results.device_name("cpu")
    for row in rows:
        assert row["device"] == device
        assert "torch " + torch.__version__ in row["versions"] and "marginops" in row["versions"]
        assert row["x_name"] == "num_classes" and row["x_value"] in ("300", "700")
    providers = {r["provider"] for r in rows}
    assert providers == {"reference", "matmul", "torch_lce", "cuda"}
    # cuda cannot run on the CPU: recorded as unavailable, never invented
    assert {r["p50"] for r in rows if r["provider"] == "cuda"} == {"unavailable"}
    timed = [r for r in rows if r["provider"] == "reference" and r["metric"] == "time"]
    assert len(timed) == 6 and all(float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in timed)
    assert {r["kernel"] for r in rows if r["provider"] in ("matmul", "torch_lce")} == {"nomargin/float32/B=8/D=16"}
    mem = [r for r in rows if r["metric"] == "peak_extra_memory"]
    assert mem and all(float(r["p50"]) >= 0 for r in mem)
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 3 and all(p.stat().st_size > 10_000 for p in pngs)
    # 2 sizes x 3 modes x 4 providers; one row per case and metric, a case that did not run has one
    cases = {(r["provider"], r["mode"], r["x_value"]) for r in rows}
    assert len(cases) == 24
    assert f"appended 24 cases to {tmp_path / 'cpu.csv'}: {len(rows)} rows, one per case and metric (" in out

    # a second run appends, it does not overwrite
    n_before = len(rows)
    rows = _run(tmp_path, monkeypatch, "--sizes", "8x300x16", "--backends", "reference")
    assert len(rows) > n_before
    assert f"appended 1 case to {tmp_path / 'cpu.csv'}: {len(rows) - n_before} rows" in capsys.readouterr().out


def test_default_plan_is_the_first_benchmark():
    args = runner.build_parser().parse_args([])
    sizes, x_name, providers, repeats = runner.plan(args)
    assert sizes == [(512, 200_000, 256)] and x_name == "num_classes"
    assert providers == ["reference", "cpu", "matmul"]
    assert args.margins == "arcface" and args.modes == "forward+backward"
    sweep = runner.plan(runner.build_parser().parse_args(["--sweep"]))
    assert [s[1] for s in sweep[0]] == [10_000, 50_000, 200_000, 1_000_000]
    assert "torch_lce" in sweep[2]
    gpu = runner.plan(runner.build_parser().parse_args(["--sweep", "--device", "cuda"]))
    assert [s[1] for s in gpu[0]] == [100_000, 1_000_000, 4_000_000, 10_000_000]
    assert {"liger", "cce", "triton", "cuda"} <= set(gpu[2])
    b_sweep = runner.plan(runner.build_parser().parse_args(["--sweep", "B", "--values", "64,128"]))
    assert b_sweep[0] == [(64, 200_000, 256), (128, 200_000, 256)] and b_sweep[1] == "batch"
    assert runner.parse_values("10k,1M,2.5k") == [10_000, 1_000_000, 2_500]


def test_unknown_provider_is_an_error():
    with pytest.raises(SystemExit):
        runner.plan(runner.build_parser().parse_args(["--backends", "reference,nope"]))
    with pytest.raises(SystemExit):
        runner._comma_list("nope", PROVIDERS, "provider")


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the case budget is RLIMIT_DATA, which Linux enforces on mmap"
)
def test_case_subprocess_records_out_of_memory():
    """A case over its memory budget comes back as 'out of memory', through the real subprocess path."""
    spec = dict(
        provider="reference",
        margin="arcface",
        kernel_margin="arcface",
        mode="forward",
        batch=8,
        classes=100_000_000,
        dim=16,
        dtype="float32",
        device="cpu",
        repeats=1,
        warmup=0,
        mem_limit_bytes=2 * 2**30,
    )
    result = runner.run_case(spec, timeout=120)
    assert result["error"] == "out of memory", result
    row = results.rows_for_case(spec, result, "dev", results.now())
    assert len(row) == 1 and row[0]["p50"] == "out of memory" and row[0]["p20"] == ""


def test_append_csv_never_clobbers_another_schema(tmp_path):
    (tmp_path / "cpu.csv").write_text("a,b\n1,2\n")
    with pytest.warns(RuntimeWarning):
        path = results.append_csv([dict.fromkeys(results.FIELDS, "x")], tmp_path, "cpu.csv")
    assert path.name == "cpu.2.csv"
    assert (tmp_path / "cpu.csv").read_text() == "a,b\n1,2\n"


def test_latest_keeps_the_newest_run_of_each_case():
    base = dict.fromkeys(results.FIELDS, "")
    base.update(kernel="k", provider="p", mode="m", x_name="num_classes", x_value="1", device="d")
    old = [
        dict(base, metric="time", p50="1", timestamp="2024"),
        dict(base, metric="peak_extra_memory", p50="5", timestamp="2024"),
    ]
    new = [dict(base, metric="time", p50="out of memory", timestamp="2025")]
    picked = results.latest(old + new)
    assert picked == new  # the older memory row does not leak into the newer (failed) run


def test_plot_and_report_from_csv(tmp_path, monkeypatch):
    _run(
        tmp_path,
        monkeypatch,
        "--quick",
        "--values",
        "300,700",
        "--batch",
        "8",
        "--dim",
        "16",
        "--backends",
        "reference,matmul",
        "--no-plot",
    )
    assert not list(tmp_path.glob("*.png"))
    assert plot.main(["--csv", str(tmp_path)]) == 0
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    assert report.main(["--csv", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("after\n") and text.count(report.BEGIN) == 1
    assert "| float32 | 8 × 300 × 16 | arcface | reference |" in text and "*forward+backward*" in text
    assert "matmul (plain GEMMs only)" in text and pngs[0].name in text
    assert report.main(["--csv", str(tmp_path), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("reference", "REF", 1))
    assert report.main(["--csv", str(tmp_path), "--readme", str(readme), "--check"]) == 1


def test_benchmark_readme_has_the_markers_and_the_readme_stays_short():
    text = (ROOT / "bench" / "README.md").read_text()
    assert report.BEGIN in text and report.END in text
    # the project README keeps a summary; the generated detail lives in bench/README.md
    readme = (ROOT / "README.md").read_bytes()
    assert report.BEGIN.encode() not in readme
    assert len(readme) <= 20 * 1024, len(readme)


def test_convergence_script_tiny(tmp_path, capsys):
    code = convergence.main(
        ["--backend", "reference", "--classes", "40", "--steps", "6", "--batch", "16", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0 and "PASS" in out
    assert (tmp_path / "convergence.png").stat().st_size > 10_000
    with (tmp_path / "convergence_curves.csv").open() as fh:
        lines = list(csv.reader(fh))
    assert lines[0] == ["step", "ref64", "ref32", "fused32", "fused64"] and len(lines) == 7


def test_openset_metrics():
    labels = torch.arange(5).repeat_interleave(4)
    perfect = torch.nn.functional.one_hot(labels, 8).float() + 0.01 * torch.randn(20, 8)
    m = openset.evaluate(perfect, labels, per_identity=4)
    assert m["auc"] == pytest.approx(1.0) and m["tar"] == 1.0 and m["top1"] == 1.0
    assert m["pairs"] == (5 * 6, 190 - 30)
    g = torch.Generator().manual_seed(0)
    auc = openset.roc_auc(torch.randn(4000, generator=g), torch.randn(4000, generator=g))
    assert abs(auc - 0.5) < 0.03
    assert openset.roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert openset.tar_at_far(torch.tensor([0.5, 2.0]), torch.arange(1000.0) / 1000, 1e-3) == 0.5


def test_openset_script_tiny(capsys, tmp_path):
    assert (
        openset.main(
            [
                "--heads",
                "softmax,arcface,sphereface",
                "--backend",
                "reference",
                "--train-ids",
                "20",
                "--out",
                str(tmp_path / "o.md"),
                "--test-ids",
                "6",
                "--per-identity",
                "3",
                "--steps",
                "3",
                "--batch",
                "16",
                "--seeds",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ArcFace" in out and "TAR @ FAR=1e-3" in out and "SphereFace" in out
    assert "| ArcFace (s=32, m=0.5) |" in (tmp_path / "o.md").read_text()


def test_pytest_benchmark_suite_is_collectable():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_provider[reference-arcface-forward+backward]" in proc.stdout
    assert "test_provider[torch_lce-nomargin-forward]" in proc.stdout


def test_cli_help_lists_options_and_providers():
    text = runner.build_parser().format_help()
    for option in ("--device", "--quick", "--sweep", "--sizes", "--margins", "--backends", "--modes", "--out"):
        assert option in text
    assert "torch_lce" in text and "no margin" in text


def test_cosine_block_study_separates_a_float32_block_from_a_16bit_one():
    """bench/cosine_block.py: a float32 block (what the chunked path writes) passes the rule on every output;
    an fp16 one fails it on lse by orders of magnitude, the study's finding."""
    inputs = cosine_block.make_inputs(23, 40, 301, 1, seed=5)
    assert max(cosine_block.ratios(inputs, torch.bfloat16, torch.float32)[:-1]) <= 1.0
    fp16_block = cosine_block.ratios(inputs, torch.bfloat16, torch.float16)
    assert fp16_block[0] > 10.0 and fp16_block[-1] > 1e-4  # lse: ratio, then absolute error in nats


def test_profile_names_each_kind_of_kernel():
    """bench/profile.py sorts kernels by name: vendor GEMMs (cuBLAS's nvjet / xmma / CUTLASS kernels, ATen's
    matrix products), the package's own kernels and ops, element-wise work, the rest."""
    assert profile.category("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "gemm"
    assert profile.category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm"
    assert profile.category("aten::mm") == "gemm"
    assert profile.category("void marginops::cuda::detail::chunk_forward_kernel<float>(...)") == "marginops"
    assert profile.category("_lse_fwd_kernel") == "marginops"
    assert profile.category("_bwd_dw_kernel") == "marginops"
    assert profile.category("marginops::fused_lse") == "marginops"
    assert profile.category("void at::native::vectorized_elementwise_kernel<4, ...>") == "elementwise"
    assert profile.category("Memcpy DtoD (Device -> Device)") == "elementwise"
    assert profile.category("ncclDevKernel_AllGather_RING_LL") == "other"


def test_profile_splits_a_step(tmp_path):
    """On the CPU the split is made of operators' self time: the CPU backend spends time in ATen's matrix
    products and in its own op, the plain GEMMs almost only in matrix products; categories and idle time add
    up to the step's wall time.  One thread: the profiler sees only the calling thread's operators, and with more
    the CPU op's chunks (and their matrix products) may all run on a pool thread, where they count as the op's own
    time."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = profile.profile("cpu", "cpu", (32, 4000, 48), "float32", "arcface", steps=2)
        gemms = profile.profile("matmul", "cpu", (32, 4000, 48), "float32", "arcface", steps=2)
    finally:
        torch.set_num_threads(threads)
    for result in (cpu, gemms):
        assert set(result["seconds"]) == set(profile.CATEGORIES) | {"idle"}
        assert all(v >= 0 for v in result["seconds"].values())
        assert sum(result["seconds"].values()) == pytest.approx(max(result["wall"], result["busy"]), rel=1e-6)
    assert cpu["seconds"]["gemm"] > 0 and cpu["seconds"]["marginops"] > 0
    assert gemms["seconds"]["marginops"] == 0 and gemms["seconds"]["gemm"] > 0.5 * gemms["busy"]
    argv = ["--device", "cpu", "--size", "8x300x16", "--backends", "matmul,cuda", "--out", str(tmp_path)]
    assert profile.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "profile.csv").open()))
    assert [r["category"] for r in rows] == [*profile.CATEGORIES, "idle"]
    assert {r["provider"] for r in rows} == {"matmul"}  # cuda: unavailable on the CPU, skipped with a message


def _record(path: Path, p50: dict, device: str = "tiny (2 cores, 2 threads)") -> None:
    """A CSV of (provider, x) -> median time, without running anything: reference and the matmul anchor."""
    rows = []
    for (provider, x), t in p50.items():
        margin = "nomargin" if provider == "matmul" else "arcface"
        common = dict(
            kernel=f"{margin}/float32/B=8/D=16",
            provider=provider,
            mode="forward+backward",
            unit="s",
            x_name="num_classes",
            x_value=x,
            device=device,
            versions="marginops 0; load 0.5",
            timestamp="2026-01-01T00:00:00Z",
        )
        rows.append(dict(common, metric="time", p50=str(t), p20=str(t * 0.9), p80=str(t * 1.1)))
        rows.append(dict(common, metric="peak_extra_memory", unit="MiB", p50="4", p20="4", p80="4"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    results.append_csv(rows, path.parent, path.name)


def _manifest_names(folder: Path) -> set:
    return set(json.loads((folder / plot.MANIFEST).read_text())["plots"])


def test_report_draws_and_checks_plots_like_tables(tmp_path, capsys):
    """bench.report writes the plots with the tables; --check compares each plot's drawn data with the CSV,
    lists what it checked, and names a stale plot with the command that regenerates it."""
    data = {("reference", 300): 0.02, ("reference", 700): 0.05, ("matmul", 300): 0.01, ("matmul", 700): 0.02}
    _record(tmp_path / "cpu.csv", data)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\n{report.END}\n")
    args = ["--csv", str(tmp_path), "--readme", str(readme)]
    assert report.main(args) == 0
    (name,) = plot.figures(results.latest(results.read_csv([tmp_path / "cpu.csv"])))
    png = tmp_path / name
    assert f"drew: {png}" in capsys.readouterr().out and png.stat().st_size > 10_000
    assert f"]({name})" in readme.read_text()  # the block links the plot it drew
    manifest = json.loads((tmp_path / plot.MANIFEST).read_text())["plots"]
    assert set(manifest) == {name} and manifest[name]["series"] == ["matmul (no margin)", "reference"]
    assert plot.png_fingerprint(png) == manifest[name]["sha256"]

    assert report.main([*args, "--check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3, out  # one line per table and plot, then OK
    assert out[0].startswith(f"ok    table {readme} · tiny (2 cores, 2 threads) · forward+backward: 4 rows")
    assert out[1].startswith(f"ok    plot  {png}: drawn data sha256 {manifest[name]['sha256'][:12]}")
    assert out[-1].startswith("OK: 1 tables in") and "1 plots in" in out[-1]

    # redrawing an unchanged record leaves the files alone (no drift in git status)
    before = png.read_bytes()
    assert plot.main(["--csv", str(tmp_path)]) == 0
    assert f"unchanged: {png}" in capsys.readouterr().out and png.read_bytes() == before

    # the record changes: the plot (and the table) are stale, named, with the command that regenerates them
    _record(tmp_path / "cpu.csv", {**data, ("reference", 700): 0.09})
    assert report.main([*args, "--check"]) == 1
    err = capsys.readouterr().err
    assert f"stale {png}: stale: the record's data for it changed" in err
    assert f"regenerate with: python -m bench.report --csv {tmp_path} --readme {readme}" in err
    assert report.main(args) == 0 and f"drew: {png}" in capsys.readouterr().out
    assert report.main([*args, "--check"]) == 0

    # a PNG redrawn from other data (an older bench.plot, another tool) while plots.json is current
    png.write_bytes(before)
    assert report.main([*args, "--check"]) == 1
    assert "was not drawn from the data plots.json lists" in capsys.readouterr().err

    # a plot the record no longer draws: --check names it, bench.report removes it
    _record(tmp_path / "cpu.csv", {("reference", 300): 0.02, ("matmul", 300): 0.01})
    assert report.main([*args, "--check"]) == 1
    assert f"{png}: plots.json lists it, but the record draws no such plot" in capsys.readouterr().err
    assert report.main(args) == 0 and not png.exists()
    assert report.main([*args, "--check"]) == 0

    # reading one device's CSV never drops another device's plot
    _record(tmp_path / "gpu.csv", data, device="gpu")
    assert report.main(args) == 0
    (gpu_png,) = tmp_path.glob("gpu_*.png")
    assert plot.main(["--csv", str(tmp_path / "cpu.csv")]) == 1  # nothing of its own to draw
    assert gpu_png.exists() and gpu_png.name in _manifest_names(tmp_path)
    assert report.main([*args, "--check"]) == 0


def test_report_check_passes_on_the_committed_record_and_fails_on_an_altered_copy(tmp_path, capsys):
    """The committed plots are what the committed record draws; changing one point of a copy of the record
    makes --check name that plot (and only that one) as stale."""
    committed = json.loads((results.RESULTS_DIR / plot.MANIFEST).read_text())["plots"]
    assert report.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: drawn data sha256 {entry['sha256'][:12]}" in out for name, entry in committed.items())
    assert out.splitlines()[-1].startswith("OK: ")

    # a copy laid out as the repository (README beside results/), so that its block is the committed one
    copy = tmp_path / "results"
    copy.mkdir()
    for path in results.RESULTS_DIR.iterdir():
        if path.suffix in (".csv", ".png", ".json"):
            shutil.copy(path, copy / path.name)
    shutil.copy(ROOT / "bench" / "README.md", tmp_path / "README.md")
    args = ["--csv", str(copy), "--readme", str(tmp_path / "README.md"), "--check"]
    assert report.main(args) == 0
    capsys.readouterr()
    rows = results.latest(results.read_csv(results.csv_files(copy)))
    figures = plot.figures(rows)
    name = next(iter(figures))
    victim = next(
        r
        for r in rows
        if r["metric"] == "time"
        and r["provider"] == "reference"
        and plot.file_name(r["device"], r["kernel"].partition("/")[2], r["mode"], r["x_name"]) == name
    )
    with (copy / "cpu.csv").open(newline="") as fh:
        record = list(csv.DictReader(fh))
    for row in record:
        if row == victim:
            row["p50"] = f"{float(row['p50']) * 2:.6g}"
    (copy / "cpu.csv").unlink()
    results.append_csv(record, copy, "cpu.csv")
    assert report.main(args) == 1
    captured = capsys.readouterr()
    assert f"stale {copy / name}: stale: the record's data for it changed" in captured.err
    for other in set(figures) - {name}:
        assert f"ok    plot  {copy / other}" in captured.out
    assert "regenerate with: python -m bench.report --csv" in captured.err
