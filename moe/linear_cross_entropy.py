"""Cross-entropy of the output layer, computed a chunk of tokens at a time, gradients included.

The plain way, F.cross_entropy(F.linear(h, W).float(), labels), writes all N x V logits, reads them back for the
log-softmax, writes its N x V output, and in the backward pass makes two more N x V passes before the two
matrix products. For a small model that memory traffic, not arithmetic, is a large share of the step (a 4-layer,
width-256 MoE with a vocabulary of 8192 on a 2-core CPU: about a third of the step). Here each chunk's logits
stay in cache: the forward computes the chunk's loss and, since the loss is a scalar, already its gradients
(softmax minus one-hot, times the chunk's matrices), which the backward only scales. The same arithmetic and no
N x V tensor, the fused linear cross-entropy of Liger-Kernel (Hsu et al. 2024) and Apple's Cut Cross-Entropy
(Wijmans et al. 2024) in plain PyTorch.

Matches F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=ignore_index) (mean over the
labels that are not ignored; NaN when all are) in value and gradients, up to summation order. float16, whose
range cannot hold the unscaled gradient, and a DTensor weight take that plain route (see linear_cross_entropy).
Shapes: N tokens, D model dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default: labels equal to it take no part in the loss

# Logit elements (rows x V) per chunk. On a CPU the chunk's float32 logits should stay in the caches while the
# weight gradient, a (V, D) sum over chunks, is not re-read and re-written too often: V = 8192, 2 cores, whole
# training step paired A/B: 256 or 512 rows 4-5% faster than 128 and 2% faster than 1024. A GPU wants large
# matrix products and has the memory for them (V = 32000, bf16: 8388 rows, a 1 GiB float32 buffer and about as much
# again in temporaries at the chunk's peak, plus a float32 weight gradient held until the backward; the unchunked
# loss holds several B x T x V tensors, 2 GiB each in float32, at B=8, T=2048).
CPU_CHUNK_ELEMENTS = 1 << 21
GPU_CHUNK_ELEMENTS = 1 << 28


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows, grad_enabled):
        # needs_input_grad follows requires_grad, not grad mode: under no_grad (evaluation) skip the gradients.
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        want_weight = grad_enabled and ctx.needs_input_grad[1]
        n_valid = (labels != ignore_index).sum()
        # 1 / n_valid is the gradient of the mean with respect to each valid token's loss; with no valid token
        # the loss is NaN (0 / 0, as in F.cross_entropy) and every gradient zero.
        inv_valid = 1.0 / n_valid.clamp_min(1).float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Summed over chunks in float32 whatever the weight's dtype, as one unchunked matrix product would.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        # One buffer for every chunk's logits: a fresh multi-megabyte tensor per chunk costs the CPU allocator
        # new pages each time, which made the logits' matmul a third slower than the same product into reused
        # memory.
        buffer = hidden.new_empty(weight.shape[0] * min(chunk_rows, hidden.shape[0]), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, y = hidden[rows], labels[rows]
            # Vocabulary-major (V, n): the large weight is the left operand and the weight gradient's product
            # takes this layout as it is. The matmul in the input dtype, the softmax in float32.
            logits = buffer[: weight.shape[0] * h.shape[0]].view(weight.shape[0], h.shape[0])  # (V, n)
            if h.dtype == torch.float32:
                torch.mm(weight, h.T, out=logits)
            else:
                logits.copy_(weight @ h.T)
            valid = y != ignore_index
            target = torch.where(valid, y, 0)[None, :]  # (1, n)
            lse = torch.logsumexp(logits, dim=0, keepdim=True)  # (1, n)
            total += ((lse - logits.gather(0, target)).squeeze(0) * valid).sum()
            if not (want_hidden or want_weight):
                continue
            # d(mean loss)/d(logits) = (softmax - one_hot(target)) / n_valid on valid columns, zero on ignored
            # ones; built in place in the logits' storage.
            grad_logits = logits.sub_(lse).exp_()
            grad_logits.scatter_add_(0, target, torch.full_like(lse, -1.0))
            grad_logits.mul_((valid.float() * inv_valid)[None, :])
            grad_logits = grad_logits.to(h.dtype)
            if want_hidden:
                grad_hidden[rows] = grad_logits.T @ weight  # (n, D)
            if want_weight:
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits, h)
                else:
                    grad_weight += (grad_logits @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / n_valid.float()

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients were computed in the forward: no second order
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # grad_loss stays a float32 scalar: multiplying keeps the tensor's dtype but computes in float32, so a
        # loss scale or an accumulation factor like 1/3 is not rounded to bf16 first.
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def default_chunk_rows(vocab_size: int, device: torch.device) -> int:
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(1, budget // vocab_size)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy (float32 scalar) of logits hidden @ weight.T against labels, without materialising the
    logits. hidden (N, D) or (B, T, D), weight (V, D), labels (N,) or (B, T) with ignore_index for no target."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {labels.shape[0]} labels")
    rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.device)
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if (torch.get_autocast_dtype(device_type) if autocast else hidden.dtype) == torch.float16 or _is_dtensor(weight):
        # float16 trains with a loss scale that only the backward pass sees, while this function forms the logits'
        # gradient (about p / N, far below float16's smallest number for a large batch) in the forward: it would
        # underflow to zero. The unchunked loss receives the scaled gradient before rounding to float16.
        # A weight that is a DTensor (an output layer sharded by a parallel plan) also takes the unchunked route,
        # whose ops DTensor knows how to distribute.
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    grad_enabled = torch.is_grad_enabled()
    if autocast:
        # Under autocast (bf16-mixed) the output layer runs in the autocast dtype, as F.linear would. Inside the
        # function autocast is off: its logits matmul writes into a float32 buffer (out=), which autocast leaves in
        # the inputs' dtype, and would have run in float32. The casts are differentiable, so the gradients reach
        # the float32 weights as they would through F.linear.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _LinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), labels, ignore_index, rows,
                                             grad_enabled)
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, rows, grad_enabled)
