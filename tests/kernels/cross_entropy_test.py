"""codex_ml.ops.linear_cross_entropy and cross_entropy against a float64 PyTorch reference.

Error bounds (relative L2 error of the loss and of each gradient against float64):
fp32 inputs 1e-5; bf16 inputs 2e-2 (bf16 rounding of inputs/outputs; arithmetic is fp32 inside).
"""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from references import (  # noqa: F401 (autouse fixture)
    cross_entropy_reference,
    onednn_runs_fp32,
    poison_uninitialized_memory,
    rel_err,
    run_with_cpu_capability,
    run_with_env,
)

from codex_ml.ops import cross_entropy, linear_cross_entropy
from codex_ml.ops.dispatch import load_extension

# The module (codex_ml.ops.cross_entropy, as an attribute of codex_ml.ops, is the function).
loss_module = importlib.import_module("codex_ml.ops.cross_entropy")

BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
IMPLS = ["cpu", "torch", "triton"]


def reference(h, w, b, t, **options):
    return cross_entropy_reference(F.linear(h, w, b), t, **options)


def run_case(n, h, v, *, dtype=torch.float32, impl="cpu", reduction="mean", bias=True, ignore="some",
             label_smoothing=0.0, z_loss=0.0, softcap=None, scale=1.0, accum_dtype=torch.float32):
    hidden = (torch.randn(n, h) * scale).to(dtype).requires_grad_()
    weight = torch.randn(v, h).div(h ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(v).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, v, (n,))
    if ignore == "some":
        target[::3] = -100
    elif ignore == "all":
        target[:] = -100
    loss = linear_cross_entropy(hidden, weight, target, bias=b, reduction=reduction, label_smoothing=label_smoothing,
                                z_loss=z_loss, logit_softcap=softcap, accum_dtype=accum_dtype, impl=impl)
    grad_out = torch.randn_like(loss)
    params = [hidden, weight] + ([b] if bias else [])
    for p in params:  # poisoned: a gradient that is never written stays NaN and fails
        p.grad = None
    grads = torch.autograd.grad((loss * grad_out).sum(), params)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref = reference(ref_params[0], ref_params[1], ref_params[2] if bias else None, target, reduction=reduction,
                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    ref_grads = torch.autograd.grad((ref * grad_out.double()).sum(), ref_params)
    return loss, ref, grads, ref_grads


# The C++ kernel's chunks of many rows: test_cpu_kernel_in_many_chunks.
SHAPES = [(1, 3, 1), (7, 64, 2), (1000, 64, 1000), (7, 768, 32003), (1000, 3, 1000), (600, 48, 20011)]
# The Triton interpreter runs the kernel in Python: small shapes only here (the GPU test runs large ones).
CASES = [(impl, *shape) for impl in IMPLS for shape in SHAPES if impl != "triton" or shape[0] * shape[2] <= 100_000]


@pytest.mark.parametrize("impl,n,h,v", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(impl, n, h, v, reduction):
    torch.manual_seed(n * 7 + h + v)
    loss, ref, grads, ref_grads = run_case(n, h, v, impl=impl, reduction=reduction)
    assert torch.isfinite(loss).all()
    assert rel_err(loss.detach(), ref.detach()) < BOUNDS[torch.float32]
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert rel_err(g, r) < BOUNDS[torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [
    {"label_smoothing": 0.1}, {"z_loss": 1e-3}, {"softcap": 5.0},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 30.0, "bias": False},
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options(impl, options, reduction):
    torch.manual_seed(1)
    loss, ref, grads, ref_grads = run_case(33, 48, 517, impl=impl, reduction=reduction, **options)
    assert rel_err(loss.detach(), ref.detach()) < BOUNDS[torch.float32]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < BOUNDS[torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs(impl):
    torch.manual_seed(2)
    loss, ref, grads, ref_grads = run_case(65, 64, 1000, dtype=torch.bfloat16, impl=impl)
    assert loss.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
    assert rel_err(loss.detach().float(), ref.detach()) < BOUNDS[torch.bfloat16]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g.float(), r) < BOUNDS[torch.bfloat16]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype,accum_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_many_chunks(monkeypatch, impl, dtype, accum_dtype, reduction):
    """7-row chunks (the last one partial), as large inputs get on any device: each chunk's gradient rows, and
    grad_weight and grad_bias accumulated across the chunks (in fp32, or in bf16 where asked), still match
    float64 (fp32 and the bf16 path)."""
    monkeypatch.setattr(loss_module, "_chunk_size", lambda v, device: 7)
    fp32_sums = []
    addmm_fp32 = loss_module._addmm_fp32
    monkeypatch.setattr(loss_module, "_addmm_fp32", lambda *args: fp32_sums.append(1) or addmm_fp32(*args))
    torch.manual_seed(5)
    loss, ref, grads, ref_grads = run_case(40, 32, 300, dtype=dtype, impl=impl, reduction=reduction,
                                           accum_dtype=accum_dtype)
    # The bf16 path sums in fp32 once per chunk (6 chunks: in the fused forward, or for "none" in the backward)
    # unless asked not to.
    assert len(fp32_sums) == (6 if dtype == torch.bfloat16 and accum_dtype == torch.float32 else 0)
    assert rel_err(loss.detach().float(), ref.detach()) < BOUNDS[dtype]
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert rel_err(g.float(), r) < BOUNDS[dtype]


@pytest.mark.parametrize("options", [
    {}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 30.0},
])
def test_cpu_kernel_in_many_chunks(options):
    """The C++ kernel in 7-row chunks (the last one partial; its default is 128 MiB of logits, one chunk for the
    shapes above): each chunk's loss, lse and grad_hidden rows, and grad_weight and grad_bias summed across the
    chunks, against float64, with a different scale per row and ignored rows."""
    load_extension("cross_entropy")
    torch.manual_seed(6)
    n, h, v = 40, 32, 300
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64).div(h ** 0.5).requires_grad_()
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, v, (n,))
    target[::5] = -100
    row_scale = torch.rand(n)
    smoothing, z_loss, softcap = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0), options.get("softcap")
    loss, lse, gh, gw, gb = torch.ops.codex_ml_cpu.linear_cross_entropy(
        hidden.detach().float(), weight.detach().float(), bias.detach().float(), target, row_scale, -100, smoothing,
        z_loss, softcap or 0.0, chunk_rows=7)
    ref = cross_entropy_reference(F.linear(hidden, weight, bias), target, reduction="none", label_smoothing=smoothing,
                                  z_loss=z_loss, softcap=softcap)
    ref_grads = torch.autograd.grad((ref * row_scale.double()).sum(), [hidden, weight, bias])
    assert rel_err(loss, ref.detach()) < BOUNDS[torch.float32]
    z = F.linear(hidden, weight, bias).detach()
    z = softcap * torch.tanh(z / softcap) if softcap else z
    ref_lse = torch.where(target != -100, torch.logsumexp(z, -1), 0.0)
    assert rel_err(lse, ref_lse) < BOUNDS[torch.float32]
    for g, r in zip((gh, gw, gb), ref_grads):
        assert rel_err(g, r) < BOUNDS[torch.float32]


def test_cpu_kernel_refuses_negative_chunk_rows():
    load_extension("cross_entropy")
    args = (torch.randn(3, 4), torch.randn(5, 4), None, torch.zeros(3, dtype=torch.long), None, -100, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="chunk_rows must be >= 0"):
        torch.ops.codex_ml_cpu.linear_cross_entropy(*args, chunk_rows=-1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_follows_f_linear(monkeypatch, impl, reduction):
    """Under torch.autocast (bf16) on fp32 parameters, as in mixed-precision training: the chunked algorithm runs
    its products in bf16, as autocast's F.linear would (the C++ CPU kernel keeps fp32), the loss is fp32 as
    autocast's F.cross_entropy gives, the gradients are fp32 like the parameters, and all match float64."""
    dtypes = []
    chunked = loss_module._chunked
    # args[-2] is the products' dtype (then accum_dtype).
    monkeypatch.setattr(loss_module, "_chunked", lambda *args: dtypes.append(args[-2]) or chunked(*args))
    torch.manual_seed(6)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = (torch.randn(300, 32) / 32 ** 0.5).requires_grad_()
    target = torch.randint(0, 300, (40,))
    target[::5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, target, reduction=reduction, impl=impl)
    assert loss.dtype == torch.float32
    grad_out = torch.randn_like(loss)
    grads = torch.autograd.grad((loss * grad_out).sum(), [hidden, weight])
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    assert set(dtypes) == (set() if impl == "cpu" else {torch.bfloat16}) and (impl == "cpu" or dtypes)
    ref_params = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    ref = reference(*ref_params, None, target, reduction=reduction)
    ref_grads = torch.autograd.grad((ref * grad_out.double()).sum(), ref_params)
    assert rel_err(loss.detach(), ref.detach()) < BOUNDS[torch.bfloat16]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < BOUNDS[torch.bfloat16]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_gives_zero_loss_and_gradients(impl, reduction):
    loss, _, grads, _ = run_case(9, 16, 40, impl=impl, reduction=reduction, ignore="all")
    assert torch.all(loss == 0)
    for g in grads:
        assert torch.all(g == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_of_all_ignored_targets_is_zero_not_nan(impl):
    logits = torch.randn(7, 33, requires_grad=True)
    loss = cross_entropy(logits, torch.full((7,), -100), impl=impl)
    loss.backward()
    assert loss.item() == 0 and torch.all(logits.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_logits_stay_finite_and_right(impl):
    torch.manual_seed(3)
    loss, ref, grads, ref_grads = run_case(17, 8, 300, impl=impl, scale=3e3)  # logits ~1e4
    assert ref.abs().item() > 1e3
    assert torch.isfinite(loss).all() and rel_err(loss.detach(), ref.detach()) < BOUNDS[torch.float32]
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and rel_err(g, r) < 1e-4


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_plain_backward_uses_the_held_gradients_and_can_run_twice(impl):
    """loss.backward() (grad_output 1) hands the gradients computed in the forward pass to autograd without a
    copy; they must still be right, and a retained graph must give the same gradients a second time."""
    torch.manual_seed(5)
    hidden = torch.randn(33, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    target = torch.randint(0, 101, (33,))
    target[::4] = -100
    logits = torch.randn(33, 101, requires_grad=True)
    for loss, params, ref_fn in (
        (linear_cross_entropy(hidden, weight, target, impl=impl), [hidden, weight],
         lambda h, w: reference(h, w, None, target, reduction="mean")),
        (cross_entropy(logits, target, impl=impl), [logits],
         lambda z: F.cross_entropy(z, target, ignore_index=-100)),
    ):
        loss.backward(retain_graph=True)
        first = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        loss.backward()
        ref_params = [p.detach().double().requires_grad_() for p in params]
        ref_fn(*ref_params).backward()
        for p, g, r in zip(params, first, ref_params):
            assert torch.equal(p.grad, g)
            assert rel_err(g, r.grad) < BOUNDS[torch.float32]


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_retained_graph_backward_accumulates_like_the_reference(impl):
    """Three backward passes through a retained graph accumulate 3x the gradient, and zeroing .grad in place
    between passes (zero_grad(set_to_none=False)) changes nothing held by the graph."""
    torch.manual_seed(15)
    hidden, weight = torch.randn(9, 8, requires_grad=True), torch.randn(21, 8, requires_grad=True)
    logits = torch.randn(9, 21, requires_grad=True)
    target = torch.randint(0, 21, (9,))
    for make, params in ((lambda: linear_cross_entropy(hidden, weight, target, impl=impl), [hidden, weight]),
                         (lambda: cross_entropy(logits, target, impl=impl), [logits])):
        once = torch.autograd.grad(make(), params)
        loss = make()
        for _ in range(3):
            loss.backward(retain_graph=True)
        for p, g in zip(params, once):
            torch.testing.assert_close(p.grad, 3 * g)
            p.grad.zero_()
        loss.backward()
        for p, g in zip(params, once):
            torch.testing.assert_close(p.grad, g)
            p.grad = None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_derivatives_are_refused_not_zero(reduction):
    h, w = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    z, t = torch.randn(5, 7, requires_grad=True), torch.randint(0, 7, (5,))
    for loss, inputs in ((linear_cross_entropy(h, w, t, reduction=reduction).sum(), [h, w]),
                         (cross_entropy(z, t, reduction=reduction).sum(), [z])):
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(loss, inputs, create_graph=True)


def test_z_loss_is_reported_separately():
    torch.manual_seed(4)
    h, w, t = torch.randn(20, 8), torch.randn(50, 8), torch.randint(0, 50, (20,))
    loss, z_term = linear_cross_entropy(h, w, t, z_loss=1e-2, return_z_loss=True)
    plain = linear_cross_entropy(h, w, t)
    expected = 1e-2 * (torch.logsumexp(h @ w.T, -1) ** 2).mean()
    torch.testing.assert_close(z_term, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, plain + expected, rtol=1e-5, atol=0)
    # The term is for logging: detached (its gradient is in the loss's), never a silently zero gradient.
    _, z_term = linear_cross_entropy(h.requires_grad_(), w, t, z_loss=1e-2, return_z_loss=True)
    assert not z_term.requires_grad
    _, z_term = cross_entropy((h @ w.T).detach().requires_grad_(), t, z_loss=1e-2, return_z_loss=True)
    assert not z_term.requires_grad


def test_non_contiguous_inputs_are_handled():
    torch.manual_seed(5)
    h = torch.randn(16, 40)[:, ::2]
    w = torch.randn(20, 33).t()  # [33, 20], not contiguous
    t = torch.randint(0, 33, (16,))
    assert not h.is_contiguous() and not w.is_contiguous()
    torch.testing.assert_close(linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.T, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_on_logits(reduction, impl):
    torch.manual_seed(6)
    logits = torch.randn(50, 1001, requires_grad=True)
    target = torch.randint(0, 1001, (50,))
    target[::4] = -100
    loss = cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1, impl=impl)
    grad_out = torch.randn_like(loss)
    (g,) = torch.autograd.grad((loss * grad_out).sum(), [logits])
    ref_logits = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_logits, target, reduction=reduction, label_smoothing=0.1)
    (ref_g,) = torch.autograd.grad((ref * grad_out.double()).sum(), [ref_logits])
    assert rel_err(loss.detach(), ref.detach()) < 1e-5
    assert rel_err(g, ref_g) < 1e-5


@pytest.mark.parametrize("bad, message", [
    (lambda h, w, t: (h, w[:, :5], t), "features"),
    (lambda h, w, t: (h, w, t[:3]), "target must have shape"),
    (lambda h, w, t: (h, w, t.int()), "int64"),
    (lambda h, w, t: (h, w.to(torch.int32), t), "floating"),
    (lambda h, w, t: (h, w, torch.full_like(t, 10_000)), "out of range"),
    (lambda h, w, t: (h[:0], w, t[:0]), "N = 0"),
    (lambda h, w, t: (h, w, t.to("meta")), "device"),
])
def test_bad_input_gets_a_clear_error(bad, message):
    h, w, t = torch.randn(6, 8), torch.randn(10, 8), torch.randint(0, 10, (6,))
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(*bad(h, w, t))


def test_bad_options_get_a_clear_error():
    h, w, t = torch.randn(6, 8), torch.randn(10, 8), torch.randint(0, 10, (6,))
    with pytest.raises(ValueError, match="accum_dtype"):
        linear_cross_entropy(h, w, t, accum_dtype=torch.float64)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(h, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss must be a finite"):
        linear_cross_entropy(h, w, t, z_loss=float("nan"))
    with pytest.raises(ValueError, match="logit_softcap must be a finite"):
        cross_entropy(h @ w.T, t, logit_softcap=float("nan"))
    with pytest.raises(ValueError, match="impl"):
        linear_cross_entropy(h, w, t, impl="cuda")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    torch.manual_seed(7)
    h = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(30, 16, requires_grad=True)
    b = torch.randn(30, requires_grad=True)
    t = torch.randint(0, 30, (12,))
    fused = reduction != "none"
    torch.library.opcheck(torch.ops.codex_ml.linear_cross_entropy.default,
                          (h, w, b, t, -100, reduction, 0.1, 1e-3, 0.0, fused, "cpu", None, None))
    # As under torch.autocast: bf16 products, an fp32 loss.
    torch.library.opcheck(torch.ops.codex_ml.linear_cross_entropy.default,
                          (h, w, b, t, -100, reduction, 0.1, 1e-3, 0.0, fused, "torch", torch.bfloat16, None))
    # bf16 inputs summing grad_weight in bf16.
    hb, wb, bb = (x.detach().bfloat16().requires_grad_() for x in (h, w, b))
    torch.library.opcheck(torch.ops.codex_ml.linear_cross_entropy.default,
                          (hb, wb, bb, t, -100, reduction, 0.1, 1e-3, 0.0, fused, "torch", None, torch.bfloat16))
    logits = torch.randn(12, 30, requires_grad=True)
    torch.library.opcheck(torch.ops.codex_ml.cross_entropy.default,
                          (logits, t, -100, reduction, 0.0, 0.0, 0.0, fused, "torch"))
    # Strided inputs: the gradients' layout must be the fake's (what torch.compile's inductor relies on).
    logits_t = torch.randn(30, 12).t().requires_grad_()
    torch.library.opcheck(torch.ops.codex_ml.cross_entropy.default,
                          (logits_t, t, -100, reduction, 0.0, 0.0, 0.0, fused, "torch"))
    w_t = torch.randn(16, 30).t().requires_grad_()
    for impl in ("cpu", "torch"):
        torch.library.opcheck(torch.ops.codex_ml.linear_cross_entropy.default,
                              (h, w_t, b, t, -100, reduction, 0.0, 0.0, 0.0, fused, impl, None, None))


def test_compiles_with_fullgraph():
    torch.manual_seed(8)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)
            self.out = torch.nn.Linear(16, 40, bias=False)

        def forward(self, x, t):
            return linear_cross_entropy(torch.relu(self.proj(x)), self.out.weight, t)

    model = Head()
    x, t = torch.randn(10, 16), torch.randint(0, 40, (10,))
    eager = model(x, t)
    eager.backward()
    eager_grad = model.proj.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(model.proj.weight.grad, eager_grad)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_narrower_cpu_paths_match_the_reference(capability):
    """This machine takes the AVX-512 row loops; the AVX2 and plain ones run in a subprocess with ATEN_CPU_CAPABILITY
    capping the choice (row lengths with every tail: V % 16 in {1, 2, 8, 3})."""
    run_with_cpu_capability(capability, __file__, "cpu and not narrower and (test_matches_float64_reference or "
                                                  "test_options or test_huge_logits or test_cross_entropy_on_logits)")


def test_the_other_cpu_gemm_backend_matches_the_reference():
    """The C++ kernel's products go to oneDNN or ATen's MKL by CPU vendor (kernels/common/cpu_gemm.h); the one
    this machine does not pick by default runs in a subprocess with CODEX_CPU_GEMM naming it."""
    linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), impl="cpu")
    torch.ops.codex_ml.linear(torch.randn(1, 1), torch.randn(1, 1), None)  # loads the extension that reports it
    other = "aten" if torch.ops.codex_ml_cpu.cpu_gemm_onednn() else "onednn"
    if other == "onednn" and not onednn_runs_fp32():
        pytest.skip("PyTorch's oneDNN takes fp32 products only on CPUs with AVX-512; this one has none")
    run_with_env({"CODEX_CPU_GEMM": other}, __file__, "cpu and not narrower and not other_cpu_gemm and "
                  "(test_matches_float64_reference or test_options or test_huge_logits)")


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_targets_and_masked_vocabulary_blocks(impl):
    """A target that is a strided view (labels[:, 0]) is read by index, and a row whose first 1024 logits are
    -inf (masked tokens at the start of the vocabulary: the Triton kernel's whole first block) stays finite."""
    torch.manual_seed(16)
    logits = torch.randn(4, 2048)
    logits[:, :1024] = float("-inf")
    labels = torch.randint(1024, 2048, (4, 2))
    target = labels[:, 0]
    assert not target.is_contiguous()
    loss = cross_entropy(logits.requires_grad_(), target, reduction="none", impl=impl)
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach(), target.contiguous(), reduction="none"))
    h, w = torch.randn(4, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (4, 3))[:, 1]
    torch.testing.assert_close(linear_cross_entropy(h, w, t, impl=impl), F.cross_entropy(h @ w.T, t.contiguous()),
                               rtol=1e-5, atol=1e-6)



# fp16 gradients: the outputs are rounded to 11 bits and their smallest entries are subnormal in fp16.
FP16_GRAD_BOUND = 3e-3


def fp16_gradient_errors(n, v, impl, reduction, grad_scale):
    """Relative errors of grad_hidden and grad_weight of fp16 inputs against float64, the loss's gradient scaled by
    grad_scale per row. hidden and weight each carry a shared offset: it shifts all logits of a row alike (the
    softmax is unchanged) and makes the softmax part of each gradient cancel most of the target part, so that a
    softmax part rounded to 0 shows as a large error instead of a small share of the gradient's norm."""
    torch.manual_seed(n + v)
    h = 32
    hidden = (torch.randn(n, h) + 1).half().requires_grad_()
    weight = ((torch.randn(v, h) + 1) / h ** 0.5).half().requires_grad_()
    target = torch.randint(0, v, (n,))
    loss = linear_cross_entropy(hidden, weight, target, reduction=reduction, impl=impl)
    grads = torch.autograd.grad(loss.float().sum() * grad_scale, [hidden, weight])
    ref_params = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    ref = reference(*ref_params, None, target, reduction=reduction)
    ref_grads = torch.autograd.grad(ref.sum() * grad_scale, ref_params)
    return [rel_err(g, r) for g, r in zip(grads, ref_grads)]


def test_fp16_mean_gradients_do_not_underflow_at_large_n():
    """At N = 8192, V = 4096 a softmax probability over N (1/N of a "mean") is about 3e-8, below half of fp16's
    smallest subnormal: the rows' gradient in fp16 must not carry the 1/N (the products apply it)."""
    errors = fp16_gradient_errors(8192, 4096, "torch", "mean", 1.0)
    assert max(errors) < FP16_GRAD_BOUND, errors


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fp16_gradients_scaled_by_many_tokens_do_not_underflow(impl):
    """A per-token loss normalized by the tokens of many accumulated steps (grad_output 2^-12 per row) puts the same
    magnitudes (about 4e-9) into the rows' gradient at a few rows, which the Triton interpreter runs."""
    errors = fp16_gradient_errors(16, 16384, impl, "none", 2.0 ** -12)
    assert max(errors) < FP16_GRAD_BOUND, errors


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"ignore_index": 5}, {"label_smoothing": 0.1}, {"bias": True}],
                         ids=["ignore_-100", "ignore_5", "label_smoothing", "bias"])
def test_matches_pytorchs_chunked_op(impl, reduction, options):
    """Against a second reference: PyTorch's own chunked torch.nn.functional.linear_cross_entropy (with
    LinearCrossEntropyOptions; here its rows are split into chunks of a few rows), forward and backward (a random
    grad_output per row for "none"), on the options both support. Its chunked path takes no label smoothing and
    says so (a warning, then it runs F.linear + F.cross_entropy); it must not fall back on the other options."""
    torch.manual_seed(11)
    n, h, v = 24, 16, 301
    ignore_index = options.get("ignore_index", -100)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / h ** 0.5).requires_grad_()
    bias = torch.randn(v, requires_grad=True) if options.get("bias") else None
    target = torch.randint(0, v, (n,))
    target[::4] = ignore_index
    smoothing = options.get("label_smoothing", 0.0)
    params = [hidden, weight] + ([bias] if bias is not None else [])
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
                                label_smoothing=smoothing, impl=impl)
    grad_out = torch.randn_like(loss)
    grads = torch.autograd.grad((loss * grad_out).sum(), params)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref_bias = ref_params[2] if bias is not None else None
        ref = F.linear_cross_entropy(ref_params[0], ref_params[1], target, linear_bias=ref_bias,
                                     ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing,
                                     options=torch.nn.LinearCrossEntropyOptions())
        ref_grads = torch.autograd.grad((ref * grad_out).sum(), ref_params)
    fell_back = any("options`` ignored" in str(w.message) for w in caught)
    assert fell_back == (smoothing > 0), [str(w.message) for w in caught]
    assert rel_err(loss.detach(), ref.detach()) < 2 * BOUNDS[torch.float32]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 2 * BOUNDS[torch.float32]
