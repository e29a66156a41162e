"""Weight-only quantization for inference: the Linear layers' weights in int8 (or int4), the
activations, norms, embedding lookup and KV cache in bf16.

Batch-1 decode reads every weight once per token, so fewer bytes per weight is more tokens per
second, as long as the kernel turns the small integers back into numbers faster than memory
would have delivered the bf16 ones.

- int8 (`Int8Linear`): symmetric, one scale per output channel (row): w ~ q * s, q in
  [-127, 127], s = max|row| / 127. Per-channel rather than GGUF Q8_0's blocks of 32 with an fp16
  scale each, because torch's CPU kernel `aten._weight_int8pack_mm` takes one scale per output row
  (it multiplies once, after the row's dot product); with 8 bits the per-row grid is already fine
  (bench/README.md has the measured loss cost). `export gguf --dtype q8_0` writes llama.cpp's own
  blocks of 32 for llama.cpp.
- int4 (`Int4Linear`): asymmetric, groups of `group_size` inputs with a bf16 scale and offset each
  (gpt-fast's int4 weight-only), through `aten._weight_int4pack_mm_for_cpu` (CPU only).

The head: a tied head gets its own quantized copy of the embedding (the head is often the
largest matrix, 32000 x 768 at the 110M shape, and every token reads all of it); the embedding
lookup keeps its bf16 table, since a lookup reads one row per token (llama.cpp's Q8_0 quantizes
token_embd too, so a Q8_0 file also rounds the input embeddings; ours do not).

On a GPU, `Int8Linear` dequantises in the matmul (the int8 weight turned into the activation's
dtype, multiplied, scaled per channel): the memory holds int8; eagerly the conversion is its own
kernel per call, which torch.compile can fuse into the product (what gpt-fast does). `Int4Linear`
is CPU only.

A quantized model is for inference only: `train()` and `state_dict()` (what training and saving
call) raise a one-line UserError; load the original weights again to train or save.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.utils import UserError

QUANTIZED = ("int8", "int4")  # the for_inference dtypes this module makes
INFERENCE_ONLY = ("a quantized (int8/int4) model is for inference only: it cannot be trained or saved; "
                  "load the original weights to do that")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q [N, K] int8, scales [N] fp32) with w ~ q * scales[:, None]."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit (gpt-fast's layout): (q [N, K] int32 in 0..15, scales and zeros
    [N, K / group_size] fp32) with w ~ (q - 8) * scale + zero per group."""
    w = w.detach().float()
    N, K = w.shape
    g = w.reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    zeros = lo + scales * 8  # the value of q = 8, the middle of the range
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(N, K), scales, zeros


class _Quantized(nn.Module):
    """What the quantized layers share: inference only, and the in/out sizes (GPT.num_params
    counts a module with `.packed`, a weight in a kernel's layout that is no Parameter, from them)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("quantized layers take bias-free Linear layers")
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def train(self, mode: bool = True):
        if mode:
            raise UserError(INFERENCE_ONLY)
        return super().train(False)

    def state_dict(self, *args, **kwargs):
        raise UserError(INFERENCE_ONLY)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(_Quantized):
    """A bias-free nn.Linear with an int8 weight and one scale per output channel (`quantize_int8`).
    The scales are kept in the activations' dtype (`dtype`), which the CPU kernel requires; it is
    fast with bf16 activations (fp32 ones take a slow path there)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__(linear)
        q, scales = quantize_int8(linear.weight)
        self.register_buffer("packed", q)
        self.register_buffer("scales", scales.to(dtype))

    def forward(self, x):
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.packed, self.scales)
            return y.view(*x.shape[:-1], self.out_features)
        return self.dequantised_matmul(x)

    def dequantised_matmul(self, x):
        """The GPU path (any device): the int8 weight in x's dtype, the product, the per-channel scales."""
        return F.linear(x, self.packed.to(x.dtype)) * self.scales


class Int4Linear(_Quantized):
    """A bias-free nn.Linear with a 4-bit group-wise weight (`quantize_int4`), bf16 activations, CPU
    only. The kernel wants whole groups of inputs and output rows in tiles of 16 (`fits`); `quantize`
    gives a layer that does not fit int8 instead."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__(linear)
        if not self.fits(linear, group_size):
            raise ValueError(f"int4 takes a {linear.out_features} x {linear.in_features} weight only with rows a "
                             f"multiple of 16 and columns a multiple of {group_size}")
        q, scales, zeros = quantize_int4(linear.weight, group_size)
        self.group_size = group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # [K / group, N, 2]: per group and output channel, (scale, zero)
        self.register_buffer("scales_zeros", torch.stack([scales.t(), zeros.t()], -1).to(torch.bfloat16).contiguous())

    @staticmethod
    def available() -> bool:
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")

    @staticmethod
    def fits(linear: nn.Linear, group_size: int = 32) -> bool:
        """The kernel's shapes: output rows in tiles of 16, inputs in whole groups."""
        return linear.out_features % 16 == 0 and linear.in_features % group_size == 0

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                        self.packed, self.group_size, self.scales_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize(model: nn.Module, kind: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap every bias-free nn.Linear of `model` (a tied head included: it gets its own quantized
    copy) for `Int8Linear` (kind "int8") or `Int4Linear` ("int4"), in place. The rest of the model
    should already be in `dtype` (bf16)."""
    if kind == "int4" and next(model.parameters()).device.type != "cpu":
        raise UserError("int4 runs on a CPU only (torch's int4 CPU kernel); use int8 on a GPU")
    if kind == "int4" and not Int4Linear.available():
        raise UserError(f"int4 needs torch's int4 CPU kernel (torch >= 2.6; this is {torch.__version__}); use int8")
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear and child.bias is None:
                four = kind == "int4" and Int4Linear.fits(child)  # else int8 (a head of 3444 rows, say)
                setattr(module, name, Int4Linear(child) if four else Int8Linear(child, dtype))
    return model


def quantized_kind(model: nn.Module) -> str | None:
    """"int4" | "int8" for a model `quantize` made (int4 where any layer is), else None."""
    kinds = {type(m) for m in model.modules()}
    return "int4" if Int4Linear in kinds else "int8" if Int8Linear in kinds else None
