"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def exact_norms(monkeypatch):
    """Hugging Face's RMSNorm computes in float32 even in a float64 model, in forward and in backward, so a
    gradient summed before a norm (a prompt shared by its group in ``grpokit.models.packed``, one micro-batch) and one
    summed after it differ by float32 rounding. This makes the norms of every Llama-family model compute in
    the input dtype, so that float64 comparisons can be held to float64 rounding."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for cls in (modeling_llama.LlamaRMSNorm, modeling_mistral.MistralRMSNorm, modeling_qwen2.Qwen2RMSNorm,
                modeling_qwen3.Qwen3RMSNorm):
        monkeypatch.setattr(cls, "forward", forward)
