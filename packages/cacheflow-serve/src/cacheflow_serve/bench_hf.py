"""The ``--baseline hf`` runs: HF transformers ``generate`` on the benchmark's prompts.

Prompts of a batch are left-padded into one tensor with an attention mask; every row generates
the batch's largest requested count (HF cannot stop rows at different lengths without an EOS),
so only the requested tokens are counted. Greedy, no early stop, SDPA attention, same dtype and
device as the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class HFGenerator:
    """An HF causal LM loaded from the benchmark's checkpoint."""

    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        from cacheflow_models.hf_config import split_gguf_path

        folder, gguf_file = split_gguf_path(path)
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=gguf_file, dtype=dtype, attn_implementation="sdpa",
            local_files_only=True).to(device)
        self.model.eval()
        self.pad_id = 0
        # min_new_tokens already masks EOS; no EOS at all also keeps generate from stopping.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = self.pad_id

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy ``max_new_tokens`` tokens for each prompt, as one batch; the new ids per row."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            out = self.model.generate(
                ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
        return out[:, width:].tolist()

    def close(self) -> None:
        """Drops the weights (the engine needs the memory next)."""
        self.model = None
