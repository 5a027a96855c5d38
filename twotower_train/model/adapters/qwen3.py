"""Qwen3: Llama wiring plus per-head RMSNorm on queries and keys (``q_norm``/``k_norm``)
applied before RoPE."""

from __future__ import annotations

from .llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    model_types = ("qwen3",)

    def qk_norm(self, attn, q, k):
        return attn.q_norm(q), attn.k_norm(k)
