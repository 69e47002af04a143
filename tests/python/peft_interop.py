"""Interop checks between rankpilot and Hugging Face transformers + peft.

  peft_interop.py logits <model_dir> <adapter_dir> <reference.safetensors>
      Loads the base model with transformers and the adapter with peft, runs the ids stored in
      the reference file (`ids`), and prints JSON: the largest absolute difference to rankpilot's
      logits (`logits`), the adapter's effect on the logits, the ranks peft built, and any
      warnings (missing/unexpected keys) raised while loading.

  peft_interop.py make <model_dir> <adapter_dir>
      Writes a small random Llama model and a LoRA adapter made by peft itself (random A and B,
      mixed ranks through rank_pattern/alpha_pattern) for `rankpilot squeeze` to compress.

  peft_interop.py family <family> <model_dir> <adapter_dir> <reference.safetensors>
      Builds a small random-init model from the family's own transformers config class (`llama`,
      `llama3` (RoPE scaling + biases), `mistral` (sliding window), `qwen2` (q/k/v biases, a
      sliding upper layer, tied embeddings), `qwen3` (q/k norms, head_dim != hidden/heads)),
      every weight random (biases and norms too), and a random peft LoRA adapter on all seven
      projections. Writes the ids and transformers' logits without and with the adapter.

  peft_interop.py saved <model_dir> <adapter_dir> <reference.safetensors>
      A random Llama and a peft adapter with LoRA on q/v and `modules_to_save=["lm_head"]` (its
      copy perturbed, as if trained); writes the ids, the logits with the adapter and the saved
      lm_head weight.

  peft_interop.py embedded <family> <model_dir> <adapter_dir> <reference.safetensors>
      A random model of the family and a random peft adapter with LoRA on q/v, `lm_head` and
      `embed_tokens` (PEFT's Embedding LoRA); writes the ids and the logits with the adapter.

  peft_interop.py evaluate <model_dir> <adapter_dir or -> <text_file> <seq_len>
      The loss and perplexity transformers + peft give the text file (read as rankpilot reads a
      single-file corpus: the text followed by a blank line), tokenized by AutoTokenizer when the
      model has a tokenizer.json and as raw bytes otherwise, in windows of seq_len + 1 tokens
      starting every seq_len tokens (the last may be shorter).

  peft_interop.py masked <model_dir> <batch.safetensors>
      transformers' loss of the windows `ids` with `labels` = ids where `mask` is true and -100
      elsewhere (the prompt-masked loss of instruction tuning).

  peft_interop.py schedule <name:warmup:total> ...
      The learning-rate multipliers transformers' get_scheduler gives each of `total` steps, for
      every schedule listed.

  peft_interop.py tokenizers <corpus.txt> <out_root> <sample.txt> [messages.json]
      Trains three BPE tokenizers with `tokenizers`, in the styles of GPT-2 (ByteLevel with its
      regex), Llama 3 (Split on Llama 3's pattern, ByteLevel without regex, ignore_merges, a BOS
      added by a TemplateProcessing post-processor, special tokens) and Qwen2 (NFC, Split on
      Qwen's pattern, ByteLevel without regex, chat special tokens), writes
      out_root/<style>/tokenizer.json + tokenizer_config.json, and prints per style the ids of
      the sample from `tokenizers` and from transformers' AutoTokenizer. The Llama-3 and Qwen styles
      get a chat template (Llama 3's header layout with `.strip()` and `raise_exception`, ChatML);
      with a messages file, transformers' `apply_chat_template` text and ids are printed too.

  peft_interop.py autotokenizer <model_dir> <sample.txt>
      Prints the ids AutoTokenizer.from_pretrained(model_dir) gives the sample.

  peft_interop.py squeezed <model_dir> <original_adapter> <squeezed_adapter>
      Loads the squeezed adapter with peft and prints JSON per module: its rank, and the relative
      Frobenius error of its delta weight against the best approximation of the original delta
      weight at that rank (exact SVD).
"""
import json
import sys
import warnings

import torch


def load(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return model, [str(w.message) for w in caught if "key" in str(w.message).lower()]


def lora_modules(model):
    from peft.tuners.lora import LoraLayer

    base = model.base_model.model
    return {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}


def cmd_logits(model_dir, adapter_dir, ref):
    from safetensors.torch import load_file

    model, warns = load(model_dir, adapter_dir)
    d = load_file(ref)
    with torch.no_grad():
        out = model(input_ids=d["ids"]).logits
        with model.disable_adapter():
            base = model(input_ids=d["ids"]).logits
    ranks = {n: m.r["default"] for n, m in lora_modules(model).items()}
    print(json.dumps({
        "max_abs_diff": (out - d["logits"]).abs().max().item(),
        "max_abs_logit": d["logits"].abs().max().item(),
        "adapter_effect": (out - base).abs().max().item(),
        "ranks": ranks,
        "modules_to_save": model.peft_config["default"].modules_to_save,
        "warnings": warns,
    }))


def cmd_make(model_dir, adapter_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(model_dir)
    lcfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"v_proj": 6}, alpha_pattern={"down_proj": 4},
                      init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    peft_model.save_pretrained(adapter_dir)
    print(json.dumps({n: m.r["default"] for n, m in lora_modules(peft_model).items()}))


def family_model(family):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5)
    if family == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False)
        cls = tf.LlamaForCausalLM
    elif family == "llama3":
        # A short pre-training context, so that low, medium and high frequencies all occur.
        cfg = tf.LlamaConfig(**common, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 32})
        cls = tf.LlamaForCausalLM
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
        cls = tf.MistralForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                             tie_word_embeddings=True)
        cls = tf.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False)
        cls = tf.Qwen3ForCausalLM
    else:
        raise SystemExit(f"unknown family {family}")
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def cmd_family(family, model_dir, adapter_dir, ref):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    model = family_model(family)
    model.save_pretrained(model_dir)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"],
                      rank_pattern={"v_proj": 2}, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg).eval()
    peft_model.save_pretrained(adapter_dir)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    save_file({"ids": ids, "logits": base.contiguous(), "adapted": adapted.contiguous()}, ref)
    print(json.dumps({"model_type": model.config.model_type, "adapter_effect": (adapted - base).abs().max().item()}))


def adapted_and_base(peft_model, ids):
    """The logits of `ids` with the adapter, and with it disabled."""
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    return adapted, base


def cmd_saved(model_dir, adapter_dir, ref):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    model = family_model("llama")
    model.save_pretrained(model_dir)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg).eval()
    head = peft_model.base_model.model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(0.05 * torch.randn_like(head.weight))
    peft_model.save_pretrained(adapter_dir)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    adapted, base = adapted_and_base(peft_model, ids)
    save_file({"ids": ids, "adapted": adapted.contiguous(), "lm_head": head.weight.detach().contiguous()}, ref)
    print(json.dumps({"adapter_effect": (adapted - base).abs().max().item()}))


def cmd_embedded(family, model_dir, adapter_dir, ref):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    model = family_model(family)
    model.save_pretrained(model_dir)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head", "embed_tokens"],
                      rank_pattern={"embed_tokens": 3}, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg).eval()
    peft_model.save_pretrained(adapter_dir)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    adapted, base = adapted_and_base(peft_model, ids)
    save_file({"ids": ids, "adapted": adapted.contiguous()}, ref)
    print(json.dumps({"ranks": {n: m.r["default"] for n, m in lora_modules(peft_model).items()},
                      "adapter_effect": (adapted - base).abs().max().item()}))


def cmd_evaluate(model_dir, adapter_dir, text_file, seq_len):
    import math
    import os

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seq_len = int(seq_len)
    with open(text_file, encoding="utf-8", newline="") as f:
        text = f.read() + "\n\n"
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    else:
        ids = list(text.encode("utf-8"))
    if adapter_dir == "-":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    else:
        model, _ = load(model_dir, adapter_dir)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, seq_len):
            w = torch.tensor(ids[s:s + seq_len + 1]).unsqueeze(0)
            logits = model(input_ids=w[:, :-1]).logits[0].float()
            nll += F.cross_entropy(logits, w[0, 1:], reduction="sum").double().item()
            tokens += w.shape[1] - 1
    print(json.dumps({"loss": nll / tokens, "perplexity": math.exp(nll / tokens), "tokens": tokens}))


def cmd_masked(model_dir, batch_file):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d = load_file(batch_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    labels = torch.where(d["mask"].bool(), d["ids"], torch.full_like(d["ids"], -100))
    with torch.no_grad():
        loss = model(input_ids=d["ids"], labels=labels).loss.item()
    print(json.dumps({"loss": loss, "targets": int((labels[:, 1:] != -100).sum())}))


def cmd_schedule(*specs):
    from transformers import get_scheduler

    out = {}
    for spec in specs:
        name, warmup, total = spec.split(":")
        warmup, total = int(warmup), int(total)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        hf = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[name]
        sched = get_scheduler(hf, opt, num_warmup_steps=warmup, num_training_steps=total)
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        out[spec] = lrs
    print(json.dumps(out))


def cmd_squeezed(model_dir, original, squeezed):
    orig, _ = load(model_dir, original)
    orig_delta = {n: m.get_delta_weight("default") for n, m in lora_modules(orig).items()}
    sq, warns = load(model_dir, squeezed)
    out = {"warnings": warns, "modules": {}}
    for n, m in lora_modules(sq).items():
        r = m.r["default"]
        d = m.get_delta_weight("default")
        u, s, vh = torch.linalg.svd(orig_delta[n].double(), full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        rel = ((d.double() - best).norm() / best.norm()).item()
        out["modules"][n] = {"r": r, "orig_r": orig.base_model.model.get_submodule(n).r["default"],
                             "rel_err_vs_best": rel,
                             "energy": (s[:r].square().sum() / s.square().sum()).item()}
    print(json.dumps(out))


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


LLAMA3_CHAT = ("{{ bos_token }}{% for message in messages %}"
               "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
               "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'].strip() + '<|eot_id|>' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def cmd_tokenizers(corpus_file, out_root, sample_file, messages_file=None):
    import os

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    def byte_level_split(pattern):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])

    styles = {
        "gpt2": dict(pre=pre_tokenizers.ByteLevel(add_prefix_space=False), special=["<|endoftext|>"],
                     config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}),
        "llama3": dict(pre=byte_level_split(LLAMA3_PATTERN), ignore_merges=True,
                       special=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                                "<|end_header_id|>"], bos="<|begin_of_text|>",
                       config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT}),
        "qwen": dict(pre=byte_level_split(QWEN2_PATTERN), normalizer=normalizers.NFC(),
                     special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                     config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                             "chat_template": CHATML}),
    }
    with open(sample_file, encoding="utf-8", newline="") as f:
        sample = f.read()
    out = {}
    for name, st in styles.items():
        tok = Tokenizer(models.BPE(ignore_merges=st.get("ignore_merges", False)))
        if "normalizer" in st:
            tok.normalizer = st["normalizer"]
        tok.pre_tokenizer = st["pre"]
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False,
                                      special_tokens=st["special"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train([corpus_file], trainer)
        if "bos" in st:
            bos = st["bos"]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        d = os.path.join(out_root, name)
        os.makedirs(d, exist_ok=True)
        tok.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                       **st["config"]}, f)
        auto = AutoTokenizer.from_pretrained(d)
        out[name] = {"tokenizers": tok.encode(sample).ids, "transformers": auto(sample)["input_ids"],
                     "vocab": tok.get_vocab_size()}
        if messages_file and "chat_template" in st["config"]:
            with open(messages_file, encoding="utf-8") as f:
                messages = json.load(f)
            out[name]["chat_text"] = auto.apply_chat_template(messages, tokenize=False)
            ids = auto.apply_chat_template(messages, tokenize=True)
            out[name]["chat_ids"] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    print(json.dumps(out))


def cmd_autotokenizer(model_dir, sample_file):
    from transformers import AutoTokenizer

    with open(sample_file, encoding="utf-8", newline="") as f:
        sample = f.read()
    auto = AutoTokenizer.from_pretrained(model_dir)
    print(json.dumps({"ids": auto(sample)["input_ids"], "class": type(auto).__name__}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"logits": cmd_logits, "make": cmd_make, "family": cmd_family, "saved": cmd_saved, "embedded": cmd_embedded, "evaluate": cmd_evaluate, "schedule": cmd_schedule, "masked": cmd_masked, "tokenizers": cmd_tokenizers,
     "autotokenizer": cmd_autotokenizer, "squeezed": cmd_squeezed}[cmd](*args)
