"""LoRA adapters (peft) with LongLoRA's trainable_params.bin.

Fixtures: a tiny random LLaMA folder, a peft LoRA adapter for it with non-zero
weights (``init_lora_weights=False``), and a ``trainable_params.bin`` holding changed
embedding and norm weights, as LongLoRA saves them. The independent reference is
computed here by hand: ``W + (alpha / r) * B @ A`` on a copy of the base weights, the
trainable params copied in, and a fresh transformers model built from that.
"""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from scca_eval.errors import MissingDependency, UserError
from scca_eval.models import adapters, load_model, model_record

VOCAB, RANK, ALPHA = 256, 4, 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))


def _config(**overrides):
    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def _tokenizer(extra_tokens=()):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if extra_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return tokenizer


def _save_base(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(**overrides)).eval()
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return model


def _save_adapter(base_folder, folder, seed=1, targets=TARGETS):
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0,
                      init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(folder)
    return folder


def _trainable_params(base, seed=2, prefix="base_model.model.", extra_rows=0):
    """Changed embedding and norm weights, keyed as LongLoRA's training run saves them."""
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for name, value in base.state_dict().items():
        if "embed" in name or "norm" in name:
            changed = value + 0.1 * torch.randn(value.shape, generator=generator)
            if extra_rows and "embed" in name:
                changed = torch.cat([changed, torch.randn(extra_rows, value.shape[1], generator=generator)])
            params[prefix + name] = changed
    return params


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCCA_EVAL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base_folder = root / "base"
    base = _save_base(base_folder)
    plain_adapter = _save_adapter(base_folder, root / "lora")
    longlora_adapter = root / "longlora"
    shutil.copytree(plain_adapter, longlora_adapter)
    trainable = _trainable_params(base)
    torch.save(trainable, longlora_adapter / "trainable_params.bin")
    return dict(root=root, base_folder=base_folder, base=base, plain=plain_adapter,
                longlora=longlora_adapter, trainable=trainable)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _manual_model(base, adapter_folder, trainable=None):
    """Base weights + trainable params + (alpha/r) B@A on every LoRA target, done by hand."""
    state = {name: value.clone() for name, value in base.state_dict().items()}
    if trainable:
        for key, value in trainable.items():
            state[key.removeprefix("base_model.model.")] = value.clone()
    lora = load_file(adapter_folder / "adapter_model.safetensors")
    config = json.loads((adapter_folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    updated = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        state[target] = state[target] + scale * (b @ a)
        updated += 1
    assert updated == len(TARGETS) * base.config.num_hidden_layers
    rows = state["model.embed_tokens.weight"].shape[0]
    model = LlamaForCausalLM(_config(vocab_size=rows)).eval()
    if rows > base.config.vocab_size:  # the output layer grows by the mean row, as load_model does
        lm_head = state["lm_head.weight"]
        extra = lm_head.mean(dim=0, keepdim=True).expand(rows - lm_head.shape[0], -1)
        state["lm_head.weight"] = torch.cat([lm_head, extra])
    model.load_state_dict(state)
    return model


def _assert_one_line(caught):
    assert str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------ numbers


def test_adapter_changes_the_logits(setup):
    model, _ = load_model(str(setup["base_folder"]), adapter=str(setup["plain"]))
    assert not torch.allclose(_logits(model), _logits(setup["base"]), atol=1e-3)
    torch.testing.assert_close(_logits(model), _logits(_manual_model(setup["base"], setup["plain"])),
                               rtol=1e-5, atol=1e-5)


def test_unmerged_equals_merged_equals_manual(setup):
    unmerged, _ = load_model(str(setup["base_folder"]), adapter=str(setup["longlora"]))
    merged, _ = load_model(str(setup["base_folder"]), adapter=str(setup["longlora"]), merge_adapter=True)
    manual = _manual_model(setup["base"], setup["longlora"], setup["trainable"])

    assert any("lora_A" in name for name, _ in unmerged.named_modules())
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert type(unmerged).__name__ == type(merged).__name__ == "LlamaForCausalLM"
    expected = _logits(manual)
    torch.testing.assert_close(_logits(unmerged), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)
    # The trainable params matter: without them the result is different.
    without = _manual_model(setup["base"], setup["longlora"])
    assert not torch.allclose(_logits(without), expected, atol=1e-3)


@pytest.mark.parametrize("prefix", ["", "base_model.model."])
def test_trainable_params_with_and_without_peft_prefix(setup, tmp_path, prefix):
    folder = tmp_path / "adapter"
    shutil.copytree(setup["plain"], folder)
    trainable = _trainable_params(setup["base"], prefix=prefix)
    torch.save(trainable, folder / "trainable_params.bin")
    model, _ = load_model(str(setup["base_folder"]), adapter=str(folder))
    torch.testing.assert_close(_logits(model), _logits(_manual_model(setup["base"], folder, trainable)),
                               rtol=1e-5, atol=1e-5)


def test_trainable_params_given_separately(setup, tmp_path):
    separate = tmp_path / "elsewhere.bin"
    torch.save(setup["trainable"], separate)
    model, tokenizer = load_model(str(setup["base_folder"]), adapter=str(setup["plain"]), trainable_params=str(separate))
    reference, _ = load_model(str(setup["base_folder"]), adapter=str(setup["longlora"]))
    assert torch.equal(_logits(model), _logits(reference))
    assert model_record(model, tokenizer)["adapter"]["trainable_params"]["path"] == str(separate.resolve())


def test_longlora_pad_token_grows_the_embedding(setup, tmp_path):
    """LongLoRA adds [PAD]: its tokenizer (saved with the adapter) and embedding have one row more."""
    folder = tmp_path / "adapter"
    shutil.copytree(setup["plain"], folder)
    trainable = _trainable_params(setup["base"], extra_rows=1)
    torch.save(trainable, folder / "trainable_params.bin")
    _tokenizer(extra_tokens=["[PAD]"]).save_pretrained(folder)

    model, tokenizer = load_model(str(setup["base_folder"]), adapter=str(folder))
    assert len(tokenizer) == VOCAB + 1
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 1
    record = model_record(model, tokenizer)
    assert record["embedding_resized"]["from"] == VOCAB and record["embedding_resized"]["to"] == VOCAB + 1
    torch.testing.assert_close(_logits(model), _logits(_manual_model(setup["base"], folder, trainable)),
                               rtol=1e-5, atol=1e-5)


def test_model_record_describes_the_adapter(setup, tmp_path):
    model, tokenizer = load_model(str(setup["base_folder"]), adapter=str(setup["longlora"]), merge_adapter=True)
    record = model_record(model, tokenizer)["adapter"]
    assert record["path"] == str(setup["longlora"].resolve())
    assert record["merged"] is True
    assert (record["r"], record["lora_alpha"]) == (RANK, ALPHA)
    assert record["trainable_params"]["tensors"] == len(setup["trainable"])
    # Another adapter (other LoRA weights) has another fingerprint; a copy has the same one.
    other = _save_adapter(setup["base_folder"], tmp_path / "other", seed=9)
    copy = tmp_path / "copy"
    shutil.copytree(setup["longlora"], copy)
    digest = lambda folder: model_record(*load_model(str(setup["base_folder"]), adapter=str(folder)))["adapter"][
        "fingerprint"]["digest"]
    assert digest(other) != record["fingerprint"]["digest"] == digest(copy)
    unmerged = model_record(*load_model(str(setup["base_folder"]), adapter=str(setup["longlora"])))
    assert unmerged["adapter"]["merged"] is False


# ------------------------------------------------------------------ bad input


def test_fully_trained_modules_without_trainable_params_are_refused(setup, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(setup["plain"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["modules_to_save"] = ["embed_tokens", "norm"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trainable_params.bin") as caught:
        load_model(str(setup["base_folder"]), adapter=str(folder))
    _assert_one_line(caught)
    # With the file present the same adapter loads, and gives the hand-computed result.
    torch.save(setup["trainable"], folder / "trainable_params.bin")
    model, _ = load_model(str(setup["base_folder"]), adapter=str(folder))
    torch.testing.assert_close(_logits(model), _logits(_manual_model(setup["base"], folder, setup["trainable"])),
                               rtol=1e-5, atol=1e-5)


def test_adapter_for_another_base_shape(setup, tmp_path):
    other_base = tmp_path / "wider"
    _save_base(other_base, hidden_size=32, intermediate_size=64)
    adapter = _save_adapter(other_base, tmp_path / "wider_lora")
    with pytest.raises(UserError) as caught:
        load_model(str(setup["base_folder"]), adapter=str(adapter))
    _assert_one_line(caught)
    message = str(caught.value)
    assert str(adapter) in message and str(setup["base_folder"]) in message and str(other_base) in message


def test_adapter_for_another_base_layers(setup, tmp_path):
    deeper = tmp_path / "deeper"
    _save_base(deeper, num_hidden_layers=3)
    adapter = _save_adapter(deeper, tmp_path / "deeper_lora")
    with pytest.raises(UserError, match="does not fit model") as caught:
        load_model(str(setup["base_folder"]), adapter=str(adapter))
    _assert_one_line(caught)


def test_adapter_with_missing_target_modules(setup, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(setup["plain"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]  # a GPT-2 module name
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not fit model") as caught:
        load_model(str(setup["base_folder"]), adapter=str(folder))
    _assert_one_line(caught)


@pytest.mark.parametrize("damage", ["unknown key", "wrong shape"])
def test_trainable_params_for_another_model(setup, tmp_path, damage):
    folder = tmp_path / "adapter"
    shutil.copytree(setup["plain"], folder)
    trainable = dict(setup["trainable"])
    if damage == "unknown key":
        trainable["base_model.model.model.layers.7.input_layernorm.weight"] = torch.ones(64)
    else:
        trainable["base_model.model.model.norm.weight"] = torch.ones(32)
    torch.save(trainable, folder / "trainable_params.bin")
    with pytest.raises(UserError, match="base model") as caught:
        load_model(str(setup["base_folder"]), adapter=str(folder))
    _assert_one_line(caught)


class _Payload:
    """Unpickling this would create a file: weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_trainable_params_are_loaded_safely(setup, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(setup["plain"], folder)
    marker = tmp_path / "code_ran"
    torch.save({"model.norm.weight": _Payload(str(marker))}, folder / "trainable_params.bin")
    with pytest.raises(UserError, match="cannot read") as caught:
        load_model(str(setup["base_folder"]), adapter=str(folder))
    _assert_one_line(caught)
    assert not marker.exists()


def test_missing_or_incomplete_adapter_folder(setup, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(setup["base_folder"]), adapter=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_model(str(setup["base_folder"]), adapter=str(tmp_path / "empty"))
    folder = tmp_path / "no_weights"
    shutil.copytree(setup["plain"], folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter_model"):
        load_model(str(setup["base_folder"]), adapter=str(folder))
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(setup["base_folder"]), adapter=str(setup["plain"]), trainable_params=str(tmp_path / "x.bin"))


@pytest.mark.parametrize("keep", [40, 0.5], ids=["header-cut", "data-cut"])
@pytest.mark.parametrize("modules_to_save", [None, ["embed_tokens"]], ids=["lora-only", "with-embedding"])
def test_truncated_adapter_weights_are_one_line(setup, tmp_path, keep, modules_to_save):
    folder = tmp_path / "damaged"
    shutil.copytree(setup["plain"], folder)
    if modules_to_save:  # the fully trained modules are looked up in the weights before peft loads them
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": modules_to_save}))
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(UserError, match=r"adapter weights .*adapter_model.safetensors are damaged .*: save or copy") \
            as caught:
        load_model(str(setup["base_folder"]), adapter=str(folder))
    _assert_one_line(caught)


def test_adapter_config_without_peft_type_is_one_line(setup, tmp_path):
    folder = tmp_path / "empty_config"
    shutil.copytree(setup["plain"], folder)
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"adapter_config.json names no peft_type: the adapter folder is damaged") \
            as caught:
        load_model(str(setup["base_folder"]), adapter=str(folder))
    _assert_one_line(caught)


def test_model_folder_holding_an_adapter_is_refused(setup, tmp_path):
    """transformers would apply the adapter while the record said adapter: null."""
    folder = tmp_path / "base_and_adapter"
    shutil.copytree(setup["base_folder"], folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(setup["plain"] / name, folder / name)
    with pytest.raises(UserError, match=r"holds a LoRA adapter \(adapter_config.json\) beside a model: move the "
                                        r"adapter files to a folder of their own") as caught:
        load_model(str(folder))
    _assert_one_line(caught)


def test_peft_missing_says_how_to_install_it(setup, monkeypatch):
    """peft is a dependency of the default install; an environment without it is told so."""
    real_find_spec = adapters.importlib.util.find_spec
    monkeypatch.setattr(adapters.importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else real_find_spec(name, *a))
    with pytest.raises(MissingDependency, match=r"pip install peft \(scca-eval's default install includes it\)"):
        load_model(str(setup["base_folder"]), adapter=str(setup["plain"]))
