"""A tiny model and tokenizer of the runtime's own, so that the engine, scheduler and block
manager are tested here without cacheflow-models: a two-layer rotary decoder built from the
runtime's layers, loaded by import path (``engine_testutil:TinyDecoder``) from a safetensors
checkpoint the test writes, and a character tokenizer."""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from cacheflow_runtime import (
    CacheConfig,
    LLMEngine,
    ModelConfig,
    RequestOutput,
    SamplingParams,
    SchedulerConfig,
)
from cacheflow_runtime.attention import InputMetadata
from cacheflow_runtime.layers.activation import SiluAndMul
from cacheflow_runtime.layers.attention import GPTNeoXCacheFlowAttention
from cacheflow_runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cacheflow_runtime.layers.layernorm import RMSNorm
from cacheflow_runtime.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)

ALPHABET = string.ascii_lowercase + string.digits + " .,!?"
EOS = len(ALPHABET)  # one past the characters
VOCAB = EOS + 1


@dataclass
class TinyConfig:
    """The tiny decoder's shape."""

    vocab_size: int = VOCAB
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 48
    max_position: int = 512


class TinyLayer(nn.Module):
    """Pre-norm block: rotary GQA attention, then a SiLU-gated MLP."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        head = cfg.hidden_size // cfg.num_heads
        self.qkv = QKVParallelLinear(cfg.hidden_size, head, cfg.num_heads, cfg.num_kv_heads,
                                     bias=False)
        self.attn = GPTNeoXCacheFlowAttention(self.qkv.num_heads, head, head ** -0.5, head,
                                              max_position=cfg.max_position,
                                              num_kv_heads=self.qkv.num_kv_heads)
        self.o = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.up = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2,
                                             bias=False)
        self.act = SiluAndMul()
        self.down = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.norm1 = RMSNorm(cfg.hidden_size)
        self.norm2 = RMSNorm(cfg.hidden_size)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: Any,
                metadata: InputMetadata) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.qkv.q_size, self.qkv.kv_size, self.qkv.kv_size], dim=-1)
        x = x + self.o(self.attn(positions, q, k, v, kv_cache, metadata))
        return x + self.down(self.act(self.up(self.norm2(x))))


class TinyDecoder(nn.Module):
    """The model protocol of the runtime, in its smallest form."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinyLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[Any],
                input_metadata: InputMetadata) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(positions, x, cache, input_metadata)
        return self.norm(x)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     weights_format: str = "safetensors") -> None:
        params = dict(self.named_parameters())
        for name, tensor in weights:
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor)


def write_checkpoint(folder: Path, seed: int = 0, config: Optional[TinyConfig] = None) -> Path:
    """Writes random weights (scaled so that logits vary) for the tiny decoder; returns the
    folder."""
    config = config or TinyConfig()
    torch.manual_seed(seed)
    model = TinyDecoder(config)
    tensors = {}
    for name, param in model.named_parameters():
        scale = 1.0 if "norm" in name else 0.35
        tensors[name] = (torch.randn_like(param) * scale + (1.0 if "norm" in name else 0.0))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def model_config(folder: Path, config: Optional[TinyConfig] = None) -> ModelConfig:
    """The runtime's view of the tiny decoder at ``folder``."""
    config = config or TinyConfig()
    return ModelConfig(model_path=str(folder), architecture="engine_testutil:TinyDecoder",
                       hf_config=config, num_layers=config.num_layers,
                       num_attention_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                       head_size=config.hidden_size // config.num_heads,
                       hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                       max_model_len=config.max_position, dtype=torch.float32,
                       eos_token_id=EOS, weights_format="safetensors")


class CharTokenizer:
    """One token per character of ALPHABET, plus EOS (decoded as nothing)."""

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.convert_ids_to_tokens(ids, skip_special_tokens))

    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool = True,
                              ) -> list[str]:
        return [ALPHABET[i] if i < EOS else ("" if skip_special_tokens else "</s>")
                for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


def make_engine(folder: Path, *, blocks: int = 256, block_size: int = 8,
                enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                max_num_batched_tokens: Optional[int] = None, max_num_seqs: int = 64,
                preemption_mode: str = "recompute", cpu_blocks: int = 256,
                tokenizer: Any = None, async_scheduling: bool = True) -> LLMEngine:
    """An engine over the tiny decoder on the CPU (float32, reference attention)."""
    cache = CacheConfig(block_size=block_size, num_device_blocks=blocks, num_cpu_blocks=cpu_blocks,
                        enable_prefix_caching=enable_prefix_caching)
    sched = SchedulerConfig(max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens, max_model_len=512,
                            preemption_mode=preemption_mode,
                            enable_chunked_prefill=enable_chunked_prefill,
                            async_scheduling=async_scheduling)
    return LLMEngine(model_config(folder), cache, sched, tokenizer or CharTokenizer(), "cpu")


def run_all(engine: LLMEngine, prompts: list[list[int]],
            params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
    """Runs the prompts as one batch to the end; outputs in prompt order."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    base = engine.get_num_unfinished_requests()
    ids = [f"r{base}-{i}-{id(prompts)}" for i in range(len(prompts))]
    for rid, ids_, p in zip(ids, prompts, per_prompt):
        engine.add_request(rid, None, p, ids_)
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[rid] for rid in ids]


class RecordingObserver:
    """A request observer (``RequestObserver``) that records every time to first token and
    inter-token latency it is given."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []

    def observe_time_to_first_token(self, seconds: float) -> None:
        """Records one time to first token."""
        self.ttft.append(seconds)

    def observe_inter_token_latency(self, seconds: float) -> None:
        """Records one inter-token latency."""
        self.itl.append(seconds)


def make_high_byte_tokenizer() -> Any:
    """A byte-level HF fast tokenizer whose ids below VOCAB are mostly the bytes of multi-byte
    characters (lead and continuation bytes, in no order), so that the tiny model's outputs
    often hold invalid UTF-8 and characters split over tokens, as a random 7B model's do; ids
    0-2 are the special tokens <unk>, <s>, </s>. Needs transformers and tokenizers."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_char = _byte_level_chars()
    chosen = [0x20, 0x61, 0x62, 0x63, 0x64, 0xC3, 0xA9, 0xA8, 0xE6, 0x97, 0xA5, 0xE8, 0xAA,
              0x9E, 0xF0, 0x9F, 0x98, 0x80, 0xFF, 0xC0]
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>"])}
    for b in chosen:
        vocab[byte_char[b]] = len(vocab)
    for b in range(255, -1, -1):  # every byte once, so that any text encodes
        vocab.setdefault(byte_char[b], len(vocab))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>")


def _byte_level_chars() -> list[str]:
    """The byte-level pre-tokenizer's character of each byte 0..255 (GPT-2's mapping)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars
