"""codex_ml.ops.linear (impl "cpu" = the C++ kernel on kernels/common/cpu_gemm.h, "torch" = F.linear) against a
float64 reference, forward and backward, on fresh random inputs with poisoned outputs, with each CPU matrix-product
backend (CODEX_CPU_GEMM=aten and onednn, each in its own process: the kernels read it once).

Error bound: relative L2 error of the output and of every gradient against float64, inputs rounded to fp32
first, at most 1e-5 (fp32 products of up to a few thousand terms are good to about 1e-6).
"""

import importlib
import os
import platform

import pytest
import torch
import torch.nn.functional as F
from references import (  # noqa: F401 (autouse fixture)
    onednn_runs_fp32,
    poison_uninitialized_memory,
    rel_err,
    run_with_env,
)

from codex_ml.models.gpt import GPT, GPTConfig
from codex_ml.ops import linear
from codex_ml.ops.dispatch import choose_impl

linear_module = importlib.import_module("codex_ml.ops.linear")  # (codex_ml.ops.linear, the attribute, is the op)

BOUND = 1e-5
# (x shape, out features): odd sizes, a single row, leading dims, sizes around oneDNN's and MKL's blocks.
SHAPES = [((1, 3), 1), ((7, 64), 1000), ((2, 5, 33), 17), ((300, 385), 129), ((4, 128, 384), 1024)]


def check(x, weight, bias, impl):
    """ops.linear and the gradients of every input that requires one, against float64."""
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    y = linear(x, weight, bias, impl=impl)
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == torch.float32
    g = torch.randn(y.shape)
    grads = torch.autograd.grad(y, inputs, g) if inputs else []
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
                  for t in (x, weight, bias)]
    ref = F.linear(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_inputs if t is not None and t.requires_grad], g.double()) \
        if inputs else []
    assert rel_err(y, ref) < BOUND, "output"
    for t, grad, r in zip(inputs, grads, ref_grads):
        assert grad.shape == t.shape and grad.dtype == t.dtype
        assert rel_err(grad, r) < BOUND, f"gradient of an input of shape {tuple(t.shape)}"


@pytest.mark.parametrize("impl", ["cpu", "torch"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape,out_features", SHAPES)
def test_matches_float64(impl, with_bias, shape, out_features):
    torch.manual_seed(hash((shape, out_features, with_bias)) % 2**31)
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(out_features, shape[-1], requires_grad=True)
    bias = torch.randn(out_features, requires_grad=True) if with_bias else None
    check(x, weight, bias, impl)


@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (False, False, False)])
def test_only_the_gradients_asked_for(wants):
    torch.manual_seed(1)
    x, weight, bias = torch.randn(90, 200), torch.randn(301, 200), torch.randn(301)  # 5.4M MACs: oneDNN's size
    for t, want in zip((x, weight, bias), wants):
        t.requires_grad_(want)
    if any(wants):
        check(x, weight, bias, "cpu")
    else:
        assert not linear(x, weight, bias, impl="cpu").requires_grad
    outputs = torch.ops.codex_ml_cpu.linear_backward(torch.randn(90, 301), x.detach(), weight.detach(), list(wants))
    for want, out, like in zip(wants, outputs, (x, weight, bias)):
        assert out.shape == (like.shape if want else (0,))


def test_strided_inputs():
    torch.manual_seed(2)
    # Big enough for oneDNN (cpu_gemm.h keeps products under 4M multiply-adds with ATen).
    x = torch.randn(400, 6, 30).transpose(0, 2).requires_grad_()  # [30, 6, 400], last dim strided
    weight = torch.randn(400, 300).t().requires_grad_()  # [300, 400] as a transposed view
    bias = torch.randn(600)[::2].requires_grad_()
    check(x, weight, bias, "cpu")
    x2 = torch.randn(400, 180).t().requires_grad_()  # 2-D: reaches the kernel as a transposed view
    check(x2, weight, bias, "cpu")


def test_second_derivatives_match_f_linear():
    torch.manual_seed(5)
    x, w, b = torch.randn(40, 30, requires_grad=True), torch.randn(20, 30, requires_grad=True), torch.randn(20)
    b.requires_grad_()

    def grad_of_grad(fn):
        y = fn(x, w, b)
        gx, gw = torch.autograd.grad((y ** 2).sum(), (x, w), create_graph=True)
        return torch.autograd.grad((gx ** 2).sum() + (gw ** 3).sum(), (x, w, b))

    for ours, theirs in zip(grad_of_grad(lambda *a: linear(*a, impl="cpu")), grad_of_grad(F.linear)):
        torch.testing.assert_close(ours, theirs)


def chosen(x, w, impl=None):
    """What linear runs for these inputs: the rule of codex_ml.ops.dispatch with linear's own requirements."""
    return choose_impl("linear", x.device, impl, lambda choice: linear_module._unfit(choice, x, w, None))


def test_environment_choice_of_cpu_leaves_other_inputs_to_f_linear(monkeypatch):
    monkeypatch.setenv("CODEX_ML_IMPL", "cpu")
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    assert chosen(x, w) == "cpu"
    torch.testing.assert_close(linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w).dtype == torch.bfloat16


def test_mkldnn_disabled_still_gives_the_product():
    torch.manual_seed(6)
    x, w = torch.randn(300, 128, requires_grad=True), torch.randn(257, 128, requires_grad=True)
    with torch.backends.mkldnn.flags(enabled=False):
        check(x, w, None, "cpu")


def test_empty_rows_and_zero_features():
    x, weight = torch.randn(0, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    y = linear(x, weight, impl="cpu")
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(weight.grad, torch.zeros(5, 8))
    x, weight, bias = torch.randn(4, 0, requires_grad=True), torch.randn(5, 0), torch.randn(5)
    torch.testing.assert_close(linear(x, weight, bias, impl="cpu"), bias.expand(4, 5))


def test_default_impl_and_what_goes_to_f_linear():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    assert chosen(x, w) == "cpu"
    assert chosen(x.bfloat16(), w.bfloat16()) == "torch"  # ATen's bf16 is oneDNN already
    assert chosen(x, w, "torch") == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert chosen(x, w) == "torch"
        assert linear(x, w).dtype == F.linear(x, w).dtype == torch.bfloat16  # autocast is followed


def test_bad_inputs_get_a_clear_error():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="weight must be \\[out_features, in_features\\]"):
        linear(x, w.t())
    with pytest.raises(ValueError, match="bias has shape"):
        linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="impl='cpu' takes fp32 CPU tensors"):
        linear(x.half(), w.half(), impl="cpu")
    with pytest.raises(ValueError, match="linear has no triton kernel"):
        linear(x, w, impl="triton")
    with pytest.raises(ValueError, match="unknown implementation"):
        linear(x, w, impl="mkl")
    with pytest.raises(ValueError, match="linear takes floating-point tensors, got x of dtype torch.bool"):
        linear(x > 0, w)
    with pytest.raises(ValueError, match="weight is torch.bfloat16 but x is torch.float32: pass them in one dtype"):
        linear(x, w.bfloat16())
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        linear(x, w, torch.randn(5, device="meta"))


def test_autocast_still_takes_mixed_dtypes_as_f_linear_does():
    x, w = torch.randn(3, 4), torch.randn(5, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(linear(x, w), F.linear(x, w))


def test_opcheck():
    torch.manual_seed(3)
    x, w, b = (torch.randn(6, 10, requires_grad=True), torch.randn(7, 10, requires_grad=True),
               torch.randn(7, requires_grad=True))
    torch.library.opcheck(torch.ops.codex_ml.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.codex_ml.linear.default, (x, w, None))
    torch.library.opcheck(torch.ops.codex_ml.linear_backward.default,
                          (torch.randn(6, 7), x.detach(), w.detach(), [True, False, True]))


def test_gpt_compiles_with_fullgraph_and_keeps_its_state_dict_keys():
    torch.manual_seed(4)
    config = GPTConfig(vocab_size=97, n_layer=1, n_head=2, n_kv_head=1, d_model=32, ffn_hidden=48, max_seq_len=16)
    model = GPT(config)
    assert {"blocks.0.attn.q_proj.weight", "blocks.0.mlp.down_proj.weight", "lm_head.weight"} <= set(
        model.state_dict())
    idx = torch.randint(0, 97, (2, 9))
    logits, _ = model(idx)
    compiled, _ = torch.compile(model, fullgraph=True, backend="aot_eager")(idx)
    torch.testing.assert_close(compiled, logits)


@pytest.mark.parametrize("backend", ["aten", "onednn"])
def test_each_backend(backend):
    if backend == "onednn" and not onednn_runs_fp32():
        pytest.skip("PyTorch's oneDNN takes fp32 products only on CPUs with AVX-512; this one has none")
    run_with_env({"CODEX_CPU_GEMM": backend}, __file__,
                 "(matches_float64 and cpu) or only_the_gradients or strided or empty_rows or reports_the_backend")


def test_reports_the_backend():
    linear(torch.randn(2, 3), torch.randn(4, 3), impl="cpu")  # loads the extension
    onednn = torch.ops.codex_ml_cpu.cpu_gemm_onednn()
    with open("/proc/cpuinfo") as f:
        other_vendor = platform.machine() == "x86_64" and "GenuineIntel" not in f.read()
    auto = int(other_vendor and onednn_runs_fp32())
    expected = {"aten": 0, "onednn": 1}.get(os.environ.get("CODEX_CPU_GEMM", ""), auto)
    assert onednn == expected


def test_an_unknown_backend_is_a_clear_error():
    with pytest.raises(AssertionError, match="CODEX_CPU_GEMM=mkl is not a CPU matrix-product backend"):
        run_with_env({"CODEX_CPU_GEMM": "mkl"}, __file__, "matches_float64 and cpu")
