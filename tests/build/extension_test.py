"""A C++ extension built by the torch_extension macro imports as a module and its op matches PyTorch."""

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F

import codex_ml.kernels


def test_extension_is_a_module_inside_its_op_package():
    module = importlib.import_module("codex_ml.kernels.cross_entropy.cpu")
    assert Path(module.__file__).parent == Path(codex_ml.kernels.__path__[0]) / "cross_entropy"
    assert hasattr(torch.ops.codex_ml_cpu, "linear_cross_entropy")


def test_registered_op_matches_pytorch():
    importlib.import_module("codex_ml.kernels.cross_entropy.cpu")
    torch.manual_seed(0)
    h, w = torch.randn(33, 20, dtype=torch.float64), torch.randn(101, 20, dtype=torch.float64)
    t = torch.randint(0, 101, (33,))
    rows, lse, gh, gw, gb = torch.ops.codex_ml_cpu.linear_cross_entropy(
        h.float(), w.float(), None, t, torch.ones(33), -100, 0.0, 0.0, 0.0)
    hd, wd = h.requires_grad_(), w.requires_grad_()
    ref = F.cross_entropy(hd @ wd.T, t, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(rows.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(h.detach() @ w.detach().T, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), hd.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), wd.grad, rtol=1e-4, atol=1e-5)
    assert gb.numel() == 0
