import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny import make_tokenizer, save_tiny, tiny_llama, tiny_qwen2  # noqa: E402


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def llama(tok):
    return tiny_llama(tok)


@pytest.fixture
def qwen(tok):
    return tiny_qwen2(tok)


@pytest.fixture
def tiny_ckpt(tmp_path, tok):
    """Path of a saved tiny Llama checkpoint (tied embeddings) with a chat-template tokenizer."""
    return save_tiny(tmp_path / "tiny-llama", tiny_llama(tok), tok)
