#!/usr/bin/env python3
"""Build ``demo-tiny``: a small, deterministic causal LM of a real architecture.

The checkpoint is a Qwen2 model (GQA, RoPE, SwiGLU) with random weights and a real byte-level
BPE tokenizer trained on a built-in corpus, laid out exactly like a hub checkpoint:

    config.json  generation_config.json
    model-0000N-of-0000M.safetensors ...  model.safetensors.index.json   (bf16, >= 2 shards)
    tokenizer.json  tokenizer_config.json  special_tokens_map.json

It loads offline with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and generates (gibberish:
the weights are random). Every run writes identical bytes, so its checksums can be pinned.

    python scripts/make_demo_model.py --out /tmp/demo-tiny --print-manifest
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

# Training a tokenizer must not fan out over threads: it keeps the merge order reproducible.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 1234
MODEL_NAME = "demo-tiny"
MAX_SHARD_SIZE = "1MB"  # ~2.7 MB of bf16 weights -> 3 shards plus an index

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
# Qwen3-style reasoning markers: plain added tokens (not special) so they survive decoding.
THINK_TOKENS = ["<think>", "</think>"]

# ChatML, as Qwen2.5/Qwen3 use it (system prompt only when the caller gives one).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A model server answers requests over HTTP.
Large language models predict the next token given the tokens that came before it.
The inference service loads safetensors shards from disk straight onto the GPU.
Health checks must keep answering while the model is busy generating text for clients.
Batching several sequences together keeps the accelerator busy and raises throughput.
Streaming sends each token to the client as soon as it is produced, ending with DONE.
Operators deploy models over SSH onto a single host and watch the status endpoint.
Quantization to four bits shrinks memory use; compute still runs in bfloat16.
def generate(prompt, max_tokens=16, temperature=0.7): return model(prompt)
{"role": "user", "content": "Hello! How are you today?"}
{"role": "assistant", "content": "I am fine, thank you. How can I help?"}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1024 2048 3.14 2026-11-23T12:34:56Z
Punctuation and symbols: , . ; : ! ? ' " ( ) [ ] { } < > / \\ | @ # $ % ^ & * - + = _ ~
Unicode: café naïve résumé Zürich São Paulo — “quotes” ‘single’ … ✓ ✗ → ←
system user assistant tool function name arguments content role message choices usage
"""


def build_tokenizer():  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Repeat the corpus so that frequent pairs are clearly ranked; order is fixed.
    lines = CORPUS.splitlines() * 4
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_tokens(THINK_TOKENS)
    return tok


def write_tokenizer_files(tok, out: Path) -> int:
    tok.save(str(out / "tokenizer.json"), pretty=True)
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + THINK_TOKENS
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 2048,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": [IM_START, IM_END],
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
        },
    )
    return int(tok.get_vocab_size(with_added_tokens=True))


def build_model(vocab_size: int, tok, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    padded_vocab = ((vocab_size + 63) // 64) * 64  # like real checkpoints: a multiple of 64
    config = Qwen2Config(
        vocab_size=padded_vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads share each KV head
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(ENDOFTEXT),
        eos_token_id=tok.token_to_id(IM_END),
        pad_token_id=tok.token_to_id(ENDOFTEXT),
        use_cache=True,
    )
    config.dtype = torch.bfloat16
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    gen = GenerationConfig(
        bos_token_id=tok.token_to_id(ENDOFTEXT),
        eos_token_id=[tok.token_to_id(IM_END), tok.token_to_id(ENDOFTEXT)],
        pad_token_id=tok.token_to_id(ENDOFTEXT),
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )
    model.generation_config = gen
    model.save_pretrained(str(out), max_shard_size=MAX_SHARD_SIZE, safe_serialization=True)


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def manifest(out: Path) -> list[tuple[str, int, str]]:
    rows = []
    for p in sorted(out.iterdir()):
        if p.is_file():
            rows.append((p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()))
    return rows


def make_demo_model(out: Path) -> Path:
    """Write the demo checkpoint into ``out`` (created if missing) and return it."""
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = write_tokenizer_files(tok, out)
    build_model(vocab, tok, out)
    shards = sorted(out.glob("model-*.safetensors"))
    if len(shards) < 2 or not (out / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"expected a sharded checkpoint in {out}, got {shards}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--print-manifest", action="store_true", help="print file, size and sha256 per file"
    )
    parser.add_argument(
        "--check", action="store_true", help="load it back with transformers and generate"
    )
    args = parser.parse_args(argv)
    out = make_demo_model(args.out)
    if args.print_manifest:
        total = 0
        for name, size, digest in manifest(out):
            total += size
            print(f"{name:40s} {size:>10d}  {digest}")
        print(f"{'total':40s} {total:>10d}")
    if args.check:
        check(out)
    print(f"{MODEL_NAME} written to {out}", file=sys.stderr)
    return 0


def check(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    print(repr(tok.decode(gen[0][ids["input_ids"].shape[1] :])), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
