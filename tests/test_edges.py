"""Edges of the public API (issue 14): no silent wrong answers, no state changed by a call that raises,
construction-time checks of margins and options, label dtypes, float64 statistics, pml drop-in gaps."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import KERNEL_BACKENDS, device_for

import marginops
from marginops import nn as mnn
from marginops.compat import pml


def _problem(B=4, C=10, D=8, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype).to(device)
    w = torch.randn(C, D, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    return x, w, y


# ----------------------------------------------------------------------------------------------------------
# double backward: the kernels' backward is not differentiable; say so instead of a silently wrong number


def _gradient_penalty(backend, x, w, y, margin):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = marginops.margin_cross_entropy(x, w, y, margin, backend=backend)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    gx.pow(2).sum().backward()
    return x.grad, w.grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_on_a_kernel_backend_raises_with_advice(backend):
    device = device_for(backend)
    x, w, y = _problem(B=3, C=5, D=4, device=device)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        _gradient_penalty(backend, x, w, y, marginops.ArcFace(s=30.0, m=0.5))


def test_first_order_with_create_graph_false_unchanged_on_cpu():
    x, w, y = _problem()
    margin = marginops.ArcFace(s=30.0, m=0.5)
    grads = []
    for backend in ("cpu", "reference"):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = marginops.margin_cross_entropy(xx, ww, y, margin, backend=backend)
        grads.append(torch.autograd.grad(loss, (xx, ww)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_double_backward_on_the_reference_backend_is_correct():
    x, w, y = _problem(B=3, C=5, D=4)
    margin = marginops.ArcFace(s=8.0, m=0.5)

    def f(xx, ww):
        return marginops.margin_cross_entropy(xx, ww, y, margin, backend="reference")

    inputs = (x.clone().requires_grad_(True), w.clone().requires_grad_(True))
    assert torch.autograd.gradgradcheck(f, inputs)

    # the gradient penalty of the issue against central finite differences of the penalty itself
    def penalty(ww):
        xx = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(f(xx, ww), xx, create_graph=True)
        return gx.pow(2).sum()

    _, grad_w = _gradient_penalty("reference", x, w, y, margin)
    eps = 1e-6
    fd = torch.zeros_like(w)
    for idx in range(w.numel()):
        e = torch.zeros_like(w).view(-1)
        e[idx] = eps
        e = e.view_as(w)
        fd.view(-1)[idx] = (penalty(w + e) - penalty(w - e)) / (2 * eps)
    torch.testing.assert_close(grad_w, fd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------
# a call that raises leaves the module's state as it was


def _bad_calls(module, D=8, C=10):
    x, _, y = _problem(B=4, C=C, D=D)
    bad_label = y.clone()
    bad_label[1] = C
    return [
        (x, bad_label, ValueError),  # label out of range
        (x[:, : D - 1], y, ValueError),  # wrong embedding size
        (x.float(), y, TypeError),  # dtype other than the weight's
    ]


def _state(module):
    state = {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    state["_extra"] = getattr(module, "iteration", None)
    return state


@pytest.mark.parametrize(
    "make",
    [
        lambda: mnn.SphereFaceLoss(8, 10, backend="reference"),
        lambda: mnn.CurricularFaceLoss(8, 10, s=16.0, backend="reference"),
        lambda: mnn.AdaFaceLoss(8, 10, s=16.0, backend="reference"),
    ],
    ids=["sphereface", "curricularface", "adaface"],
)
def test_failed_training_calls_do_not_advance_state(make):
    module = make().double().train()
    before = _state(module)
    lambda_before = module.lambda_ if isinstance(module, mnn.SphereFaceLoss) else None
    for x, y, exc in _bad_calls(module):
        with pytest.raises(exc):
            module(x, y)
    after = _state(module)
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], torch.Tensor):
            assert torch.equal(before[key], after[key]), key
        else:
            assert before[key] == after[key], key
    if lambda_before is not None:
        assert module.iteration == 0 and module.lambda_ == lambda_before == 1000.0
    # and a good call still advances it
    x, _, y = _problem()
    module(x, y)
    if isinstance(module, mnn.SphereFaceLoss):
        assert module.iteration == 1


# ----------------------------------------------------------------------------------------------------------
# out-of-range margins and options rejected at construction


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: marginops.SubCenterArcFace(m=4), "SubCenterArcFace.m"),
        (lambda: marginops.CombinedMargin(m2=4), "CombinedMargin.m2"),
        (lambda: marginops.CombinedMargin(m3=NAN), "CombinedMargin.m3"),
        (lambda: marginops.ElasticFace(m=4), "ElasticFace.m"),
        (lambda: marginops.ElasticFace(kind="cos", m=2.0), "ElasticFace.m"),
        (lambda: marginops.MagFace(u_m=4), "MagFace.u_m"),
        (lambda: marginops.MagFace(l_m=-1), "MagFace.l_m"),
        (lambda: marginops.MagFace(l_m=0.9, u_m=0.8), "MagFace.l_m"),
        (lambda: marginops.MagFace(lambda_g=INF), "MagFace.lambda_g"),
        (lambda: marginops.CosFace(m=NAN), "CosFace.m"),
        (lambda: marginops.CosFace(m=INF), "CosFace.m"),
        (lambda: marginops.AdaFace(m=NAN), "AdaFace.m"),
        (lambda: marginops.AdaFace(h=NAN), "AdaFace.h"),
        (lambda: marginops.AdaFace(batch_std=INF), "AdaFace.batch_std"),
        (lambda: marginops.ArcFace(m=NAN), "ArcFace.m"),
        (lambda: marginops.CurricularFace(t=NAN), "CurricularFace.t"),
        (lambda: mnn.CurricularFaceLoss(8, 10, alpha=2.0), "CurricularFaceLoss.alpha"),
        (lambda: mnn.CurricularFaceLoss(8, 10, alpha=NAN), "CurricularFaceLoss.alpha"),
        (lambda: mnn.SphereFaceLoss(8, 10, gamma=NAN), "SphereFaceLoss.gamma"),
        (lambda: mnn.MagFaceLoss(8, 10, u_m=4), "MagFace.u_m"),
        (lambda: mnn.AdaFaceLoss(8, 10, t_alpha=1.5), "AdaFace.t_alpha"),
        (lambda: mnn.ArcFaceLoss(8, 10, backend="gpu"), "backend"),
        (lambda: mnn.ArcFaceLoss(8, 10, reduction="avg"), "reduction"),
        (lambda: mnn.CosFaceLoss(8, 10, interclass_filtering_threshold=NAN), "interclass_filtering_threshold"),
    ],
)
def test_out_of_range_parameters_rejected_at_construction(build, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        build()


def test_published_recipes_accepted():
    marginops.ArcFace(s=64.0, m=0.5)
    marginops.CosFace(s=64.0, m=0.35)
    marginops.CosFace(s=64.0, m=0.4)
    marginops.CosFace(s=30.0, m=-0.2)  # negative margins are a published variant
    marginops.CombinedMargin(s=64.0, m1=1.0, m2=0.3, m3=0.2)
    marginops.CombinedMargin(s=64.0, m1=0.9, m2=0.4, m3=0.15)
    marginops.SubCenterArcFace(s=64.0, m=0.5, k=3)
    marginops.MagFace(s=64.0, l_a=10, u_a=110, l_m=0.45, u_m=0.8, lambda_g=35)
    marginops.AdaFace(s=64.0, m=0.4, h=0.333, t_alpha=0.01)
    marginops.ElasticFace(s=64.0, m=0.5, std=0.05, kind="arc")
    marginops.ElasticFace(s=64.0, m=0.35, std=0.05, kind="cos")
    marginops.CurricularFace(s=64.0, m=0.5)
    marginops.SphereFace(m=4)
    pml.ArcFaceLoss(10, 8, margin=28.6, scale=64)
    pml.CosFaceLoss(10, 8, margin=0.35, scale=64)
    mnn.CurricularFaceLoss(8, 10, alpha=0.01)
    mnn.CosFaceLoss(8, 10, interclass_filtering_threshold=0.3)


# ----------------------------------------------------------------------------------------------------------
# labels of every integer dtype


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_uint8_labels_out_of_range_get_the_clear_message(backend):
    x, w, _ = _problem(B=4, C=10)
    for bad in (156, 200, 255, 10):
        y = torch.tensor([1, bad, 3, 4], dtype=torch.uint8)
        with pytest.raises(ValueError, match=rf"labels out of range.*= {bad}"):
            marginops.margin_cross_entropy(x, w, y, marginops.ArcFace(), backend=backend)


@pytest.mark.parametrize(
    "dtype",
    [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64],
)
def test_every_integer_label_dtype_gives_the_int64_loss(dtype):
    x, w, y = _problem(B=5, C=10)
    expected = marginops.margin_cross_entropy(x, w, y, marginops.ArcFace(s=16.0), backend="cpu")
    actual = marginops.margin_cross_entropy(x, w, y.to(dtype), marginops.ArcFace(s=16.0), backend="cpu")
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_int8_labels_with_ignore_index():
    x, w, y = _problem(B=5, C=10)
    y8 = y.to(torch.int8)
    y8[2] = -100
    y64 = y.clone()
    y64[2] = -100
    margin = marginops.CosFace(s=16.0)
    torch.testing.assert_close(
        marginops.margin_cross_entropy(x, w, y8, margin, backend="reference"),
        marginops.margin_cross_entropy(x, w, y64, margin, backend="reference"),
        rtol=0,
        atol=0,
    )


def test_float_labels_message_lists_every_accepted_dtype():
    x, w, y = _problem()
    with pytest.raises(TypeError) as raised:
        marginops.margin_cross_entropy(x, w, y.float(), marginops.ArcFace(), backend="reference")
    for name in ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64"):
        assert name in str(raised.value)


# ----------------------------------------------------------------------------------------------------------
# AdaFace's norm statistics in float64 for float64 inputs


def test_adaface_statistics_in_float64():
    module = mnn.AdaFaceLoss(8, 10, s=16.0, backend="reference").double().train()
    x, _, y = _problem(B=6)
    x = x * torch.linspace(0.5, 30.0, 6, dtype=torch.float64)[:, None]
    mean, std = torch.tensor(20.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)
    for step in range(3):
        xs = x * (1.0 + 0.1 * step)
        module(xs, y)
        norms = torch.linalg.vector_norm(xs, dim=1).clamp(0.001, 100.0)
        mean = mean * (1 - 0.01) + 0.01 * norms.mean()
        std = std * (1 - 0.01) + 0.01 * norms.std()
        assert module.batch_mean.dtype == torch.float64
        torch.testing.assert_close(module.batch_mean, mean, rtol=1e-15, atol=0)
        torch.testing.assert_close(module.batch_std, std, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------------------
# pml drop-in: labels required (ValueError, as pml), SubCenterArcFaceLoss with get_outliers


@pytest.mark.parametrize(
    "make",
    [
        lambda: pml.ArcFaceLoss(10, 8),
        lambda: pml.CosFaceLoss(10, 8),
        lambda: pml.SphereFaceLoss(10, 8),
        lambda: pml.SubCenterArcFaceLoss(num_classes=10, embedding_size=8),
    ],
    ids=["arcface", "cosface", "sphereface", "subcenter"],
)
def test_pml_losses_without_labels_raise_value_error(make):
    loss_fn = make()
    emb = torch.randn(6, 8)
    pairs = (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0, 1]), torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="labels are required"):
        loss_fn(emb, indices_tuple=pairs)
    with pytest.raises(ValueError, match="labels are required"):
        loss_fn(emb)


def _pulled(B, D, W, k, labels, gen):
    """Embeddings near one of their class's sub-centers (W: (D, C·k))."""
    which = torch.randint(0, k, (B,), generator=gen)
    return torch.randn(B, D, generator=gen, dtype=torch.float64) * 0.5 + W[:, labels * k + which].t() * 2.0


@pytest.mark.parametrize("sub_centers", [1, 3, 4])
def test_pml_subcenter_arcface_loss_and_logits(sub_centers):
    gen = torch.Generator().manual_seed(sub_centers)
    C, D, B, margin, scale = 10, 12, 32, 30.0, 16.0
    loss_fn = pml.SubCenterArcFaceLoss(
        margin=margin, scale=scale, num_classes=C, embedding_size=D, sub_centers=sub_centers, backend="reference"
    ).double()
    assert tuple(loss_fn.W.shape) == (D, C * sub_centers) and loss_fn.num_classes == C
    labels = torch.randint(0, C, (B,), generator=gen)
    emb = _pulled(B, D, loss_fn.W.detach(), sub_centers, labels, gen)
    loss = loss_fn(emb, labels)

    # pml's definition, written out: closest sub-center per class, cos(θ + m) on the target, cross-entropy
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(loss_fn.W.detach(), dim=0)
    cos = cos.view(B, C, sub_centers).amax(dim=2)
    logits = cos.clone()
    rows = torch.arange(B)
    logits[rows, labels] = torch.cos(torch.acos(cos[rows, labels].clamp(-1, 1)) + math.radians(margin))
    expected = torch.nn.functional.cross_entropy(logits * scale, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_fn.get_logits(emb), cos * scale, rtol=1e-12, atol=1e-12)

    if sub_centers == 1:
        plain = pml.ArcFaceLoss(C, D, margin=margin, scale=scale, backend="reference").double()
        with torch.no_grad():
            plain.W.copy_(loss_fn.W)
        torch.testing.assert_close(plain(emb, labels), loss, rtol=1e-13, atol=0)


def _outliers_by_loop(W, k, emb, labels, threshold):
    """Straightforward per-class version of Sub-center ArcFace's cleaning step (pml semantics)."""
    D, Ck = W.shape
    C = Ck // k
    outliers, dominant = [], torch.zeros(D, C, dtype=emb.dtype)
    x = torch.nn.functional.normalize(emb, dim=1)
    for c in range(C):
        idx = [i for i in range(len(labels)) if int(labels[i]) == c]
        if not idx:
            continue
        centers = torch.nn.functional.normalize(W[:, c * k : (c + 1) * k], dim=0)
        sims = x[idx] @ centers
        counts = [0] * k
        for j in sims.argmax(dim=1).tolist():
            counts[j] += 1
        best = counts.index(max(counts))
        dominant[:, c] = W[:, c * k + best]
        outliers += [i for i, s in zip(idx, sims[:, best].tolist()) if s < math.cos(math.radians(threshold))]
    return outliers, dominant


@pytest.mark.parametrize("threshold", [75, 90, 180])
def test_pml_subcenter_get_outliers(threshold):
    gen = torch.Generator().manual_seed(threshold)
    C, D, B, k = 7, 6, 40, 3
    loss_fn = pml.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, sub_centers=k).double()
    labels = torch.randint(0, C - 1, (B,), generator=gen)  # class C-1 absent
    emb = _pulled(B, D, loss_fn.W.detach(), k, labels, gen)
    emb[::5] = torch.randn(len(emb[::5]), D, generator=gen, dtype=torch.float64)  # some far from every center
    outliers, dominant = loss_fn.get_outliers(emb, labels, threshold=threshold)
    expected_outliers, expected_dominant = _outliers_by_loop(loss_fn.W.detach(), k, emb, labels, threshold)
    assert outliers.dtype == torch.long
    assert outliers.tolist() == expected_outliers
    if threshold == 180:
        assert outliers.numel() == 0
    else:
        assert 0 < outliers.numel() < B
    assert tuple(dominant.shape) == (D, C)
    torch.testing.assert_close(dominant, expected_dominant, rtol=0, atol=0)
    pair = loss_fn.get_outliers(emb, labels, threshold=threshold, return_dominant_centers=False)
    assert len(pair) == 2 and pair.outliers.tolist() == expected_outliers  # pml returns the pair either way


# ----------------------------------------------------------------------------------------------------------
# ElasticFace+: the rank pairing (default) and the official code's pairing, reachable for reproductions


def _official_elastic_plus(cos, drawn):
    """fdbtrs/ElasticFace's ElasticFace+ assignment, written out: row i gets sorted_m[argsort_desc(cos)[i]]."""
    order = sorted(range(len(cos)), key=lambda i: -cos[i])
    ascending = sorted(drawn)
    return [ascending[order[i]] for i in range(len(cos))]


def test_elasticface_plus_assignments():
    c = torch.tensor(
        [0.1, 0.9, 0.5, 0.3, 0.7], dtype=torch.float64
    )  # argsort desc = [1, 4, 2, 3, 0], not an involution
    std, m = 0.05, 0.5
    gen = torch.Generator().manual_seed(3)
    drawn = (torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * std + m).tolist()
    rank = marginops.ElasticFace(m=m, std=std, plus=True, generator=gen).row_margins(c)
    ascending = sorted(drawn)
    by_cos_desc = sorted(range(5), key=lambda i: -float(c[i]))
    for k, row in enumerate(by_cos_desc):  # k-th highest cosine: k-th smallest margin
        assert float(rank[row]) == ascending[k]
    gen.manual_seed(3)
    official = marginops.ElasticFace(m=m, std=std, plus=True, generator=gen, plus_assignment="official").row_margins(c)
    assert official.tolist() == _official_elastic_plus(c.tolist(), drawn)
    assert official.tolist() != rank.tolist()
    with pytest.raises(ValueError, match="plus_assignment"):
        marginops.ElasticFace(plus=True, plus_assignment="paper")
    module = mnn.ElasticFaceLoss(8, 10, plus=True, plus_assignment="official")
    assert module.margin().plus_assignment == "official"


# ----------------------------------------------------------------------------------------------------------
# the benchmark's default output is untracked: running the README's main command leaves the clone clean


def _bench():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.append(str(root))
    import bench.__main__ as runner
    from bench import plot, results

    def ignored(path) -> bool:
        rel = Path(path).resolve().relative_to(root)
        return subprocess.run(["git", "check-ignore", "-q", str(rel / "x.csv")], cwd=root).returncode == 0

    return runner, plot, results, ignored, root


def test_bench_default_output_is_ignored_by_git():
    if not __import__("shutil").which("git"):
        pytest.skip("git not installed")
    runner, plot, results, ignored, root = _bench()
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    args = runner.build_parser().parse_args([])
    assert ignored(runner.output_dir(args)), runner.output_dir(args)
    assert runner.output_dir(runner.build_parser().parse_args(["--record"])) == results.RESULTS_DIR
    assert not ignored(results.RESULTS_DIR)
    with pytest.raises(SystemExit):
        runner.output_dir(runner.build_parser().parse_args(["--record", "--out", "x"]))


def test_bench_main_command_leaves_the_committed_results_alone(monkeypatch):
    import subprocess

    runner, plot, results, ignored, root = _bench()
    committed = {p: p.read_bytes() for p in results.RESULTS_DIR.iterdir() if p.is_file()}
    monkeypatch.setattr(runner, "run_case", lambda spec, timeout: __import__("bench.cases").cases.run(spec))
    argv = [
        "--sizes",
        "8x300x16,8x600x16",
        "--backends",
        "reference",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--min-seconds",
        "0",
    ]
    assert runner.main(argv) == 0
    assert plot.main([]) == 0
    after = {p: p.read_bytes() for p in results.RESULTS_DIR.iterdir() if p.is_file()}
    assert after == committed
    if (root / ".git").exists() and __import__("shutil").which("git"):
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "bench/results"], cwd=root, capture_output=True, text=True
        ).stdout
        assert status == "", status


def test_bench_plot_names_cut_the_device_at_a_word():
    _, plot, _, _, _ = _bench()
    name = plot.file_name(
        "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz, 2 cores, 2 threads",
        "float32-b-128-d-128",
        "forward+backward",
        "num_classes",
    )
    device, full = name.split("_")[0], "intel-r-xeon-r-platinum-8375c-cpu-2-90ghz-2-cores-2-threads"
    assert len(device) <= 40 and full.startswith(device + "-"), name  # whole words only
    assert plot.file_name("amd-epyc 2 cores 2 threads", "x", "forward", "batch").startswith(
        "amd-epyc-2-cores-2-threads_"
    )


# ----------------------------------------------------------------------------------------------------------
# AdaFace's and CurricularFace's statistics: masked, without data-dependent branches (torch.compile fullgraph:
# tests/test_compile.py)


def test_adaface_and_curricular_statistics_skip_batches_without_counted_rows():
    ada = mnn.AdaFaceLoss(8, 10, s=16.0, backend="reference").double().train()
    cur = mnn.CurricularFaceLoss(8, 10, s=16.0, backend="reference").double().train()
    x, _, y = _problem()
    cur(x, y)
    t, mean, std = cur.t.clone(), ada.batch_mean.clone(), ada.batch_std.clone()
    ignored = torch.full_like(y, -100)
    for module in (ada, cur):
        with torch.no_grad():
            module.update_state(x, ignored)
    assert torch.equal(cur.t, t) and torch.equal(ada.batch_mean, mean) and torch.equal(ada.batch_std, std)
    one = ignored.clone()
    one[0] = 1
    with torch.no_grad():
        ada.update_state(x, one)  # one counted row: the mean moves, the (unbiased) std cannot
    assert not torch.equal(ada.batch_mean, mean) and torch.equal(ada.batch_std, std)


# ----------------------------------------------------------------------------------------------------------
# 16-bit on the CPU: backend="auto" with bf16/fp16 inputs (autocast: tests/test_mixed_precision.py)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_cpu_inputs_run_on_the_cpu_kernels(dtype):
    """bf16 / fp16 on the CPU: backend="auto" runs the C++ kernels (no warning, no materialized logits), with the
    loss and gradients in the input dtype, close to the float64 loss of the rounded inputs."""
    import warnings

    x, w, y = _problem(B=9, C=40, D=16, dtype=torch.float32)
    x, w = x.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True)
    margin = marginops.ArcFace(s=16.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = marginops.margin_cross_entropy(x, w, y, margin, backend="auto")
    same = marginops.margin_cross_entropy(x, w, y, margin, backend="cpu")
    torch.testing.assert_close(loss, same, rtol=0, atol=0)
    truth = marginops.margin_cross_entropy(x.detach().double(), w.detach().double(), y, margin, backend="reference")
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), truth, rtol=1e-2, atol=0)
    loss.backward()
    assert x.grad.dtype == w.grad.dtype == dtype
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
