"""The real engine: a Hugging Face causal LM loaded from a local safetensors checkpoint."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from remote_service.engine.base import (
    EngineInfo,
    EngineLoadError,
    EngineObserver,
    GenerationDefaults,
)
from remote_service.engine.batched import BatchedEngine, Loaded
from remote_service.engine.loading import from_pretrained_kwargs, plan_load
from remote_service.settings import Settings

log = logging.getLogger(__name__)


class TransformersEngine(BatchedEngine):
    def __init__(self, settings: Settings, observer: EngineObserver | None = None) -> None:
        super().__init__(settings, observer)
        self._tokenizer: Any = None
        # transformers' fast tokenizers reconfigure padding/truncation on every call, which
        # Rust forbids while another thread encodes: serialise access.
        self._tok_lock = threading.Lock()

    def _load_model(self) -> Loaded:
        plan = plan_load(self.settings)
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from remote_service.engine.torch_runner import TorchBatchRunner

        transformers.utils.logging.disable_progress_bar()  # no tqdm bars in the journal

        model_dir = str(plan.model_dir)
        log.info(
            "loading %s from %s (device=%s dtype=%s quantization=%s)",
            self.settings.served_model_name,
            model_dir,
            plan.device,
            plan.dtype,
            plan.quantization,
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(model_dir, **from_pretrained_kwargs(plan))
        except (OSError, ValueError, ImportError) as exc:
            raise EngineLoadError(f"cannot load {model_dir}: {exc}") from exc
        model.eval()
        self._tokenizer = tokenizer

        config = model.config.get_text_config()
        model_len = int(getattr(config, "max_position_embeddings", 0) or 2048)
        max_model_len = min(self.settings.max_model_len or model_len, model_len)
        gen = model.generation_config
        eos = _as_set(gen.eos_token_id) | _as_set(config.eos_token_id)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        try:
            runner = TorchBatchRunner(
                model,
                pad_id=int(pad),
                vocab_size=len(tokenizer),
                max_num_seqs=self.settings.max_num_seqs,
                max_model_len=max_model_len,
                prefill_chunk=self.settings.prefill_chunk,
            )
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            raise EngineLoadError(
                f"cannot allocate the KV cache for ASOBA_MAX_NUM_SEQS={self.settings.max_num_seqs}"
                f" x ASOBA_MAX_MODEL_LEN={max_model_len}: {exc}; lower either setting"
            ) from exc
        log.info(
            "KV cache: %d slots x %d tokens, %.1f MiB",
            self.settings.max_num_seqs,
            max_model_len,
            runner.cache.nbytes / 2**20,
        )
        info = EngineInfo(
            backend="transformers",
            model_name=self.settings.served_model_name,
            device=str(plan.device),
            dtype=str(model.dtype).removeprefix("torch."),
            quantization=plan.quantization,
            max_model_len=max_model_len,
            max_num_seqs=self.settings.max_num_seqs,
            vocab_size=min(len(tokenizer), runner.embedding_rows),
            versions={"torch": torch.__version__, "transformers": transformers.__version__},
        )
        return Loaded(runner=runner, eos_ids=eos, info=info, defaults=_defaults(gen))

    def _decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if self._tokenizer is None:
            raise EngineLoadError("the tokenizer is not loaded yet")
        with self._tok_lock:
            ids = self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return [int(i) for i in ids]

    def render_chat(
        self, messages: list[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None
    ) -> str:
        if self._tokenizer is None:
            raise EngineLoadError("the tokenizer is not loaded yet")
        if not getattr(self._tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **dict(template_kwargs or {})
            )
        except Exception as exc:  # jinja's TemplateError, raise_exception() in templates, ...
            raise ValueError(str(exc) or type(exc).__name__) from exc
        return str(text)


def _as_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, list | tuple | set):
        return {int(v) for v in value}
    return {int(value)}


def _defaults(gen: Any) -> GenerationDefaults:
    """The checkpoint's sampling defaults; greedy when it does not sample."""
    if not getattr(gen, "do_sample", False):
        return GenerationDefaults(
            temperature=0.0, repetition_penalty=float(gen.repetition_penalty or 1.0)
        )
    return GenerationDefaults(
        temperature=float(gen.temperature if gen.temperature is not None else 1.0),
        top_p=float(gen.top_p if gen.top_p is not None else 1.0),
        top_k=int(gen.top_k or 0),
        repetition_penalty=float(gen.repetition_penalty or 1.0),
    )
