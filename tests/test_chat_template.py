"""Chat templates come from model files: they render in jinja2's sandbox, and a template that
raises is a 400 for that request, not a crash."""

from __future__ import annotations

import jinja2.exceptions
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from models.catalog import default_catalog
from models.llama_runner import LlamaModel


def test_a_template_cannot_reach_python_internals() -> None:
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    formatter = Jinja2ChatFormatter(template=hostile, eos_token="</s>", bos_token="<s>")
    with pytest.raises(jinja2.exceptions.SecurityError):
        formatter(messages=[{"role": "user", "content": "hi"}])


def test_the_embedded_models_template_renders_chatml() -> None:
    path = default_catalog()[0].path
    assert path is not None
    model = LlamaModel(path, vocab_only=True)
    try:
        prompt = model.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    finally:
        model.close()
    assert prompt.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
