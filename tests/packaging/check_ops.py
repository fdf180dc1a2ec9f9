"""Runs every op of codex_ml, forward and backward on odd shapes, against float64 PyTorch, in the environment that
runs this file (an installed wheel, a copy of the package), and checks which path served the C++ CPU kernels.

    python check_ops.py compiled   the five ops with C++ kernels run them (impl="cpu"); prints each extension's file
    python check_ops.py fallback   the extensions do not load: the ops run their PyTorch path by themselves (under
                                   torch.compile too), and impl="cpu" is an error saying why
"""

import sys

import torch
import torch.nn.functional as F

from codex_ml.ops import attention, cross_entropy, linear, linear_cross_entropy, rms_norm, rotary, swiglu

EXTENSIONS = ("cross_entropy", "linear", "rms_norm", "rotary", "swiglu")


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def check_every_op(impl: str | None) -> None:
    """Each op against float64; `impl` goes to the ops that have C++ CPU kernels (None: the automatic choice)."""
    torch.manual_seed(0)
    h, w = torch.randn(53, 37, requires_grad=True), torch.randn(301, 37, requires_grad=True)
    t = torch.randint(0, 301, (53,))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss, ref = linear_cross_entropy(h, w, t, impl=impl), F.cross_entropy(F.linear(h64, w64), t)
    loss.backward()
    ref.backward()
    close(loss, ref), close(h.grad, h64.grad), close(w.grad, w64.grad)

    logits = torch.randn(53, 301, requires_grad=True)
    logits64 = logits.detach().double().requires_grad_()
    loss, ref = cross_entropy(logits, t), F.cross_entropy(logits64, t)
    loss.backward()
    ref.backward()
    close(loss, ref), close(logits.grad, logits64.grad)

    q, k, v = (torch.randn(2, 4, 37, 32, requires_grad=True) for _ in range(3))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, ref = attention(q, k, v), F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    close(out, ref), close(q.grad, q64.grad), close(k.grad, k64.grad), close(v.grad, v64.grad)

    x, weight = torch.randn(5, 7, 37, requires_grad=True), torch.randn(37, requires_grad=True)
    x64, weight64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    out = rms_norm(x, weight, impl=impl)
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * weight64
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    close(out, ref), close(x.grad, x64.grad), close(weight.grad, weight64.grad)

    gate, up = torch.randn(5, 93, requires_grad=True), torch.randn(5, 93, requires_grad=True)
    gate64, up64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    out, ref = swiglu(gate, up, impl=impl), F.silu(gate64) * up64
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    close(out, ref), close(gate.grad, gate64.grad), close(up.grad, up64.grad)

    x = torch.randn(2, 17, 3, 32).transpose(1, 2).requires_grad_()  # [B, H, T, D], strided as in a model
    angles = torch.randn(17, 16).repeat(1, 2)
    x64 = x.detach().double().requires_grad_()
    out = rotary(x, angles.cos(), angles.sin(), impl=impl)
    ref = x64 * angles.cos().double() + torch.cat([-x64[..., 16:], x64[..., :16]], -1) * angles.sin().double()
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    close(out, ref), close(x.grad, x64.grad)

    x, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((300, 200), (301, 200), (301,)))
    x64, w64, b64 = (p.detach().double().requires_grad_() for p in (x, w, b))
    out, ref = linear(x, w, b, impl=impl), F.linear(x64, w64, b64)  # big enough for oneDNN where it applies
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for a, r in ((out, ref), (x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert ((a.double() - r).norm() / r.norm()).item() < 1e-5  # sums of 200-300 fp32 terms: relative L2 error


def main(mode: str) -> None:
    if mode == "compiled":
        check_every_op("cpu")
        print(*(sys.modules[f"codex_ml.kernels.{name}.cpu"].__file__ for name in EXTENSIONS))
        return
    assert mode == "fallback", f"unknown mode {mode!r}: compiled or fallback"
    check_every_op(None)
    x, w = torch.randn(3, 8), torch.randn(8)  # the automatic choice also holds inside a full-graph trace
    compiled = torch.compile(lambda x, w: swiglu(rms_norm(x, w), x), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), swiglu(rms_norm(x, w, impl="torch"), x, impl="torch"))
    loaded = [name for name in EXTENSIONS if f"codex_ml.kernels.{name}.cpu" in sys.modules]
    assert not loaded, f"extensions loaded: {loaded}"
    try:
        linear(torch.randn(3, 4), torch.randn(5, 4), impl="cpu")
    except ValueError as err:
        print(err)
    else:
        raise AssertionError("impl='cpu' ran without its compiled kernel")


if __name__ == "__main__":
    main(sys.argv[1])
