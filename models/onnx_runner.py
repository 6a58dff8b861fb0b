"""The only code that touches onnxruntime and the tokenizer of an embedding model.

``OnnxEmbedder`` is created by ``models.registry`` and then used only by its engine thread.
Sentence embedding = mean of ``last_hidden_state`` over the attention mask, then L2 norm
(all-MiniLM-L6-v2's pooling). Inputs are never truncated: the engine refuses an input longer
than ``max_length`` before it gets here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


PAD_LIMIT = 1.25
"""A sub-batch's padded tokens may be at most this many times its real tokens (``OnnxEmbedder.embed``)."""


class OnnxEmbedder:
    def __init__(self, model_path: Path, tokenizer_path: Path, threads: int, max_length: int,
                 provider: str = "CPUExecutionProvider") -> None:
        """``provider``: the execution provider the hardware plan chose (CPU as the fallback after it)."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(model_path), options, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._output = self._session.get_outputs()[0].name
        self.dimensions = int(self._session.get_outputs()[0].shape[-1])
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        pad = tokenizer.token_to_id("[PAD]")
        self._pad_id = pad if pad is not None else 0
        self.max_length = max_length
        self.embed([self.tokenize(["warm up"])[0]])  # first-run costs paid at load, not by a client

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=True)]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Thread-safe (the Rust tokenizer holds no Python state): any thread may count."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=True)]

    def embed(self, batch: list[list[int]]) -> np.ndarray:
        """Float32 array [len(batch), dimensions], each row L2-normalised, in ``batch``'s order.

        A batch runs as sub-batches of similar lengths (sorted, a new one whenever padding would
        exceed ``PAD_LIMIT`` of the real tokens): one batch padded to its longest input wastes
        most of its work when lengths vary (real triage messages, 27 tokens median and up to 156:
        batch 32 padded as one ran at 52-62 embeddings/s against 130-141 one at a time)."""
        if len(batch) <= 2:
            return self._embed_padded(batch)
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        out = np.empty((len(batch), self.dimensions), dtype=np.float32)
        group: list[int] = []
        real = 0
        for i in order:
            n = len(batch[i])  # ascending: the group's longest if it joins
            if group and n * (len(group) + 1) > PAD_LIMIT * (real + n):
                out[group] = self._embed_padded([batch[j] for j in group])
                group, real = [], 0
            group.append(i)
            real += n
        out[group] = self._embed_padded([batch[j] for j in group])
        return out

    def _embed_padded(self, batch: list[list[int]]) -> np.ndarray:
        longest = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        hidden = self._session.run([self._output], {k: v for k, v in feeds.items() if k in self._inputs})[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
