//! Every supported model family against transformers: a small random-init model built from the
//! family's own config class (every weight random, biases and norms included), its logits with
//! and without a random PEFT adapter, then a short `rankpilot finetune` on that model whose
//! exported adapter PEFT loads back.

mod common;

use std::path::Path;

use tch::{Device, Kind, Tensor};
use tune::model::llama::{Family, Llama};
use tune::peft::PeftAdapter;

use common::peft_interop as python;

/// `finetune --adapter ADAPTER` for 3 steps on `model` (extra flags appended), exporting to `out`.
fn finetune_from_adapter(dir: &Path, model: &Path, adapter: &Path, out: &Path, extra: &[&str]) {
    let data = common::text_file(dir, 40);
    let run = dir.join("run");
    let mut args = vec!["finetune", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()];
    args.extend(["--data", &data, "--steps", "3", "--batch-size", "2", "--seq-len", "24", "--eval-every", "3"]);
    args.extend(["--eval-batches", "1", "--seed", "0", "--device", "cpu", "--logdir", run.to_str().unwrap()]);
    args.extend(["--export-peft", out.to_str().unwrap()]);
    args.extend(extra);
    let o = common::rankpilot(&args);
    assert!(o.status.success(), "{}", common::text(&o));
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn check_family(name: &str, family: Family) {
    let tmp = tempfile::tempdir().unwrap();
    let (model, adapter, reference) = (tmp.path().join("model"), tmp.path().join("adapter"), tmp.path().join("ref"));
    let made =
        python(&["family", name, model.to_str().unwrap(), adapter.to_str().unwrap(), reference.to_str().unwrap()]);
    let (tensors, _) = runio::checkpoint::read_safetensors(&reference).unwrap();
    let get = |n: &str| tensors.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let ids = get("ids");

    let (mut m, _vs) = Llama::load(&model, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(m.cfg.arch.family, family, "{made}");
    let base = tch::no_grad(|| m.forward(&ids));
    let d = max_abs_diff(&base, &get("logits"));
    eprintln!("{name}: base logits max |Δ| = {d:.2e}");
    assert!(d < 1e-4, "{name}: base logits differ from transformers by {d}");
    m.attach_adapter(&PeftAdapter::load(&adapter).unwrap()).unwrap();
    let adapted = tch::no_grad(|| m.forward(&ids));
    let d = max_abs_diff(&adapted, &get("adapted"));
    eprintln!("{name}: adapted logits max |Δ| = {d:.2e}");
    assert!(d < 1e-4, "{name}: logits with the PEFT adapter differ from peft by {d}");
    assert!(max_abs_diff(&adapted, &base) > 1e-2, "{name}: the adapter must matter");

    // Train on the family's model from that adapter, export, and let PEFT load the result.
    let exported = tmp.path().join("exported");
    finetune_from_adapter(tmp.path(), &model, &adapter, &exported, &["--lr", "0.01"]);
    let (mut m, _vs) = Llama::load(&model, Device::Cpu, Kind::Float).unwrap();
    m.attach_adapter(&PeftAdapter::load(&exported).unwrap()).unwrap();
    let logits = tch::no_grad(|| m.forward(&ids));
    assert!(max_abs_diff(&logits, &adapted) > 1e-4, "{name}: training must change the adapter");
    let ours = tmp.path().join("ours.safetensors");
    runio::checkpoint::write_safetensors(&ours, &[("ids".into(), ids), ("logits".into(), logits)], None).unwrap();
    let r = python(&["logits", model.to_str().unwrap(), exported.to_str().unwrap(), ours.to_str().unwrap()]);
    assert!(r["warnings"].as_array().unwrap().is_empty(), "{name}: {r}");
    assert!(r["max_abs_diff"].as_f64().unwrap() < 1e-4, "{name}: exported adapter: {r}");
    assert_eq!(r["ranks"]["model.layers.0.self_attn.v_proj"], 2, "{name}: {r}");
}

#[test]
fn llama_with_default_rope_matches_transformers() {
    check_family("llama", Family::Llama);
}

#[test]
fn llama3_with_rope_scaling_and_biases_matches_transformers() {
    check_family("llama3", Family::Llama);
}

#[test]
fn mistral_with_a_sliding_window_shorter_than_the_sequence_matches_transformers() {
    check_family("mistral", Family::Mistral);
}

#[test]
fn qwen2_with_qkv_biases_a_sliding_layer_and_tied_embeddings_matches_transformers() {
    check_family("qwen2", Family::Qwen2);
}

#[test]
fn qwen3_with_qk_norms_matches_transformers() {
    check_family("qwen3", Family::Qwen3);
}

#[test]
fn modules_to_save_are_imported_trained_and_exported_as_peft_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, adapter, reference) = (tmp.path().join("model"), tmp.path().join("adapter"), tmp.path().join("ref"));
    python(&["saved", model.to_str().unwrap(), adapter.to_str().unwrap(), reference.to_str().unwrap()]);
    let (tensors, _) = runio::checkpoint::read_safetensors(&reference).unwrap();
    let get = |n: &str| tensors.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let ids = get("ids");
    let (mut m, _vs) = Llama::load(&model, Device::Cpu, Kind::Float).unwrap();
    m.attach_adapter(&PeftAdapter::load(&adapter).unwrap()).unwrap();
    let d = max_abs_diff(&tch::no_grad(|| m.forward(&ids)), &get("adapted"));
    assert!(d < 1e-4, "logits with the saved lm_head differ from peft by {d}");

    let exported = tmp.path().join("exported");
    finetune_from_adapter(tmp.path(), &model, &adapter, &exported, &["--targets", "q_proj,v_proj"]);
    let out = PeftAdapter::load(&exported).unwrap();
    let head = &out.other.iter().find(|(n, _)| n == "base_model.model.lm_head.weight").expect("lm_head exported").1;
    assert!(max_abs_diff(head, &get("lm_head")) > 1e-4, "the saved lm_head must be trained, as PEFT trains it");
    let (mut m, _vs) = Llama::load(&model, Device::Cpu, Kind::Float).unwrap();
    m.attach_adapter(&out).unwrap();
    let logits = tch::no_grad(|| m.forward(&ids));
    let ours = tmp.path().join("ours.safetensors");
    runio::checkpoint::write_safetensors(&ours, &[("ids".into(), ids), ("logits".into(), logits)], None).unwrap();
    let r = python(&["logits", model.to_str().unwrap(), exported.to_str().unwrap(), ours.to_str().unwrap()]);
    assert!(r["warnings"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["max_abs_diff"].as_f64().unwrap() < 1e-4, "{r}");
    assert_eq!(r["modules_to_save"], serde_json::json!(["lm_head"]), "{r}");

    // A tensor that is no parameter of the model is refused, never dropped.
    let mut bad = PeftAdapter::load(&adapter).unwrap();
    bad.other.push(("base_model.model.score.weight".into(), Tensor::zeros([2, 64], (Kind::Float, Device::Cpu))));
    let (mut m, _vs) = Llama::load(&model, Device::Cpu, Kind::Float).unwrap();
    let e = m.attach_adapter(&bad).unwrap_err().to_string();
    assert!(e.contains("score.weight"), "{e}");
}

/// LoRA on `lm_head` and `embed_tokens` (PEFT's Embedding LoRA) beside q/v: PEFT's adapter gives
/// the same logits here, `finetune --targets …,lm_head,embed_tokens` trains from it, and PEFT
/// loads the export with the same ranks; a fresh run on those targets resizes them under a
/// schedule and exports a PEFT-loadable adapter too. Untied (Llama) and tied (Qwen2) embeddings.
fn check_embedding_and_head_sites(family: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (model, adapter, reference) = (tmp.path().join("model"), tmp.path().join("adapter"), tmp.path().join("ref"));
    let made =
        python(&["embedded", family, model.to_str().unwrap(), adapter.to_str().unwrap(), reference.to_str().unwrap()]);
    assert_eq!(made["ranks"]["model.embed_tokens"], 3, "{made}");
    assert_eq!(made["ranks"]["lm_head"], 4, "{made}");
    let (tensors, _) = runio::checkpoint::read_safetensors(&reference).unwrap();
    let get = |n: &str| tensors.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let ids = get("ids");
    let (mut m, _vs) = Llama::load(&model, Device::Cpu, Kind::Float).unwrap();
    let base = tch::no_grad(|| m.forward(&ids));
    m.attach_adapter(&PeftAdapter::load(&adapter).unwrap()).unwrap();
    let adapted = tch::no_grad(|| m.forward(&ids));
    let d = max_abs_diff(&adapted, &get("adapted"));
    eprintln!("{family}: logits with LoRA on embed_tokens + lm_head: max |Δ| vs peft = {d:.2e}");
    assert!(d < 1e-4, "{family}: logits with embedding/head LoRA differ from peft by {d}");
    // Each of the two sites matters on its own.
    for site in ["model.embed_tokens", "lm_head"] {
        let mut ad = PeftAdapter::load(&adapter).unwrap();
        ad.sites.retain(|s| s.module != site);
        let (mut m2, _vs2) = Llama::load(&model, Device::Cpu, Kind::Float).unwrap();
        m2.attach_adapter(&ad).unwrap();
        assert!(max_abs_diff(&tch::no_grad(|| m2.forward(&ids)), &adapted) > 1e-3, "{family}: `{site}` must matter");
    }
    assert!(max_abs_diff(&adapted, &base) > 1e-2);

    let targets = "q_proj,v_proj,lm_head,embed_tokens";
    let check_export = |exported: &Path, trained_from: Option<&Tensor>| {
        let (mut m, _vs) = Llama::load(&model, Device::Cpu, Kind::Float).unwrap();
        m.attach_adapter(&PeftAdapter::load(exported).unwrap()).unwrap();
        let logits = tch::no_grad(|| m.forward(&ids));
        if let Some(before) = trained_from {
            assert!(max_abs_diff(&logits, before) > 1e-4, "{family}: training must change the adapter");
        }
        let ours = tmp.path().join("ours.safetensors");
        runio::checkpoint::write_safetensors(
            &ours,
            &[("ids".into(), ids.shallow_clone()), ("logits".into(), logits)],
            None,
        )
        .unwrap();
        let r = python(&["logits", model.to_str().unwrap(), exported.to_str().unwrap(), ours.to_str().unwrap()]);
        assert!(r["warnings"].as_array().unwrap().is_empty(), "{family}: {r}");
        assert!(r["max_abs_diff"].as_f64().unwrap() < 1e-4, "{family}: exported adapter: {r}");
        r
    };
    let exported = tmp.path().join("exported");
    finetune_from_adapter(tmp.path(), &model, &adapter, &exported, &["--targets", targets, "--lr", "0.01"]);
    let r = check_export(&exported, Some(&adapted));
    assert_eq!((r["ranks"]["model.embed_tokens"].as_u64(), r["ranks"]["lm_head"].as_u64()), (Some(3), Some(4)), "{r}");

    // Fresh sites on those targets under a scheduler: the embedding and head are resized too.
    let data = common::text_file(tmp.path(), 40);
    let (run, fresh) = (tmp.path().join("sched"), tmp.path().join("fresh"));
    let o = common::rankpilot(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--targets",
        targets,
        "--scheduler",
        "adalora",
        "--budget",
        "rank:4",
        "--rounds",
        "4",
        "--steps",
        "8",
        "--batch-size",
        "2",
        "--seq-len",
        "24",
        "--eval-every",
        "4",
        "--eval-batches",
        "1",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--logdir",
        run.to_str().unwrap(),
        "--export-peft",
        fresh.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::text(&o));
    let r = check_export(&fresh, None);
    assert!(r["ranks"]["model.embed_tokens"].as_u64().is_some_and(|x| x > 0), "PEFT builds the embedding site: {r}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let rounds = summary["report"]["rounds"].as_array().unwrap();
    let rank_of = |round: &serde_json::Value, i: usize| round["ranks"][i].as_u64().unwrap();
    let n = rounds[0]["ranks"].as_array().unwrap().len();
    assert_eq!(n, 2 + 2 * 2, "embedding, q and v of two layers, head");
    // AdaLoRA prunes by importance: the embedding and head take part like any site (whichever it
    // finds least important shrinks; the unit tests resize both either way).
    let distinct = |site: usize| rounds.iter().map(|r| rank_of(r, site)).collect::<std::collections::BTreeSet<_>>();
    let all: Vec<&serde_json::Value> = rounds.iter().map(|r| &r["ranks"]).collect();
    assert!(distinct(0).len() > 1 || distinct(n - 1).len() > 1, "{family}: neither is ever resized: {all:?}");
}

#[test]
fn lora_on_embed_tokens_and_lm_head_matches_peft_untied() {
    check_embedding_and_head_sites("llama");
}

#[test]
fn lora_on_embed_tokens_and_lm_head_matches_peft_tied() {
    check_embedding_and_head_sites("qwen2");
}

#[test]
fn evaluate_gives_the_loss_of_transformers_and_peft_on_the_same_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, adapter, reference) = (tmp.path().join("model"), tmp.path().join("adapter"), tmp.path().join("ref"));
    python(&["saved", model.to_str().unwrap(), adapter.to_str().unwrap(), reference.to_str().unwrap()]);
    // With the model's own tokenizer.json, so that transformers tokenizes through AutoTokenizer.
    std::fs::write(model.join("tokenizer.json"), tune::data::Tokenizer::bytes_tokenizer_json().unwrap()).unwrap();
    let config = tune::data::Tokenizer::bytes_tokenizer_config(128).to_string();
    std::fs::write(model.join("tokenizer_config.json"), config).unwrap();
    let data = common::text_file(tmp.path(), 30);
    for with_adapter in [false, true] {
        let json = tmp.path().join("eval.json");
        let mut args = vec!["evaluate", "--model", model.to_str().unwrap(), "--data", &data, "--seq-len", "48"];
        args.extend(["--batch-size", "3", "--device", "cpu", "--json", json.to_str().unwrap()]);
        if with_adapter {
            args.extend(["--adapter", adapter.to_str().unwrap()]);
        }
        let o = common::rankpilot(&args);
        assert!(o.status.success(), "{}", common::text(&o));
        let ours: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let a = if with_adapter { adapter.to_str().unwrap() } else { "-" };
        let theirs = python(&["evaluate", model.to_str().unwrap(), a, &data, "48"]);
        eprintln!("adapter {with_adapter}: rankpilot {ours} transformers {theirs}");
        assert_eq!(ours["tokens"], theirs["tokens"]);
        let d = (ours["loss"].as_f64().unwrap() - theirs["loss"].as_f64().unwrap()).abs();
        assert!(d < 1e-5, "loss differs by {d}: {ours} vs {theirs}");
    }
    // Greedy generation is deterministic; sampling follows --seed.
    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "def f", "--device", "cpu"];
        args.extend(["--max-new-tokens", "12"]);
        args.extend(extra);
        let o = common::rankpilot(&args);
        assert!(o.status.success(), "{}", common::text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(generate(&[]), generate(&[]));
    let sampled = ["--temperature", "1.0", "--top-p", "0.9", "--seed", "3"];
    assert_eq!(generate(&sampled), generate(&sampled));
    let o = common::rankpilot(&["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--top-p", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
}

#[test]
fn instruction_data_masks_the_prompt_out_of_the_loss_as_transformers_labels_do() {
    use tune::data::{Corpus, TokenData, Tokenizer, data_rng};
    let tmp = tempfile::tempdir().unwrap();
    let (model, adapter, reference) = (tmp.path().join("model"), tmp.path().join("adapter"), tmp.path().join("ref"));
    python(&["family", "llama", model.to_str().unwrap(), adapter.to_str().unwrap(), reference.to_str().unwrap()]);
    let data = tmp.path().join("sft.jsonl");
    let lines: Vec<String> = (0..40)
        .map(|i| {
            serde_json::json!({"prompt": format!("Q: what is {i} + {i}?\nA:"), "completion": format!(" {}\n", 2 * i)})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let corpus = Corpus::load(data.to_str().unwrap()).unwrap();
    assert_eq!(corpus.examples.len(), 40);
    let tokens = TokenData::new(&corpus, &Tokenizer::Bytes, 0.2, 32).unwrap();
    let total = tokens.train_mask.iter().chain(&tokens.val_mask).filter(|&&m| m).count();
    let completion_bytes: usize = corpus.examples.iter().map(|e| e.completion.len()).sum();
    assert_eq!(total, completion_bytes, "only completion ids are targets");
    let batch = tokens.train_batch_masked(&mut data_rng(1), 4, 32, Device::Cpu);
    let mask = batch.mask.as_ref().expect("instruction data has a mask");
    let (m, _vs) = Llama::load(&model, Device::Cpu, Kind::Float).unwrap();
    let ours = tch::no_grad(|| m.masked_loss(&batch.ids, Some(mask))).double_value(&[]);
    let file = tmp.path().join("batch.safetensors");
    let tensors = [("ids".into(), batch.ids.shallow_clone()), ("mask".into(), mask.to_kind(Kind::Uint8))];
    runio::checkpoint::write_safetensors(&file, &tensors, None).unwrap();
    let r = python(&["masked", model.to_str().unwrap(), file.to_str().unwrap()]);
    let theirs = r["loss"].as_f64().unwrap();
    assert!((ours - theirs).abs() < 1e-5, "masked loss {ours} vs transformers {theirs}");
    let plain = tch::no_grad(|| m.loss(&batch.ids)).double_value(&[]);
    assert!((plain - ours).abs() > 1e-3, "the mask must matter: {plain} vs {ours}");

    // The same file trains through the CLI; mixed kinds are refused.
    let o = common::rankpilot(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--device",
        "cpu",
        "--logdir",
        tmp.path().join("run").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::text(&o));
    std::fs::write(&data, format!("{}\n{{\"text\": \"plain\"}}\n", lines[0])).unwrap();
    let e = Corpus::load(data.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("sft.jsonl:2") && e.contains("one kind"), "{e}");
}
