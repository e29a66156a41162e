"""The transformer: a Llama-shaped GPT in one file, read top to bottom.

RMSNorm (pre-norm), rotate-half RoPE, grouped-query attention through
F.scaled_dot_product_attention, SwiGLU MLP, no biases, optional tied embeddings; optionally
smeared keys (`model.smear_keys`, `Attention.smeared`), the one part with no Llama equivalent.

Weight names are Hugging Face Llama's minus the leading `model.`:
`embed_tokens.weight`, `layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
`layers.{i}.mlp.{gate,up,down}_proj.weight`, `layers.{i}.{input,post_attention}_layernorm.weight`,
`norm.weight`, `lm_head.weight`. RoPE is rotate-half like HF's, so export is a pure rename
(prefix `model.`), with no permutation of the q/k weights.

The trunk is written once, `GPT.hidden` (embedding, blocks, final norm); `forward` puts the LM
head on it, and a reward model (`RewardModel`, here) or PPO's value head (lmstack/align/rl.py)
put their own heads on it instead.

Inference uses a static KV cache (gpt-fast style): `setup_cache(batch, max_len)` preallocates
it, then `forward(idx, start_pos=p)` writes positions p..p+T-1 and attends to 0..p+T-1.
`forward(idx)` without start_pos is the plain training path (no cache, causal attention).
For inference, `fuse()` merges each block's q/k/v and gate/up weights into one matrix each (a
fused model computes the same function but no longer has the on-disk names), and
`forward(..., last_only=True)` puts the head on the last position only (a prefill).
This file knows nothing of distribution, checkpoints or data.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.config import ModelConfig
from lmstack.utils import UserError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 sums of squares lose precision), cast back, then scale, as HF
        # Llama does. F.rms_norm is one op that does just that (it computes a bf16 input in fp32
        # and rounds once), bit-identical to the written-out x * rsqrt(mean(x^2) + eps) * w.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)


def rope_table(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [max_len, head_dim] in the rotate-half layout (frequencies repeated twice)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x: [B, H, T, D]; cos/sin: [T, D]. Rotates the pairs (x_i, x_{i+D/2}):
    x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] (HF's form; the reference)."""
    return rope(x, cos, signed_sin(sin))


def signed_sin(sin):
    """sin with its first half negated: rotate_half(x) * sin == x.roll(D/2) * signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rope(x, cos, ssin):
    """apply_rope with the sign of rotate_half folded into the table (`signed_sin`): one roll
    instead of chunk, neg and cat, bit-identical (negation is exact)."""
    return x * cos.to(x.dtype) + x.roll(x.shape[-1] // 2, -1) * ssin.to(x.dtype)


def fused_linear(*linears: nn.Linear) -> nn.Linear | None:
    """One bias-free Linear whose output is the given layers' outputs side by side (their weights
    stacked by rows), for inference; None unless every layer is a plain nn.Linear (packed or
    quantized ones stay as they are)."""
    if not all(type(m) is nn.Linear for m in linears):
        return None
    w = torch.cat([m.weight for m in linears]).detach()
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")  # shapes only: w is the weight
    fused.weight = nn.Parameter(w, requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)
        self.qkv_proj = None  # q/k/v in one matrix once `fuse()` ran (inference)
        self.cache_k = self.cache_v = None  # [B, n_kv_head, max_len, head_dim] once setup_cache ran
        # Smeared keys: one mixing logit per key head (see `smeared`), and a cache of the keys as
        # projected (before the mix and RoPE), which the next position's mix reads.
        self.smear = nn.Parameter(torch.zeros(self.n_kv_head)) if cfg.smear_keys else None
        self.cache_raw_k = None

    def caches(self) -> list:
        """The cache tensors of this layer, each [B, n_kv_head, max_len, head_dim]: what a row of
        the cache is, for code that saves and restores rows (prefix caching, GCG's prefix)."""
        return [t for t in (self.cache_k, self.cache_v, self.cache_raw_k) if t is not None]

    def smeared(self, k, start_pos, attn_mask, slot: int):
        """Smeared keys (Olsson et al. 2022, "In-context learning and induction heads"):
        k_t <- (1 - g) k_t + g k_{t-1} per key head, g = sigmoid(self.smear), before RoPE. A head
        with g near 1 keys each position by the token before it, so one layer matches the current
        token against "the previous token" and attends to what followed (an induction head),
        which a plain transformer needs two layers and a long plateau of training to build.
        k_{t-1} is zero at position 0 and where the mask hides position t-1 from t (another packed
        document, left padding). With a cache, the raw keys are kept (`cache_raw_k`): a chunk or a
        decoded token reads its predecessor's from there."""
        if self.smear is None:
            return k
        B, _, T, _ = k.shape
        if start_pos is None:
            prev = F.pad(k[:, :, :-1], (0, 0, 1, 0))
            pos = torch.arange(T, device=k.device).expand(B, T)
        else:
            raw = self.cache_raw_k[slot:slot + B]
            if isinstance(start_pos, torch.Tensor):  # one token per row, each at its own position
                pos = start_pos[:, None]
                raw[torch.arange(B, device=k.device), :, start_pos] = k[:, :, 0]
            else:
                pos = torch.arange(start_pos, start_pos + T, device=k.device).expand(B, T)
                raw[:, :, start_pos:start_pos + T] = k
            before = (pos - 1).clamp(min=0)[:, None, :, None]  # [B, 1, T, 1]
            prev = raw.gather(2, before.expand(B, k.shape[1], T, k.shape[3]))
        seen = pos > 0
        if attn_mask is not None:  # [B or 1, 1, T, keys]: may query t see key t-1?
            m = attn_mask[:, 0].expand(B, T, attn_mask.shape[-1])
            seen = seen & m.gather(2, (pos - 1).clamp(min=0)[:, :, None])[:, :, 0]
        g = torch.sigmoid(self.smear).to(k.dtype)[None, :, None, None]
        return (1 - g) * k + g * (prev.to(k.dtype) * seen[:, None, :, None].to(k.dtype))

    def fuse(self) -> None:
        """Inference only: q/k/v as one Linear (one matrix-vector product instead of three; the
        names on disk are the unfused ones, so a fused model is not saved). Only plain Linear
        layers: packed or quantized ones (a second `for_inference`) stay as they are."""
        if self.qkv_proj is None:
            self.qkv_proj = fused_linear(self.q_proj, self.k_proj, self.v_proj)
            if self.qkv_proj is not None:
                del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, start_pos=None, attn_mask=None, slot: int = 0):
        """cos: [T, D] or [B, 1, 1, D]; sin: the same, as `signed_sin` makes it."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if self.qkv_proj is None:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
            k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            k = self.smeared(k, start_pos, attn_mask, slot)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        elif self.smear is not None:  # one product; the keys mixed before RoPE
            qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2)
            q, v = qkv[:, :H], qkv[:, H + Hkv:]
            q, k = rope(q, cos, sin), rope(self.smeared(qkv[:, H:H + Hkv], start_pos, attn_mask, slot), cos, sin)
        else:  # one product, and RoPE on q and k at once
            qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D)
            qk = rope(qkv[:, :, :H + Hkv].transpose(1, 2), cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, :, H + Hkv:].transpose(1, 2)

        mask, causal = None, True
        if start_pos is not None:  # the cache rows this batch owns (all of them: no slicing)
            ck, cv = self.cache_k, self.cache_v
            if slot or B != ck.shape[0]:
                ck, cv = ck[slot:slot + B], cv[slot:slot + B]
        if isinstance(start_pos, torch.Tensor):
            # One token per row, each at its own position (continuous batching): write each row's
            # key/value at its position; the caller's mask says which cached keys each row sees.
            at = torch.arange(B, device=x.device)
            ck[at, :, start_pos] = k[:, :, 0]
            cv[at, :, start_pos] = v[:, :, 0]
            n = attn_mask.shape[-1]  # keys up to the furthest row: not the whole cache
            k, v = ck[:, :, :n], cv[:, :, :n]
            causal = False
        elif start_pos is not None:
            # Write this chunk into the static cache, then attend to everything up to it.
            end = start_pos + T
            ck[:, :, start_pos:end] = k
            cv[:, :, start_pos:end] = v
            k, v = ck[:, :, :end], cv[:, :, :end]
            if start_pos > 0:
                causal = False  # query i sits at absolute position start_pos+i: it sees keys <= that
                if T > 1:
                    mask = torch.arange(end, device=x.device) <= torch.arange(start_pos, end, device=x.device)[:, None]
        if attn_mask is not None:  # the caller's mask (packed documents, left padding) includes causality
            mask, causal = attn_mask, False
        dtype = q.dtype
        if T == 1 and dtype == torch.bfloat16 and q.device.type == "cpu":
            # One new query (decode): SDPA's bf16 CPU kernel takes several times longer than its
            # fp32 one on cast copies, casts included, and fp32 is no less exact.
            q, k, v = q.float(), k.float(), v.float()
        # GQA: each group of n_head/n_kv_head query heads shares one key/value head. Without a
        # mask SDPA groups them itself (enable_gqa: no copy of k/v, nor of the whole cache for each
        # decoded token); with one, k/v are repeated, as CUDA's kernels that take a mask cannot group.
        if Hkv != H and mask is not None:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T > 1,
                                           enable_gqa=k.shape[1] != q.shape[1])
        return self.o_proj(y.to(dtype).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). 8/3*d hidden keeps the params of a 4*d GELU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.gate_up_proj = None  # gate/up in one matrix once `fuse()` ran (inference)

    def fuse(self) -> None:
        """Inference only: gate/up as one Linear (as `Attention.fuse`)."""
        if self.gate_up_proj is None:
            self.gate_up_proj = fused_linear(self.gate_proj, self.up_proj)
            if self.gate_up_proj is not None:
                del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, start_pos=None, attn_mask=None, slot: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, attn_mask, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


def doc_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, T] (which packed document each token belongs to) -> bool [B, 1, T, T]:
    a token attends to earlier tokens of its own document only. RoPE is relative, so
    positions need no reset at document starts."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.resolve()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise UserError("model.vocab_size is not set (pretrain takes it from the data manifest)")
        self.cfg = cfg
        # Built on the meta device (shapes only: the model folder's loader puts the file's tensors
        # in), nothing is initialised: the values would be thrown away, and a normal init of meta
        # tensors sets up torch's compiler stack (a second per process).
        meta = torch.empty(0).is_meta
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model,
                                         _weight=torch.empty(cfg.vocab_size, cfg.d_model) if meta else None)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Not persistent: derived from the config, so never saved in the weights file.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin_signed", torch.empty(0), persistent=False)  # see `signed_sin`
        if not meta:
            self.init_buffers()
            self.reset_parameters()

    def init_buffers(self) -> None:
        """The RoPE table, computed from the config on the device of the weights (after a build
        on the meta device, which holds shapes only, the model folder's loader calls this)."""
        device = self.embed_tokens.weight.device
        cos, sin = rope_table(self.cfg.d_model // self.cfg.n_head, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos, self.rope_sin_signed = cos.to(device), signed_sin(sin).to(device)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; the two projections that write into the residual
        stream (o_proj, down_proj) get init_std / sqrt(2 * n_layer), so the residual's variance
        does not grow with depth (GPT-2's scaled init). RMSNorm weights start at 1."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("smear"):
                # Spread over the heads, from keys of this token (g = 0.02) to keys of the previous
                # one (0.98): a head starts near either end, and the gates move slowly (one logit
                # for each head, steps of about the learning rate).
                with torch.no_grad():
                    p.copy_(torch.linspace(-4.0, 4.0, p.numel()) if p.numel() > 1 else torch.zeros(1))
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor | None, start_pos=None, attn_mask=None, slot: int = 0,
                embeds: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """idx [B, T] token ids -> logits [B, T, vocab_size] (the arguments: see `hidden`).
        last_only: logits [B, 1, vocab_size] of the last position only (a prefill needs no more;
        the head is the largest matrix of a small model, so computing it T times is waste)."""
        h = self.hidden(idx, start_pos, attn_mask, slot, embeds)
        return self.lm_head(h[:, -1:] if last_only else h)

    def hidden(self, idx: torch.Tensor | None, start_pos=None, attn_mask=None, slot: int = 0,
               embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk: idx [B, T] token ids -> the final normed hidden states [B, T, d_model]
        (what the LM head reads, and what a reward or value head reads instead).

        start_pos=None: training/scoring (no cache). start_pos=p: inference; the tokens sit at
        positions p..p+T-1 and are appended to the KV cache (call setup_cache first), in cache
        rows slot..slot+B-1. start_pos=a LongTensor [B] (with T == 1): each row's token at its
        own position (continuous batching: rows that started at different times); attn_mask
        must then say which cached keys each row sees.
        embeds: [B, T, d_model] input vectors instead of idx (idx None): gradients with respect to
        the input (GCG's token gradients, soft prompts; lmstack/security/gcg.py).
        attn_mask: optional bool [B, 1, T, keys] (True = may attend) replacing the plain causal
        mask, e.g. `doc_causal_mask` for packed sequences or a mask hiding left padding.
        """
        B, T = (idx if embeds is None else embeds).shape[:2]
        cache = self.layers[0].self_attn.cache_k
        if start_pos is not None and (cache is None or slot + B > cache.shape[0]):
            raise ValueError("KV cache missing or too small: call setup_cache(batch, max_len) first")
        if isinstance(start_pos, torch.Tensor):
            if T != 1 or attn_mask is None or start_pos.shape != (B,):
                raise ValueError("per-row positions take one token per row and an attn_mask")
            # (checked in eager mode only: a compiled step must not wait for the positions' values)
            if not torch.compiler.is_compiling() and int(start_pos.max()) >= min(cache.shape[2], attn_mask.shape[-1]):
                raise ValueError(f"a position reaches past the KV cache ({cache.shape[2]}) or the mask")
            # [B, 1, 1, head_dim]: broadcast over heads and the one position
            cos, sin = self.rope_cos[start_pos][:, None, None], self.rope_sin_signed[start_pos][:, None, None]
        else:
            pos = 0 if start_pos is None else start_pos
            if pos + T > self.cfg.max_seq_len:  # the RoPE table ends there
                raise ValueError(f"positions up to {pos + T} exceed max_seq_len {self.cfg.max_seq_len}")
            if start_pos is not None and pos + T > cache.shape[2]:
                raise ValueError("KV cache missing or too small: call setup_cache(batch, max_len) first")
            cos, sin = self.rope_cos[pos:pos + T], self.rope_sin_signed[pos:pos + T]
        x = self.embed_tokens(idx) if embeds is None else embeds
        for layer in self.layers:
            x = layer(x, cos, sin, start_pos, attn_mask, slot)
        return self.norm(x)

    # --- inference ------------------------------------------------------------------------

    def fuse(self) -> None:
        """Inference only: q/k/v and gate/up of every block as one matrix each (two products
        per block fewer). Same function; the weights on disk keep their own names, so a fused
        model is not saved (engine.for_inference fuses)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> None:
        """Preallocate a static KV cache for `batch_size` rows of up to `max_len` positions."""
        max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        p = self.embed_tokens.weight
        shape = (batch_size, self.cfg.n_kv_head, max_len, self.cfg.d_model // self.cfg.n_head)
        for layer in self.layers:
            attn = layer.self_attn
            attn.cache_k = torch.zeros(shape, dtype=dtype or p.dtype, device=p.device)
            attn.cache_v = torch.zeros(shape, dtype=dtype or p.dtype, device=p.device)
            if attn.smear is not None:
                attn.cache_raw_k = torch.zeros(shape, dtype=dtype or p.dtype, device=p.device)

    def move_cache_row(self, src: int, dst: int) -> None:
        """Copy KV cache row `src` into row `dst` (continuous batching keeps its live rows first)."""
        for layer in self.layers:
            a = layer.self_attn
            for t in a.caches():
                t[dst] = t[src]

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.cache_k = layer.self_attn.cache_v = layer.self_attn.cache_raw_k = None

    # --- accounting -----------------------------------------------------------------------

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameters (a tied head counted once). Without embeddings: minus the input embedding
        table, and minus the output head too when it is untied (Kaplan et al.'s "non-embedding"
        N, the number scaling laws use). The same number after `engine.for_inference` packed the
        Linear layers: a packed weight (a module with `.packed`) is no Parameter, so it is counted
        from its shape, and a packed tied head is a copy of the embedding, counted already."""
        c = self.cfg
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        n += sum(m.in_features * m.out_features for name, m in self.named_modules()
                 if hasattr(m, "packed") and not (name == "lm_head" and c.tie_embeddings))
        if not include_embeddings:
            n -= c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), for MFU.

        6 * N_matmul + 12 * n_layer * d_model * seq_len, where
        - N_matmul = non-embedding params + the output head (V*d): every weight that takes part
          in a matmul, 2 FLOPs per weight per token forward and 4 backward (the embedding lookup
          is free, the head matmul is not, tied or not);
        - the attention term counts QK^T and AV: 2 * 2 * seq_len * d_model FLOPs per token per
          layer forward, x3 for forward+backward. Like PaLM/nanoGPT it counts the full
          seq_len x seq_len scores, not the causal half.
        """
        c = self.cfg
        n_matmul = self.num_params(include_embeddings=False) + c.vocab_size * c.d_model
        return 6 * n_matmul + 12 * c.n_layer * c.d_model * seq_len


class RewardModel(GPT):
    """A GPT whose output is one score per sequence: `score_head` (Linear d_model -> 1, no bias:
    the Bradley-Terry loss only sees differences) on the final hidden state at position `last`
    of each row (the answer's closing <|end|>, where the model has read the prompt and the whole
    answer). Same weight names as the GPT plus `score_head.weight`. The LM head stays (tied, it
    is the embedding; untied, it is frozen and unused)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.score_head = nn.Linear(cfg.d_model, 1, bias=False)
        nn.init.zeros_(self.score_head.weight)  # every answer scores 0 at first: loss = ln 2
        if not cfg.tie_embeddings:
            self.lm_head.weight.requires_grad_(False)

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "RewardModel":
        """The weights of a language model (the SFT model) and a fresh (zero) score head."""
        rm = cls(dataclasses.replace(gpt.cfg)).to(gpt.embed_tokens.weight.device)
        missing, unexpected = rm.load_state_dict(gpt.state_dict(), strict=False)
        if missing != ["score_head.weight"] or unexpected:
            raise RuntimeError(f"unexpected weights: missing {missing}, unexpected {unexpected}")
        return rm

    def forward(self, idx: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (fp32): [B] at positions `last` [B], or [B, T] at every position. Plain causal
        attention, so right padding never changes the real tokens' states."""
        h = self.hidden(idx)
        if last is not None:
            h = h[torch.arange(h.shape[0], device=h.device), last]
        return self.score_head(h).squeeze(-1).float()

    def flops_per_token(self, seq_len: int) -> int:
        """As GPT's, without the vocabulary head (a reward model never computes logits)."""
        c = self.cfg
        return 6 * self.num_params(include_embeddings=False) + 12 * c.n_layer * c.d_model * seq_len
