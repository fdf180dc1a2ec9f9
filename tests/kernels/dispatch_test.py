"""The one dispatch rule of codex_ml.ops.dispatch, the same for every op: impl= > CODEX_ML_<OP>_IMPL >
CODEX_ML_IMPL (a preference: only where the op has that implementation and it can run the inputs) > automatic.
An impossible choice by argument or per-op variable is an error naming the op, the choice and where it came from."""

import pytest
import torch

from codex_ml.models.gpt import GPT, GPTConfig
from codex_ml.ops import attention, cross_entropy, dispatch, linear, linear_cross_entropy, rms_norm, rotary, swiglu
from codex_ml.ops.dispatch import BACKENDS, choose_impl

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
OPS = sorted(BACKENDS)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No implementation variable from the caller's shell; triton importable, the interpreter off."""
    for op in OPS:
        monkeypatch.delenv(f"CODEX_ML_{op.upper()}_IMPL", raising=False)
    monkeypatch.delenv("CODEX_ML_IMPL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# The automatic choice, as docs/kernels.md states it: op -> (CPU tensors, CUDA tensors).
AUTOMATIC = {
    "attention": ("cpu", "triton"),
    "cross_entropy": ("cpu", "triton"),
    "linear": ("cpu", "torch"),
    "linear_cross_entropy": ("cpu", "triton"),
    "rms_norm": ("cpu", "triton"),
    "rotary": ("cpu", "triton"),
    "swiglu": ("cpu", "triton"),
}


@pytest.mark.parametrize("op", OPS)
def test_automatic_choice_is_the_documented_one(op, monkeypatch):
    assert set(AUTOMATIC) == set(BACKENDS)
    on_cpu, on_cuda = AUTOMATIC[op]
    assert choose_impl(op, CPU) == on_cpu
    assert choose_impl(op, CUDA) == on_cuda
    assert choose_impl(op, META) == "torch"
    assert choose_impl(op, CPU, "auto") == on_cpu
    monkeypatch.setattr(dispatch, "triton_available", lambda device: False)  # triton not installed
    assert choose_impl(op, CUDA) == "torch"


@pytest.mark.parametrize("op", OPS)
def test_precedence_argument_then_op_variable_then_global_variable(op, monkeypatch):
    monkeypatch.setenv("CODEX_ML_IMPL", "torch")
    assert choose_impl(op, CPU) == "torch"
    monkeypatch.setenv(f"CODEX_ML_{op.upper()}_IMPL", "cpu")
    assert choose_impl(op, CPU) == "cpu"
    assert choose_impl(op, CPU, "torch") == "torch"
    monkeypatch.setenv(f"CODEX_ML_{op.upper()}_IMPL", "auto")  # the op's own "auto" overrides the global choice
    assert choose_impl(op, CPU) == AUTOMATIC[op][0]
    monkeypatch.setenv(f"CODEX_ML_{op.upper()}_IMPL", "")  # empty: unset
    assert choose_impl(op, CPU) == "torch"


def test_a_variable_of_one_op_leaves_the_others_alone(monkeypatch):
    monkeypatch.setenv("CODEX_ML_LINEAR_CROSS_ENTROPY_IMPL", "torch")
    assert choose_impl("linear_cross_entropy", CPU) == "torch"
    assert choose_impl("cross_entropy", CPU) == "cpu"
    assert choose_impl("attention", CPU) == "cpu"


@pytest.mark.parametrize("op", OPS)
def test_global_variable_applies_only_where_the_op_can_run_it(op, monkeypatch):
    on_cpu, on_cuda = AUTOMATIC[op]
    monkeypatch.setenv("CODEX_ML_IMPL", "cuda")  # rms_norm, rotary, swiglu and linear have no CUDA kernel
    assert choose_impl(op, CUDA) == ("cuda" if "cuda" in BACKENDS[op] else on_cuda)
    assert choose_impl(op, CPU) == on_cpu  # the CUDA kernels need CUDA tensors
    monkeypatch.setenv("CODEX_ML_IMPL", "triton")
    assert choose_impl(op, CPU) == on_cpu  # no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_impl(op, CPU) == ("triton" if "triton" in BACKENDS[op] else on_cpu)
    monkeypatch.setenv("CODEX_ML_IMPL", "cpu")
    assert choose_impl(op, CUDA) == on_cuda


def impossible_choices():
    """(op, device, choice, what the message says): a choice the op lacks, and one its inputs' device cannot run."""
    cases = []
    for op in OPS:
        missing = [impl for impl in dispatch.IMPLS if impl not in BACKENDS[op]]
        cases += [(op, CPU, impl, f"{op} has no {impl} kernel: use impl=") for impl in missing]
        cases.append((op, CUDA, "cpu", f"{op}: .* needs CPU tensors, got tensors on cuda"))
        if "cuda" in BACKENDS[op]:
            cases.append((op, CPU, "cuda", f"{op}: .* needs CUDA tensors, got tensors on cpu"))
        if "triton" in BACKENDS[op]:
            cases.append((op, CPU, "triton", rf"{op}: .* needs CUDA tensors \(or TRITON_INTERPRET=1 on the CPU\)"))
    return cases


@pytest.mark.parametrize("op,device,choice,message", impossible_choices())
def test_an_impossible_binding_choice_is_an_error_naming_its_source(op, device, choice, message, monkeypatch):
    with pytest.raises(ValueError, match=message) as argument_error:
        choose_impl(op, device, choice)
    assert f"impl='{choice}'" in str(argument_error.value)
    monkeypatch.setenv(f"CODEX_ML_{op.upper()}_IMPL", choice)
    with pytest.raises(ValueError, match=message) as variable_error:
        choose_impl(op, device)
    assert f"CODEX_ML_{op.upper()}_IMPL={choice}" in str(variable_error.value)


@pytest.mark.parametrize("variable", ["CODEX_ML_IMPL", "CODEX_ML_SWIGLU_IMPL"])
def test_an_unknown_implementation_is_an_error_wherever_it_is_set(variable, monkeypatch):
    with pytest.raises(ValueError, match="unknown implementation 'bogus' for swiglu: choose one of"):
        choose_impl("swiglu", CPU, "bogus")
    monkeypatch.setenv(variable, "bogus")
    with pytest.raises(ValueError, match=f"unknown implementation 'bogus' for swiglu: .*{variable}=bogus"):
        choose_impl("swiglu", CPU)


def test_the_ops_own_requirements_bind_like_the_device(monkeypatch):
    """linear's C++ kernel takes fp32 outside autocast, the CUDA attention kernels bf16/fp16: asked for by argument
    that is an error; asked for by CODEX_ML_IMPL the automatic choice stands in."""
    x, w = torch.randn(3, 4).bfloat16(), torch.randn(5, 4).bfloat16()
    with pytest.raises(ValueError, match="linear: impl='cpu' takes fp32 CPU tensors outside autocast"):
        linear(x, w, impl="cpu")
    monkeypatch.setenv("CODEX_ML_LINEAR_IMPL", "cpu")
    with pytest.raises(ValueError, match="linear: CODEX_ML_LINEAR_IMPL=cpu takes fp32 CPU tensors"):
        linear(x, w)
    unfit = (lambda choice: "runs bf16/fp16 tensor cores only, got fp32" if choice == "cuda" else None)
    with pytest.raises(ValueError, match="attention: impl='cuda' runs bf16/fp16 tensor cores only"):
        choose_impl("attention", CUDA, "cuda", unfit)
    monkeypatch.setenv("CODEX_ML_IMPL", "cuda")
    assert choose_impl("attention", CUDA, None, unfit) == "triton"


def test_every_op_follows_the_rule_when_called(monkeypatch):
    """The ops themselves, not only choose_impl: an impossible argument fails, the same global choice runs."""
    torch.manual_seed(1)
    q, cos, sin = torch.randn(2, 2, 5, 16), torch.randn(5, 16), torch.randn(5, 16)
    h, w, x, logits = torch.randn(4, 3), torch.randn(7, 3), torch.randn(4, 8), torch.randn(4, 7)
    target = torch.tensor([0, 1, 2, 3])
    calls = {
        "attention": lambda impl: attention(q, q, q, impl=impl),
        "cross_entropy": lambda impl: cross_entropy(logits, target, impl=impl),
        "linear": lambda impl: linear(h, w, impl=impl),
        "linear_cross_entropy": lambda impl: linear_cross_entropy(h, w, target, impl=impl),
        "rms_norm": lambda impl: rms_norm(x, x[0], impl=impl),
        "rotary": lambda impl: rotary(q, cos, sin, impl=impl),
        "swiglu": lambda impl: swiglu(x, x, impl=impl),
    }
    assert set(calls) == set(BACKENDS)
    monkeypatch.setenv("CODEX_ML_IMPL", "cuda")
    for op, call in calls.items():
        torch.testing.assert_close(call(None), call("auto"))  # CPU tensors: the global "cuda" does not apply
        with pytest.raises(ValueError, match=f"^{op}"):
            call("cuda")


@pytest.mark.parametrize("autocast", [False, True])
def test_a_bf16_model_runs_under_codex_ml_impl_cpu(autocast, monkeypatch):
    """CODEX_ML_IMPL=cpu with a bf16 GPT (or an fp32 one under bf16 autocast): the C++ kernels take what they can,
    the rest goes where the automatic choice sends it (linear's bf16 products to F.linear), and training runs."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, n_layer=1, n_head=2, n_kv_head=1, d_model=32, ffn_hidden=48, max_seq_len=16)
    model = GPT(config)
    if not autocast:
        model = model.bfloat16()
    idx = torch.randint(0, 97, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, reference = model(idx, targets=idx)
    monkeypatch.setenv("CODEX_ML_IMPL", "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(idx, targets=idx)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(reference.item(), rel=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
