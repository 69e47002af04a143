//! End to end: `rankpilot finetune` / `squeeze` / `pretrain` through the binary, and interop with
//! Python transformers + peft (the set-up's venv).

mod common;

use std::path::Path;

use tch::{Device, Kind, Tensor};
use tune::model::llama::Llama;
use tune::peft::PeftAdapter;

fn small_model(dir: &Path) {
    common::small_model(dir, 3, 64, 96, 2);
}

fn text_file(dir: &Path) -> String {
    common::text_file(dir, 60)
}

use common::peft_interop as python;

#[test]
fn finetune_cli_exports_a_peft_adapter_that_transformers_and_peft_reproduce() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    small_model(&model);
    let data = text_file(tmp.path());
    let logdir = tmp.path().join("run");
    let peft_dir = tmp.path().join("peft");
    let o = common::rankpilot(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--ranks",
        "q_proj=4,v_proj=2,layers.1.mlp.down_proj=5,3",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--eval-every",
        "6",
        "--eval-batches",
        "2",
        "--resize-at",
        "6:q_proj=6,k_proj=1,2",
        "--lr",
        "0.01",
        "--seed",
        "1",
        "--device",
        "cpu",
        "--logdir",
        logdir.to_str().unwrap(),
        "--export-peft",
        peft_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::text(&o));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(logdir.join("summary.json")).unwrap()).unwrap();
    assert!(summary["val_loss_final"].as_f64().unwrap() < summary["val_loss_initial"].as_f64().unwrap(), "{summary}");
    assert_eq!(summary["ranks"]["model.layers.0.self_attn.q_proj"], 6);
    assert_eq!(summary["ranks"]["model.layers.1.self_attn.k_proj"], 1);
    assert!(logdir.join("adapter/adapter_config.json").is_file());
    assert!(
        std::fs::read_dir(&logdir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("events.out.tfevents")),
        "no TensorBoard event file in {}",
        logdir.display()
    );

    // rankpilot's own logits with the exported adapter, read back from disk.
    let (mut m, _vs) = Llama::load(&model, Device::Cpu, Kind::Float).unwrap();
    m.attach_adapter(&PeftAdapter::load(&peft_dir).unwrap()).unwrap();
    let ids = Tensor::from_slice(&(0..2 * 40).map(|i| (i * 37 % 256) as i64).collect::<Vec<_>>()).view([2, 40]);
    let logits = tch::no_grad(|| m.forward(&ids));
    let reference = tmp.path().join("ref.safetensors");
    runio::checkpoint::write_safetensors(&reference, &[("ids".into(), ids), ("logits".into(), logits)], None).unwrap();
    let r = python(&["logits", model.to_str().unwrap(), peft_dir.to_str().unwrap(), reference.to_str().unwrap()]);
    eprintln!("interop: {r}");
    assert!(r["warnings"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["max_abs_diff"].as_f64().unwrap() < 1e-4, "{r}");
    assert!(r["adapter_effect"].as_f64().unwrap() > 1e-3, "adapter must change the logits: {r}");
    assert_eq!(r["ranks"]["model.layers.0.self_attn.q_proj"], 6, "{r}");
    assert_eq!(r["ranks"]["model.layers.1.mlp.down_proj"], 2, "{r}");
    assert_eq!(r["ranks"]["model.layers.0.self_attn.k_proj"], 1, "{r}");
}

#[test]
fn squeeze_compresses_an_adapter_made_by_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let orig = tmp.path().join("orig");
    let made = python(&["make", model.to_str().unwrap(), orig.to_str().unwrap()]);
    assert_eq!(made["model.layers.0.self_attn.v_proj"], 6, "{made}");
    for (flag, value, out_name) in [("--rank", "3", "sq3"), ("--energy", "0.9", "sq90")] {
        let out = tmp.path().join(out_name);
        let o = common::rankpilot(&[
            "squeeze",
            "--adapter",
            orig.to_str().unwrap(),
            flag,
            value,
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "{}", common::text(&o));
        let r = python(&["squeezed", model.to_str().unwrap(), orig.to_str().unwrap(), out.to_str().unwrap()]);
        assert!(r["warnings"].as_array().unwrap().is_empty(), "{r}");
        eprintln!("squeeze {flag} {value}: {r}");
        let mods = r["modules"].as_object().unwrap();
        assert_eq!(mods.len(), 6, "{r}");
        for (name, m) in mods {
            let rank = m["r"].as_u64().unwrap();
            if flag == "--rank" {
                assert_eq!(rank, 3, "{name}: {r}");
            } else {
                assert!(m["energy"].as_f64().unwrap() >= 0.9 - 1e-6, "{name}: {r}");
                assert!(rank < m["orig_r"].as_u64().unwrap(), "{name}: {r}");
            }
            assert!(m["rel_err_vs_best"].as_f64().unwrap() < 1e-4, "{name}: {r}");
        }
    }
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    small_model(&model);
    let data = text_file(tmp.path());
    let run = |args: &[&str]| {
        let o = common::rankpilot(args);
        (o.status.code(), common::text(&o))
    };
    let m = model.to_str().unwrap();
    // Missing model directory / config.json.
    let (c, t) = run(&["finetune", "--model", tmp.path().join("nope").to_str().unwrap(), "--data", &data]);
    assert_eq!(c, Some(2), "{t}");
    assert!(t.contains("config.json"), "{t}");
    // Rank above min(d_in, d_out).
    let (c, t) = run(&["finetune", "--model", m, "--data", &data, "--ranks", "65", "--steps", "1"]);
    assert_eq!(c, Some(2), "{t}");
    assert!(t.contains("exceeds min(d_in, d_out)"), "{t}");
    // Non-UTF-8 and empty data.
    let bin = tmp.path().join("bin.txt");
    std::fs::write(&bin, [0xffu8, 0xfe, 0x00]).unwrap();
    let (c, t) = run(&["finetune", "--model", m, "--data", bin.to_str().unwrap()]);
    assert_eq!(c, Some(2), "{t}");
    assert!(t.contains("bin.txt") && t.contains("UTF-8"), "{t}");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let (c, t) = run(&["finetune", "--model", m, "--data", empty.to_str().unwrap()]);
    assert_eq!(c, Some(2), "{t}");
    assert!(t.contains("empty"), "{t}");
    // Inconsistent config.json.
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = 48.into();
    let bad_model = tmp.path().join("bad_model");
    std::fs::create_dir(&bad_model).unwrap();
    std::fs::copy(model.join("model.safetensors"), bad_model.join("model.safetensors")).unwrap();
    std::fs::write(bad_model.join("config.json"), cfg.to_string()).unwrap();
    let (c, t) = run(&["finetune", "--model", bad_model.to_str().unwrap(), "--data", &data]);
    assert_eq!(c, Some(2), "{t}");
    assert!(t.contains("model.safetensors") && t.contains("has shape") && t.contains("config.json implies"), "{t}");
    // Squeeze of a directory that is not a LoRA adapter.
    std::fs::write(bad_model.join("adapter_config.json"), r#"{"peft_type": "PREFIX_TUNING"}"#).unwrap();
    let (c, t) = run(&[
        "squeeze",
        "--adapter",
        bad_model.to_str().unwrap(),
        "--rank",
        "2",
        "--out",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    assert_eq!(c, Some(2), "{t}");
    assert!(t.contains("not a LoRA adapter"), "{t}");
    let (c, t) = run(&["squeeze", "--adapter", m, "--rank", "2", "--out", tmp.path().join("o").to_str().unwrap()]);
    assert_eq!(c, Some(2), "{t}");
    assert!(t.contains("adapter_config.json"), "{t}");
    // Wrong tensor names: an adapter whose module is not in the model.
    assert!(!t.contains("panicked"), "{t}");
}

#[test]
fn gpt2_llama3_and_qwen_style_tokenizers_give_the_ids_of_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    let mut text = String::new();
    for i in 0..200 {
        text.push_str(&format!(
            "The licensee's rights ({i}) don't end here;\n\tdef run_{i}(self, x):  return x * {i}\n\n"
        ));
    }
    text.push_str(&"Ünïcödé café naïve 東京 12345 ".repeat(20));
    std::fs::write(&corpus, &text).unwrap();
    let sample = tmp.path().join("sample.txt");
    // Special tokens inside the text, digit runs longer than 3, CRLF, trailing spaces, NFC.
    let sample_text = "<|im_start|>user\nIt's the licensee's code:\n\n    def run_7(self, y):   return y*7  \
                       # café, nai\u{308}ve 123456\n<|im_end|>\n<|eot_id|> THE END'S\r\n  ";
    std::fs::write(&sample, sample_text).unwrap();
    let out = tmp.path().join("tok");
    let chat = serde_json::json!([
        {"role": "system", "content": "  You write Python.  "},
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "And three?"},
        {"role": "assistant", "content": "def add3(a, b, c):\n    return a + b + c"}
    ]);
    let messages = tmp.path().join("messages.json");
    std::fs::write(&messages, chat.to_string()).unwrap();
    let r = python(&[
        "tokenizers",
        corpus.to_str().unwrap(),
        out.to_str().unwrap(),
        sample.to_str().unwrap(),
        messages.to_str().unwrap(),
    ]);
    for style in ["gpt2", "llama3", "qwen"] {
        let ids =
            |k: &str| -> Vec<i64> { r[style][k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect() };
        assert_eq!(ids("tokenizers"), ids("transformers"), "{style}: the two Python libraries disagree");
        let tok = tune::data::Tokenizer::for_model_dir(&out.join(style)).unwrap();
        assert_eq!(tok.encode(sample_text).unwrap(), ids("transformers"), "{style}");
        assert_eq!(tok.vocab_size() as i64, r[style]["vocab"].as_i64().unwrap(), "{style}");
    }
    // Llama 3 style: the post-processor's BOS first; Qwen style: the chat tokens as single ids.
    let llama3 = tune::data::Tokenizer::for_model_dir(&out.join("llama3")).unwrap();
    assert_eq!(llama3.encode(sample_text).unwrap()[0], llama3.token_id("<|begin_of_text|>").unwrap());
    let qwen = tune::data::Tokenizer::for_model_dir(&out.join("qwen")).unwrap();
    assert_eq!(qwen.encode(sample_text).unwrap()[0], qwen.token_id("<|im_start|>").unwrap());

    // Chat templates: minijinja renders what transformers' apply_chat_template renders, and
    // `messages` data trains on the assistant's turns only.
    let msgs: Vec<tune::data::Message> = serde_json::from_value(chat.clone()).unwrap();
    for style in ["llama3", "qwen"] {
        let tok = tune::data::Tokenizer::for_model_dir(&out.join(style)).unwrap();
        let template = tok.chat_template().expect("a chat template");
        let text = template.render(&msgs, false).unwrap();
        assert_eq!(text, r[style]["chat_text"].as_str().unwrap(), "{style}");
        let ids: Vec<i64> = r[style]["chat_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(tok.encode_plain(&text).unwrap(), ids, "{style}");
        let data = tmp.path().join(format!("{style}.jsonl"));
        let line = serde_json::json!({"messages": chat}).to_string();
        std::fs::write(&data, vec![line; 8].join("\n")).unwrap();
        let corpus = tune::data::Corpus::load(data.to_str().unwrap()).unwrap();
        let tokens = tune::data::TokenData::new(&corpus, &tok, 0.5, 8).unwrap();
        let (all, mask): (Vec<i64>, Vec<bool>) = (
            tokens.train.iter().chain(&tokens.val).copied().collect(),
            tokens.train_mask.iter().chain(&tokens.val_mask).copied().collect(),
        );
        let per_chat = ids.len();
        let targets: Vec<i64> = all[..per_chat].iter().zip(&mask[..per_chat]).filter(|x| *x.1).map(|x| *x.0).collect();
        let said = tok.decode(&targets).unwrap();
        let end = if style == "qwen" { "<|im_end|>\n" } else { "<|eot_id|>" };
        let expected = format!("def add(a, b):\n    return a + b{end}def add3(a, b, c):\n    return a + b + c{end}");
        assert_eq!(said, expected, "{style}: the targets are the assistant turns");
    }
    // A template that raises is reported, not a panic.
    let bad = vec![tune::data::Message { role: "tool".into(), content: "x".into() }];
    let llama3 = tune::data::Tokenizer::for_model_dir(&out.join("llama3")).unwrap();
    let e = llama3.chat_template().unwrap().render(&bad, false).unwrap_err();
    assert!(e.contains("bad role"), "{e}");
}

#[test]
fn pretrain_cli_writes_a_loadable_hf_model_with_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let out = tmp.path().join("tiny");
    let o = common::rankpilot(&[
        "pretrain",
        "--data",
        &data,
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--intermediate",
        "48",
        "--eval-every",
        "3",
        "--device",
        "cpu",
        "--logdir",
        tmp.path().join("runs").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::text(&o));
    let (m, _vs) = Llama::load(&out, Device::Cpu, Kind::Float).unwrap();
    assert_eq!((m.cfg.hidden_size, m.cfg.num_key_value_heads), (32, 1));
    // transformers' AutoTokenizer loads the model's tokenizer, and its ids are the bytes.
    let sample = tmp.path().join("sample.txt");
    let sample_text = "def f(x):\n\treturn x  # naïve 東京";
    std::fs::write(&sample, sample_text).unwrap();
    let r = python(&["autotokenizer", out.to_str().unwrap(), sample.to_str().unwrap()]);
    let ids: Vec<i64> = r["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(ids, sample_text.bytes().map(|b| b as i64).collect::<Vec<_>>(), "{r}");
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("rankpilot.json")).unwrap()).unwrap();
    assert_eq!(info["corpus"]["sha256"].as_str().unwrap().len(), 64);
    assert!(info["final_val_loss"].as_f64().unwrap().is_finite());
    let (c, t) = {
        let o = common::rankpilot(&["pretrain", "--data", &data, "--hidden", "30", "--heads", "4"]);
        (o.status.code(), common::text(&o))
    };
    assert_eq!(c, Some(2), "{t}");
}

#[test]
fn learning_rate_schedules_are_those_of_transformers() {
    use tune::finetune::LrSchedule;
    let schedules =
        [("constant", LrSchedule::Constant), ("linear", LrSchedule::Linear), ("cosine", LrSchedule::Cosine)];
    let shapes = [(0, 7), (3, 20), (10, 10)];
    let specs: Vec<String> =
        schedules.iter().flat_map(|(n, _)| shapes.iter().map(move |(w, t)| format!("{n}:{w}:{t}"))).collect();
    let mut args = vec!["schedule"];
    args.extend(specs.iter().map(String::as_str));
    let r = python(&args);
    for (name, schedule) in schedules {
        for (warmup, total) in shapes {
            let theirs: Vec<f64> =
                r[format!("{name}:{warmup}:{total}")].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(theirs.len(), total);
            for (k, b) in theirs.iter().enumerate() {
                let a = schedule.factor(k, warmup, total);
                assert!((a - b).abs() < 1e-12, "{name} warmup {warmup} total {total} step {k}: {a} vs {b}");
            }
        }
    }
}
