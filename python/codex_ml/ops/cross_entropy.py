"""Cross-entropy losses that never hold the full [N, V] logits: `linear_cross_entropy` and `cross_entropy`.

Both are torch.library custom ops (fake implementations and autograd formulas registered, so
torch.compile traces them). For "mean" and "sum" the forward pass also computes the gradients (one
pass over the vocabulary instead of two) and the backward pass only scales them by grad_output; for
"none" the backward recomputes each chunk with every row's own grad_output, so its gradients are exact
too. Implementations, chosen by codex_ml.ops.dispatch (each loss by its own name: impl=,
CODEX_ML_LINEAR_CROSS_ENTROPY_IMPL or CODEX_ML_CROSS_ENTROPY_IMPL, CODEX_ML_IMPL; docs/kernels.md):
- "cpu" (default on CPU tensors): linear_cross_entropy runs the fused C++ kernel
  (kernels/cross_entropy/linear_cross_entropy.cc); cross_entropy the chunked rows in PyTorch.
- "triton" (default on CUDA tensors): the chunked algorithm (logits by cuBLAS per chunk) with the Triton row
  kernel (kernels/cross_entropy/triton.py).
- "cuda": the same with the CUDA row kernel (kernels/cross_entropy/cross_entropy.cu through
  ops/_cross_entropy_cuda.py).
- "torch": the chunked algorithm in plain PyTorch on any device.
The chunked algorithm keeps bf16/fp16 inputs in their dtype for the products (see _chunked; docs/kernels.md).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from codex_ml.ops.dispatch import choose_impl, load_extension

REDUCTIONS = ("mean", "sum", "none")
_HALF = (torch.bfloat16, torch.float16)


def _chunk_size(v: int, device: torch.device) -> int:
    """Rows per chunk of logits. On the CPU about 4M logits, which stay in cache. On CUDA about 256M (1 GiB in
    fp32): a product of a few rows would leave the tensor cores idle, and grad_weight's fp32 accumulator is read
    and written once per chunk (about 2,000 rows at V = 128k)."""
    elements = (1 << 28) if device.type == "cuda" else (1 << 22)
    return max(1, elements // max(v, 1))


def _check_common(inputs: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int, reduction: str,
                  label_smoothing: float, z_loss: float, logit_softcap: float | None) -> None:
    """Checks shared by both losses: target, options. `inputs` is hidden or logits ([N, ...])."""
    if target.dim() != 1 or target.shape[0] != inputs.shape[0]:
        raise ValueError(f"target must have shape [N] = [{inputs.shape[0]}], got {tuple(target.shape)}")
    if inputs.shape[0] == 0:
        raise ValueError("the loss got no tokens (N = 0): pass at least one row")
    if num_classes == 0:
        raise ValueError("the vocabulary is empty: V must be at least 1")
    if target.dtype != torch.int64:
        raise ValueError(f"target must be int64 (torch.long), got {target.dtype}")
    if inputs.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"inputs must be floating point (fp32, bf16, fp16), got {inputs.dtype}")
    if target.device != inputs.device:
        raise ValueError(f"target is on {target.device} but the inputs are on {inputs.device}: use one device")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not 0.0 <= z_loss < math.inf:  # (NaN fails too)
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if logit_softcap is not None and not 0.0 < logit_softcap < math.inf:
        raise ValueError(f"logit_softcap must be a finite positive number or None, got {logit_softcap}")


def _check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Data-dependent, so checked inside the ops' implementations (where torch.compile does not trace)."""
    out_of_range = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(out_of_range.any()):
        bad = target[out_of_range][0].item()
        raise ValueError(f"target value {bad} is out of range [0, {num_classes}) and is not "
                         f"ignore_index ({ignore_index})")


def _check(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy expects hidden [N, H] and weight [V, H]; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden has {hidden.shape[1]} features but weight has {weight.shape[1]}: "
                         "weight must be [V, H]")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}: move them to one device")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def _chunk_rows(logits, t, row_scale, ignore_index, label_smoothing, z_loss, softcap):
    """Loss, lse and (when row_scale is given) d(sum scale_i loss_i)/dlogits of one chunk of fp32 logits."""
    v = logits.shape[1]
    valid = t != ignore_index
    safe_t = t.clamp(0, v - 1)
    z = softcap * torch.tanh(logits / softcap) if softcap > 0 else logits
    row_lse = torch.logsumexp(z, dim=-1)
    zt = z.gather(1, safe_t[:, None])[:, 0]
    rows = row_lse - (1 - label_smoothing) * zt + z_loss * row_lse ** 2
    if label_smoothing > 0:  # (not 0 * mean: a masked -inf logit would make that NaN, as F.cross_entropy does not)
        rows = rows - label_smoothing * z.mean(-1)
    rows, row_lse = torch.where(valid, rows, 0.0), torch.where(valid, row_lse, 0.0)
    if row_scale is None:
        return rows, row_lse, None
    g = torch.softmax(z, dim=-1) * (1 + 2 * z_loss * row_lse[:, None]) - label_smoothing / v
    g[torch.arange(len(t), device=g.device), safe_t] -= 1 - label_smoothing
    g = g * torch.where(valid, row_scale.float(), 0.0)[:, None]
    if softcap > 0:
        g = g * (1 - (z / softcap) ** 2)
    return rows, row_lse, g


def _rows(impl, logits, t, row_scale, ignore_index, label_smoothing, z_loss, softcap):
    """_chunk_rows on fp32 scratch logits, by the Triton or CUDA kernel (gradient written in place) or PyTorch."""
    if impl in ("triton", "cuda"):
        if impl == "triton":
            from codex_ml.kernels.cross_entropy.triton import cross_entropy_rows
        else:
            from codex_ml.ops._cross_entropy_cuda import cross_entropy_rows

        rows, row_lse = cross_entropy_rows(logits, t, row_scale, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        return rows, row_lse, logits if row_scale is not None else None
    return _chunk_rows(logits, t, row_scale, ignore_index, label_smoothing, z_loss, softcap)


_HALF_ADDMM_FAILED: list[str] = []  # why torch.addmm(out_dtype=) failed here, once: then the fallback runs


def _addmm_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """out (fp32) += alpha * a @ b for half-precision a, b: on CUDA one cuBLAS product with half operands and an
    fp32 result (tensor cores, fp32 accumulation); elsewhere the same arithmetic on the operands upcast (exactly)."""
    if out.is_cuda and not _HALF_ADDMM_FAILED:
        try:
            torch.addmm(out, a, b, alpha=alpha, out_dtype=torch.float32, out=out)
            return
        except (RuntimeError, TypeError) as err:  # a PyTorch without addmm(out_dtype=) for these operands
            _HALF_ADDMM_FAILED.append(str(err))
            warnings.warn(f"linear_cross_entropy: torch.addmm(out_dtype=torch.float32) failed ({err}); grad_weight "
                          "is accumulated from fp32 copies of its operands instead (slower, same result)",
                          stacklevel=2)
    out.addmm_(a.float(), b.float(), alpha=alpha)


def _chunked(impl, hidden, weight, bias, target, row_scale, ignore_index, label_smoothing, z_loss, softcap, dtype,
             accum_dtype):
    """The chunked algorithm on any device, with the products in `dtype`: fp32, or bf16/fp16 (the inputs' own, or
    torch.autocast's, to which the inputs are cast as F.linear's would be). Each chunk's logits by F.linear in that
    dtype (on CUDA, half products run on the tensor cores with fp32 accumulation inside, as F.linear's), each
    row's softmax in fp32 by the Triton, CUDA or PyTorch rows (the Triton row kernel reads half logits and writes
    their gradient over them, in place; the others take an fp32 copy); grad_hidden rows written once from one
    product each; grad_weight and grad_bias accumulated over the chunks in fp32, or for half products in `dtype`
    where accum_dtype says so (half the memory, a rounding per chunk). No fp32 copy of a half weight or hidden.

    The rows' gradient (the products' operand, in `dtype`) is that of sum_i (row_scale[i] / c) * loss_i with c the
    largest |row_scale[i]|, and the products apply c (alpha): 1/N of a "mean", or a gradient normalized by the
    tokens of many steps, times a softmax probability lies below fp16's smallest subnormal (6e-8) at large N and
    would round to 0.
    """
    half = dtype in _HALF
    accum = dtype if half and accum_dtype not in (None, torch.float32) else torch.float32
    n, v = hidden.shape[0], weight.shape[0]
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    loss = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros_like(loss)
    grad = row_scale is not None

    def empty():  # distinct tensors: a custom op's outputs may not alias each other
        return hidden.new_empty(0, dtype=torch.float32)

    gh = hidden.new_empty(hidden.shape, dtype=dtype) if grad else empty()
    gw = torch.zeros(weight.shape, dtype=accum, device=weight.device) if grad else empty()  # contiguous, as the fake
    gb = torch.zeros(v, dtype=accum, device=weight.device) if grad and bias is not None else empty()
    factor = 1.0
    if grad:
        factor = float(row_scale.abs().max()) or 1.0  # (all-zero scales: zero gradients either way)
        row_scale = row_scale / factor
    chunk = _chunk_size(v, hidden.device)
    for s in range(0, n, chunk):
        h = hidden[s:s + chunk].to(dtype)
        logits = F.linear(h, weight, bias)
        if impl != "triton":  # the PyTorch rows and the CUDA row kernel take fp32 logits
            logits = logits.float()
        scale = row_scale[s:s + chunk] if grad else None
        rows, row_lse, g = _rows(impl, logits, target[s:s + chunk], scale, ignore_index, label_smoothing, z_loss,
                                 softcap)
        loss[s:s + chunk], lse[s:s + chunk] = rows, row_lse
        if grad:
            g = g.to(dtype)
            rows_gh = gh[s:s + chunk]
            torch.addmm(rows_gh, g, weight, beta=0, alpha=factor, out=rows_gh)  # beta=0: rows_gh is not read
            if half and accum == torch.float32:
                _addmm_fp32(gw, g.t(), h, factor)
            else:
                gw.addmm_(g.t(), h, alpha=factor)
            if bias is not None:
                gb += g.sum(0, dtype=torch.float32).mul_(factor).to(accum)
    return loss, lse, gh, gw, gb


def _products_dtype(hidden, weight, bias, matmul_dtype):
    """The dtype of the chunked algorithm's products: autocast's where given, the inputs' own bf16/fp16 where they
    all share it, else fp32."""
    if matmul_dtype is not None:
        return matmul_dtype
    if hidden.dtype in _HALF and weight.dtype == hidden.dtype and (bias is None or bias.dtype == hidden.dtype):
        return hidden.dtype
    return torch.float32


def _run(impl, hidden, weight, bias, target, row_scale, ignore_index, label_smoothing, z_loss, softcap,
         matmul_dtype=None, accum_dtype=None):
    """(rows' loss, lse, grad_hidden, grad_weight, grad_bias); matmul_dtype: torch.autocast's, or None;
    accum_dtype: grad_weight's accumulator in the chunked bf16/fp16 path (None: fp32). The C++ CPU kernel
    computes and accumulates in fp32 whatever they are (more precise, and its speed on a CPU)."""
    if impl == "cpu":
        load_extension("cross_entropy")
        return torch.ops.codex_ml_cpu.linear_cross_entropy(hidden.contiguous(), weight, bias, target, row_scale,
                                                          ignore_index, label_smoothing, z_loss, softcap)
    return _chunked(impl, hidden.contiguous(), weight, bias, target, row_scale, ignore_index, label_smoothing, z_loss,
                    softcap, _products_dtype(hidden, weight, bias, matmul_dtype), accum_dtype)


def _backward_row_scale(grad_loss: torch.Tensor, target: torch.Tensor, ignore_index: int,
                        reduction: str) -> torch.Tensor:
    """Each row's weight in the backward pass: grad_output per row ("none") or shared, / n_valid for "mean"."""
    row_scale = grad_loss.float().expand(target.shape[0]) if grad_loss.dim() == 0 else grad_loss.float()
    if reduction == "mean":
        row_scale = row_scale / (target != ignore_index).sum().clamp(min=1)
    return row_scale


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total


@torch.library.custom_op("codex_ml::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
            ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: float,
            fused_grad: bool, impl: str, matmul_dtype: torch.dtype | None,
            accum_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
    """(loss, z-loss term, grad_hidden, grad_weight, grad_bias); the grads are empty unless fused_grad.

    matmul_dtype: torch.autocast's dtype where the caller runs under it (then the loss is fp32, as autocast's
    F.cross_entropy gives), else None. accum_dtype: see linear_cross_entropy."""
    _check_target_range(target, weight.shape[0], ignore_index)
    valid = target != ignore_index
    row_scale = None
    if fused_grad:
        n_valid = valid.sum().clamp(min=1)
        row_scale = (valid.float() / n_valid) if reduction == "mean" else valid.float()
    rows, lse, gh, gw, gb = _run(impl, hidden, weight, bias, target, row_scale, ignore_index, label_smoothing,
                                 z_loss, softcap, matmul_dtype, accum_dtype)
    z_term = z_loss * _reduce(lse ** 2, valid, "mean" if reduction == "none" else reduction)
    if fused_grad:
        gh, gw = gh.to(hidden.dtype), gw.to(weight.dtype)
        gb = gb.to(bias.dtype) if bias is not None else gb
    loss_dtype = _loss_dtype(hidden, matmul_dtype)
    return _reduce(rows, valid, reduction).to(loss_dtype), z_term.to(loss_dtype), gh, gw, gb


def _loss_dtype(hidden: torch.Tensor, matmul_dtype: torch.dtype | None) -> torch.dtype:
    return torch.float32 if matmul_dtype is not None else hidden.dtype


@_lce_op.register_fake
def _(hidden, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap, fused_grad, impl,
      matmul_dtype, accum_dtype):
    loss_dtype = _loss_dtype(hidden, matmul_dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=loss_dtype)
    z_term = hidden.new_empty((), dtype=loss_dtype)
    if fused_grad:
        gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0, dtype=torch.float32)
        return loss, z_term, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), gb
    return loss, z_term, *(hidden.new_empty(0, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("codex_ml::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                     row_scale: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                     softcap: float, impl: str, matmul_dtype: torch.dtype | None,
                     accum_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i row_scale[i] * loss_i, recomputing the logits chunk by chunk."""
    _, _, gh, gw, gb = _run(impl, hidden, weight, bias, target, row_scale.contiguous(), ignore_index,
                            label_smoothing, z_loss, softcap, matmul_dtype, accum_dtype)
    return gh.to(hidden.dtype), gw.to(weight.dtype), (gb.to(bias.dtype) if bias is not None else gb)


@_lce_backward_op.register_fake
def _(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing, z_loss, softcap, impl, matmul_dtype,
      accum_dtype):
    gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0, dtype=torch.float32)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), gb


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap, fused_grad, impl,
     matmul_dtype, accum_dtype) = inputs
    ctx.fused, ctx.reduction, ctx.has_bias = fused_grad, reduction, bias is not None
    ctx.args = (ignore_index, label_smoothing, z_loss, softcap, impl, matmul_dtype, accum_dtype)
    # The gradient outputs get no gradient: without this, autograd would zero-fill one of each ([V, H] and
    # [N, H], 12 ms a step in bench_train) to pass to _backward, which ignores them.
    ctx.set_materialize_grads(False)
    if fused_grad:
        ctx.save_for_backward(*output[2:])
    else:
        ctx.save_for_backward(hidden, weight, bias, target)


def _graph_is_kept() -> bool:
    """Whether the running backward pass keeps the graph (retain_graph=True); True where PyTorch cannot say."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad * grad_loss, except in the usual case grad_loss == 1 (loss.backward()): then the gradient held since
    the forward pass goes to autograd as it is, and the backward pass holds no second copy of it. Not when the
    graph is kept for another backward: autograd may then add into (or zero) what it was given, which would
    change the held gradient under the next pass, so that gets a copy."""
    # Eager only: traced (fake, functional) tensors have no value to compare, so they take the general path.
    if type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling() and grad_loss.numel() == 1 \
            and bool(grad_loss == 1):
        return grad.clone() if _graph_is_kept() else grad
    return grad * grad_loss


def _refuse_double_backward(name: str) -> None:
    """The fused gradients are computed without a graph: a backward pass that builds one (create_graph=True)
    would get second derivatives of zero, silently. Refused instead."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{name} has no second derivative (backward with create_graph=True): its gradients come "
                           "from a fused kernel. For higher-order gradients use F.linear and F.cross_entropy.")


def _backward(ctx, grad_loss, grad_z, _gh, _gw, _gb):
    if grad_loss is None:  # the loss output got no gradient (only the raw op's other outputs were used)
        return (None,) * 13
    _refuse_double_backward("linear_cross_entropy")
    if ctx.fused:
        gh, gw, gb = ctx.saved_tensors
        gh, gw = _scaled(gh, grad_loss), _scaled(gw, grad_loss)
        gb = _scaled(gb, grad_loss) if ctx.has_bias else None
    else:
        hidden, weight, bias, target = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, softcap, impl, matmul_dtype, accum_dtype = ctx.args
        row_scale = _backward_row_scale(grad_loss, target, ignore_index, ctx.reduction)
        gh, gw, gb = _lce_backward_op(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing, z_loss,
                                      softcap, impl, matmul_dtype, accum_dtype)
        gb = gb if ctx.has_bias else None
    return gh, gw, gb, None, None, None, None, None, None, None, None, None, None


_lce_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_dtype(hidden: torch.Tensor) -> torch.dtype | None:
    """torch.autocast's bf16/fp16 where it is on for hidden's device, else None. A custom op sits outside autocast:
    told the dtype, it runs the products in it, as autocast's F.linear would (the C++ CPU kernel keeps fp32)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype in _HALF else None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    accum_dtype: torch.dtype = torch.float32,
    return_z_loss: bool = False,
    impl: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of softcap(hidden [N, H] @ weight[V, H]^T + bias) against target [N], without the logits.

    Returns the loss (a scalar, or [N] for reduction="none"); with z_loss > 0 it includes
    z_loss * mean(logsumexp^2) over non-ignored rows, and `return_z_loss=True` returns (loss, that term), the
    term detached: it is for logging (its gradient is already in the loss's).
    Ignored rows (target == ignore_index) contribute nothing; if all are ignored the loss is 0.
    Under torch.autocast it follows autocast's F.linear + F.cross_entropy: the products in autocast's dtype
    (except in the C++ CPU kernel, which computes in fp32), the loss in fp32.
    accum_dtype: what grad_weight and grad_bias are summed in across chunks of tokens when the products run in
    bf16/fp16 (CUDA; impl "torch"/"triton"): torch.float32 (the default), or the products' dtype, which saves
    the fp32 accumulator (2 bytes per weight element) at the price of a rounding per chunk. The C++ CPU kernel
    always sums in fp32.
    """
    _check(hidden, weight, target, bias)
    if accum_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"accum_dtype must be torch.float32 or the products' bf16/fp16, got {accum_dtype}")
    _check_common(hidden, target, weight.shape[0], ignore_index, reduction, label_smoothing, z_loss, logit_softcap)
    target = target.contiguous()  # the kernels read target[row] at stride 1
    chosen = choose_impl("linear_cross_entropy", hidden.device, impl)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    fused = needs_grad and reduction != "none"
    loss, z_term, *_ = _lce_op(hidden, weight, bias, target, ignore_index, reduction, float(label_smoothing),
                               float(z_loss), float(logit_softcap or 0.0), fused, chosen, _autocast_dtype(hidden),
                               accum_dtype)
    return (loss, z_term.detach()) if return_z_loss else loss


@torch.library.custom_op("codex_ml::cross_entropy", mutates_args=())
def _ce_op(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str, label_smoothing: float,
           z_loss: float, softcap: float, fused_grad: bool,
           impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z-loss term, grad_logits): one chunked pass; grad_logits is empty unless fused_grad."""
    _check_target_range(target, logits.shape[1], ignore_index)
    n = logits.shape[0]
    valid = target != ignore_index
    row_scale = None
    if fused_grad:
        row_scale = valid.float() / valid.sum().clamp(min=1) if reduction == "mean" else valid.float()
    rows = torch.zeros(n, dtype=torch.float32, device=logits.device)
    lse = torch.zeros_like(rows)
    grad = logits.new_empty(logits.shape) if fused_grad else logits.new_empty(0)  # contiguous, as the fake
    chunk = _chunk_size(logits.shape[1], logits.device)
    for s in range(0, n, chunk):
        scale = row_scale[s:s + chunk] if fused_grad else None
        scratch = logits[s:s + chunk].to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        rows[s:s + chunk], lse[s:s + chunk], g = _rows(impl, scratch, target[s:s + chunk], scale, ignore_index,
                                                       label_smoothing, z_loss, softcap)
        if fused_grad:
            grad[s:s + chunk] = g
    z_term = z_loss * _reduce(lse ** 2, valid, "mean" if reduction == "none" else reduction)
    return _reduce(rows, valid, reduction).to(logits.dtype), z_term.to(logits.dtype), grad


@_ce_op.register_fake
def _(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap, fused_grad, impl):
    loss = logits.new_empty((logits.shape[0],) if reduction == "none" else ())
    return loss, logits.new_empty(()), logits.new_empty(logits.shape if fused_grad else (0,))


def _ce_setup_context(ctx, inputs, output):
    logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap, fused_grad, impl = inputs
    ctx.fused, ctx.reduction, ctx.args = fused_grad, reduction, (ignore_index, label_smoothing, z_loss, softcap, impl)
    ctx.save_for_backward(output[2] if fused_grad else logits, target)
    ctx.set_materialize_grads(False)  # as in _setup_context: no zero-filled [N, V] for the gradient output


def _ce_backward(ctx, grad_loss, grad_z, _grad):
    if grad_loss is None:
        return (None,) * 9
    _refuse_double_backward("cross_entropy")
    saved, target = ctx.saved_tensors
    if ctx.fused:
        return _scaled(saved, grad_loss), None, None, None, None, None, None, None, None
    ignore_index, label_smoothing, z_loss, softcap, impl = ctx.args
    row_scale = _backward_row_scale(grad_loss, target, ignore_index, ctx.reduction)
    scratch = saved.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # rows the kernels can read
    _, _, g = _rows(impl, scratch, target, row_scale, ignore_index, label_smoothing, z_loss, softcap)
    return g.to(saved.dtype), None, None, None, None, None, None, None, None


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    return_z_loss: bool = False,
    impl: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits [N, V] against target [N], with the options of linear_cross_entropy (the z-loss
    term of return_z_loss=True detached, for logging).

    One chunked pass computes the loss and, when a gradient is needed for "mean"/"sum", the gradient
    too (in fp32 per chunk, stored in the logits' dtype), so the backward pass is a single scaling.
    As in linear_cross_entropy, a "mean" over a batch whose targets are all ignore_index is 0 with zero
    gradients (F.cross_entropy gives NaN).
    """
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy expects logits [N, V], got shape {tuple(logits.shape)}")
    _check_common(logits, target, logits.shape[1], ignore_index, reduction, label_smoothing, z_loss, logit_softcap)
    target = target.contiguous()  # the kernels read target[row] at stride 1
    chosen = choose_impl("cross_entropy", logits.device, impl)
    fused = torch.is_grad_enabled() and logits.requires_grad and reduction != "none"
    # cross_entropy's "cpu" is the PyTorch rows on CPU tensors (no C++ kernel of its own).
    loss, z_term, _ = _ce_op(logits, target, ignore_index, reduction, float(label_smoothing), float(z_loss),
                             float(logit_softcap or 0.0), fused, "torch" if chosen == "cpu" else chosen)
    return (loss, z_term.detach()) if return_z_loss else loss
