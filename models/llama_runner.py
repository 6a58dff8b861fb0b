"""The only code that touches llama.cpp (through llama-cpp-python's low-level ctypes API).

``LlamaModel`` is the loaded GGUF file: weights, vocabulary, chat template. Its methods
(``tokenize``, ``render_chat``) only read the vocabulary and may be called from the event-loop
thread while the engine thread decodes (llama.cpp's vocabulary is immutable after load).

``LlamaRunner`` owns one ``llama_context`` with ``num_slots`` sequences (slot i = llama seq_id i)
and must only be used from the engine thread. ``run()`` applies the scheduler's KV clears, packs
every scheduled chunk into one ``llama_batch`` and calls ``llama_decode`` once, then samples the
next token of each sequence that reached its end with that sequence's own sampler chain.
ctypes releases the GIL during ``llama_decode``, so the event loop keeps serving meanwhile.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.ctypeslib import as_array as _as_array

import llama_cpp
import llama_cpp._logger  # noqa: F401  (installs llama-cpp-python's log callback)
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from hardware.tuning import LlmShape
from models.scheduler import SchedulerOutput
from models.sequence import SamplingParams, Sequence

log = logging.getLogger("understudy.llama")
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter off

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
"""``llama_token_data`` as numpy sees it (int32, float, float: 12 bytes, no padding)."""
_backend_lock = threading.Lock()
_backend_ready = False

# ChatML, for GGUF files that carry no template of their own.
_FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class LlamaLoadError(Exception):
    pass


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def gpu_offload_supported() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass(frozen=True)
class ChatTemplate:
    formatter: Jinja2ChatFormatter
    bos_text: str


class LlamaModel:
    def __init__(self, path: Path, gpu_layers: int = 0, vocab_only: bool = False) -> None:
        """``vocab_only``: the vocabulary and chat template only (``shape()`` then aborts inside
        llama.cpp: the hardware plan reads shapes from the GGUF header, ``models.gguf``)."""
        _init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.vocab_only = vocab_only
        model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        if not model:
            raise LlamaLoadError(f"llama.cpp could not load {path}")
        self._model = model
        self.path = path
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self._template = self._load_template()
        if vocab_only:
            return
        self.eog: frozenset[int] = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        self.pieces: list[bytes] = [self._piece(t, special=False) for t in range(self.n_vocab)]

    @property
    def handle(self) -> Any:
        return self._model

    def shape(self) -> LlmShape:
        m = self._model
        return LlmShape(
            file_bytes=self.path.stat().st_size,
            n_layer=llama_cpp.llama_model_n_layer(m),
            n_embd=llama_cpp.llama_model_n_embd(m),
            n_head=llama_cpp.llama_model_n_head(m),
            n_head_kv=llama_cpp.llama_model_n_head_kv(m),
            n_ctx_train=self.n_ctx_train,
        )

    def _piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def _load_template(self) -> ChatTemplate:
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        template = raw.decode("utf-8") if raw else _FALLBACK_TEMPLATE
        eos = self._token_text(llama_cpp.llama_vocab_eos(self.vocab))
        bos = self._token_text(llama_cpp.llama_vocab_bos(self.vocab))
        # Jinja2ChatFormatter renders in jinja2's ImmutableSandboxedEnvironment.
        return ChatTemplate(Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos), bos)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self._template.formatter(messages=messages).prompt

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """``special``: add BOS when the model wants it and parse control tokens written in the text."""
        data = text.encode("utf-8")
        add_bos = special and self.add_bos and not (self._template.bos_text and text.startswith(self._template.bos_text))
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, special)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, special)
        return list(buf[:n])

    def grammar_ok(self, grammar: str) -> bool:
        """Whether llama.cpp's grammar parser takes ``grammar`` (event-loop thread: it only reads
        the vocabulary). Called before a request with a grammar is queued."""
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


class LlamaRunner:
    def __init__(
        self,
        model: LlamaModel,
        num_slots: int,
        kv_tokens: int,
        batch_tokens: int,
        threads: int,
        kv_unified: bool,
    ) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = kv_tokens
        params.n_batch = batch_tokens
        params.n_ubatch = batch_tokens
        params.n_seq_max = num_slots
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = kv_unified
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model.handle, params)
        if not ctx:
            raise LlamaLoadError(f"llama.cpp could not create a context of {kv_tokens} tokens")
        self._ctx = ctx
        self._model = model
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(batch_tokens, 0, 1)
        self._capacity = batch_tokens
        self._samplers: dict[int, Any] = {}
        self._grammars: dict[int, Any] = {}
        # Candidate buffers for grammar-constrained sampling, laid out as llama_token_data.
        n_vocab = model.n_vocab
        self._cand = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._cand_array = llama_cpp.llama_token_data_array(
            data=self._cand.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=n_vocab, selected=-1, sorted=False)
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._one_array = llama_cpp.llama_token_data_array(
            data=self._one.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=1, selected=-1, sorted=False)
        self.kv_capacity = llama_cpp.llama_n_ctx(ctx)
        self.decode_s = 0.0
        """Seconds spent inside ``llama_decode`` (read by ``LlmEngine.status``)."""

    # -- engine thread only -----------------------------------------------------------------------
    def warm_up(self) -> None:
        """One throw-away decode so that the first real request does not pay for page faults on
        the mmapped weights and the first touch of the compute buffers (llama-server does the same).

        It must run on the engine thread, like every later decode: libgomp keeps one pool of
        worker threads per thread that ever started a parallel region, and while that thread
        lives its idle pool counts against the CPUs. A warm-up on the loader thread (alive while
        the other models load) made libgomp see more threads than cores and drop to near-zero
        spinning at its barriers: decode from the engine thread was then 30-50 % slower on a
        2-core machine (measured: 10-12 ms against 15-20 ms per single-sequence step)."""
        batch = self._batch
        tokens = [max(0, llama_cpp.llama_vocab_bos(self._model.vocab))] * 8
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if i == len(tokens) - 1 else 0
        batch.n_tokens = len(tokens)
        rc = llama_cpp.llama_decode(self._ctx, batch)
        llama_cpp.llama_memory_clear(self._mem, True)
        if rc != 0:
            raise LlamaLoadError(f"the warm-up decode failed (llama_decode returned {rc})")

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        for slot, start in out.kv_clears:
            llama_cpp.llama_memory_seq_rm(self._mem, slot, start, -1)
        if not out.chunks:
            return {}
        batch = self._batch
        token, pos, n_seq_id, seq_id, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        i = 0
        to_sample: list[tuple[Sequence, int]] = []
        for chunk in out.chunks:
            seq = chunk.seq
            slot = seq.slot
            p = chunk.start
            for t in seq.tokens(chunk.start, chunk.start + chunk.num_tokens):
                token[i] = t
                pos[i] = p
                n_seq_id[i] = 1
                seq_id[i][0] = slot
                logits[i] = 0
                i += 1
                p += 1
            if chunk.needs_sample:
                logits[i - 1] = 1
                to_sample.append((seq, i - 1))
        batch.n_tokens = i
        started = time.perf_counter()
        rc = llama_cpp.llama_decode(self._ctx, batch)
        self.decode_s += time.perf_counter() - started
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {i} tokens")
        ctx = self._ctx
        out_tokens: dict[int, int] = {}
        if not to_sample:
            return out_tokens
        # Plain greedy sequences (the usual case): one argmax over every output row at once,
        # without llama.cpp's candidate array (about 0.2 ms per sequence per step here). The
        # output rows follow the batch order of the tokens that asked for logits, as ``to_sample``.
        rows = _as_array(llama_cpp.llama_get_logits(ctx), shape=(len(to_sample), self._model.n_vocab))
        greedy = [k for k, (seq, _) in enumerate(to_sample) if seq.sampling.is_greedy and not seq.sampling.has_penalties
                  and seq.sampling.grammar is None]
        if greedy:
            best = rows[greedy].argmax(axis=1).tolist() if len(greedy) < len(to_sample) else rows.argmax(axis=1).tolist()
            for k, token in zip(greedy, best):
                out_tokens[to_sample[k][0].seq_id] = token
        if len(greedy) < len(to_sample):
            sample = llama_cpp.llama_sampler_sample
            for seq, idx in to_sample:
                if seq.seq_id in out_tokens:
                    continue
                if seq.sampling.grammar is not None:
                    out_tokens[seq.seq_id] = self._sample_constrained(seq, idx)
                else:
                    out_tokens[seq.seq_id] = sample(self._sampler(seq), ctx, idx)
        return out_tokens

    def clear_slot(self, slot: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, slot, 0, -1)

    def release(self, seq: Sequence) -> None:
        for samplers in (self._samplers, self._grammars):
            sampler = samplers.pop(seq.seq_id, None)
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)

    # -- grammar-constrained sampling (JSON mode) ----------------------------------------------------
    # As llama.cpp's common sampler does: pick a token as if unconstrained, and only when the
    # grammar rejects it, apply the grammar to the whole vocabulary (milliseconds: every
    # candidate's text is matched) and pick again. A model that follows the format pays almost
    # nothing. Only the final token is accepted by the chain (penalties, RNG) and the grammar.
    def _sample_constrained(self, seq: Sequence, idx: int) -> int:
        sp = seq.sampling
        grammar = self._grammars.get(seq.seq_id)
        if grammar is None:
            grammar = llama_cpp.llama_sampler_init_grammar(self._model.vocab, (sp.grammar or "").encode(), b"root")
            if not grammar:  # checked when the request was validated (LlamaModel.grammar_ok)
                raise ValueError("llama.cpp refused the grammar")
            self._grammars[seq.seq_id] = grammar
        row = _as_array(llama_cpp.llama_get_logits_ith(self._ctx, idx), shape=(self._model.n_vocab,))
        plain = sp.is_greedy and not sp.has_penalties
        token = int(row.argmax()) if plain else self._pick(self._sampler(seq), row, None)
        one = self._one
        one[0] = (token, 0.0, 0.0)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self._one_array))
        if not np.isfinite(one[0]["logit"]):  # rejected: constrain the whole vocabulary, pick again
            if plain:
                cand = self._fill(row)
                llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self._array(cand.size)))
                token = int(cand["id"][int(cand["logit"].argmax())])
            else:
                token = self._pick(self._sampler(seq), row, grammar)
        if not plain:
            llama_cpp.llama_sampler_accept(self._sampler(seq), token)
        llama_cpp.llama_sampler_accept(grammar, token)
        return token

    def _fill(self, row: np.ndarray) -> np.ndarray:
        cand = self._cand
        cand["id"] = self._ids
        cand["logit"] = row
        cand["p"] = 0.0
        return cand

    def _array(self, size: int) -> Any:
        arr = self._cand_array  # a sampler may shrink it or point it elsewhere: reset every use
        arr.data = self._cand.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        arr.size = size
        arr.selected = -1
        arr.sorted = False
        return arr

    def _pick(self, chain: Any, row: np.ndarray, grammar: Any) -> int:
        """Apply ``grammar`` (if any) then the sequence's chain to the full vocabulary; no accept."""
        cand = self._fill(row)
        arr = self._array(cand.size)
        if grammar is not None:
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(arr))
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(arr))
        return int(cand["id"][arr.selected])

    def _sampler(self, seq: Sequence) -> Any:
        chain = self._samplers.get(seq.seq_id)
        if chain is None:
            chain = self._samplers[seq.seq_id] = self._build_chain(seq.sampling, seq.max_tokens)
        return chain

    def _build_chain(self, sp: SamplingParams, history: int) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if sp.has_penalties:
            add(chain, llama_cpp.llama_sampler_init_penalties(
                self._model.n_vocab, max(1, history), sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty
            ))
        if sp.is_greedy:
            add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if sp.top_k > 0:
            add(chain, llama_cpp.llama_sampler_init_top_k(sp.top_k))
        if sp.top_p < 1.0:
            add(chain, llama_cpp.llama_sampler_init_top_p(sp.top_p, 1))
        if sp.min_p > 0.0:
            add(chain, llama_cpp.llama_sampler_init_min_p(sp.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(sp.temperature))
        seed = sp.seed if sp.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def close(self) -> None:
        for samplers in (self._samplers, self._grammars):
            for sampler in samplers.values():
                llama_cpp.llama_sampler_free(sampler)
            samplers.clear()
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
