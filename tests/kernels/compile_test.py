"""Every custom op of codex_ml.ops under torch.compile(fullgraph=True): with the default backend (Inductor) on the
CPU, forward and backward equal eager within fp32 rounding; and the layer ops together in one block (aot_eager).

Small shapes: the compile time is the cost here, not the kernels. Inductor compiles the code around the ops
and calls the ops' own implementations (the C++ CPU kernels, PyTorch's flash kernel for attention) as they are.
"""

import os
import tempfile

import pytest
import torch
from references import poison_uninitialized_memory, rope_tables  # noqa: F401 (an autouse fixture)

from codex_ml.ops import attention, cross_entropy, linear, linear_cross_entropy, rms_norm, rotary, swiglu

# Inductor writes its generated C++ and compiled code to a cache: in the test's own directory.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.environ.get("TEST_TMPDIR", tempfile.mkdtemp()),
                                                              "inductor"))


def _attention(q, k, v):
    return attention(q, k, v, window=4)


def _cross_entropy(logits, target):
    return cross_entropy(logits * 2, target, label_smoothing=0.1, z_loss=1e-3)


def _linear_cross_entropy(hidden, weight, target):
    return linear_cross_entropy(hidden + 1, weight, target, z_loss=1e-3)


def _rotary(x, cos, sin):
    return rotary(x * 2, cos, sin)


def cases():
    """op name -> (function of tensors, inputs, which inputs get a gradient)."""
    torch.manual_seed(0)
    target = torch.randint(0, 37, (11,))
    target[::4] = -100
    cos, sin = rope_tables(9, 16)
    return {
        "attention": (_attention, [torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)],
                      [0, 1, 2]),
        "cross_entropy": (_cross_entropy, [torch.randn(11, 37), target], [0]),
        "linear": (lambda x, w, b: linear(x, w, b).relu(), [torch.randn(2, 5, 12), torch.randn(7, 12),
                                                           torch.randn(7)], [0, 1, 2]),
        "linear_cross_entropy": (_linear_cross_entropy, [torch.randn(11, 12), torch.randn(37, 12), target], [0, 1]),
        "rms_norm": (lambda x, w: rms_norm(x, w) * 3, [torch.randn(2, 5, 24), torch.rand(24) + 0.5], [0, 1]),
        "rotary": (_rotary, [torch.randn(2, 9, 3, 16).transpose(1, 2), cos, sin], [0]),
        "swiglu": (lambda g, u: swiglu(g, u + 1), [torch.randn(3, 40), torch.randn(3, 40)], [0, 1]),
    }


@pytest.mark.parametrize("op", sorted(cases()))
def test_op_compiles_with_inductor_fullgraph_forward_and_backward(op):
    fn, inputs, grad_inputs = cases()[op]
    torch._dynamo.reset()
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True)):  # the default backend: Inductor
        leaves = [t.detach().clone().requires_grad_(i in grad_inputs) for i, t in enumerate(inputs)]
        out = run(*leaves)
        torch.manual_seed(1)
        grads = torch.autograd.grad(out, [leaves[i] for i in grad_inputs], torch.randn_like(out))
        results.append((out, grads))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_block_using_all_three_layer_ops_compiles_with_fullgraph():
    torch.manual_seed(10)
    b, t, h, d = 2, 11, 4, 16

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.Parameter(torch.rand(h * d) + 0.5)
            self.q = torch.nn.Linear(h * d, h * d, bias=False)
            self.gate = torch.nn.Linear(h * d, 96, bias=False)
            self.up = torch.nn.Linear(h * d, 96, bias=False)

        def forward(self, x, cos, sin):
            x = rms_norm(x, self.norm)
            q = rotary(self.q(x).view(b, t, h, d).transpose(1, 2), cos, sin)
            return swiglu(self.gate(x), self.up(x)).sum() + (q * q).sum()

    block, x = Block(), torch.randn(b, t, h * d)
    cos, sin = rope_tables(t, d)
    eager = block(x, cos, sin)
    eager.backward()
    eager_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, cos, sin)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for p, g in zip(block.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)
