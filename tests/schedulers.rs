//! End to end: rank schedulers steering real fine-tuning runs (`finetune --scheduler`,
//! `compare`, `calibrate`) through the binary.

mod common;

use std::path::Path;

/// A 2-layer model with 14 sites, every projection at least 64 wide (so the shipped policy's
/// rank set up to 64 fits), `hidden` wide.
fn small_model(dir: &Path, hidden: usize) {
    common::small_model(dir, 5, hidden, hidden * 3 / 2, 4);
}

fn text_file(dir: &Path) -> String {
    common::text_file(dir, 80)
}

const SMALL_RUN: [&str; 10] =
    ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--device", "cpu", "--seed", "0"];

fn summary(logdir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(logdir.join("summary.json")).unwrap()).unwrap()
}

/// Σ_sites (d_in + d_out) of the 64-wide small model: per layer q,k,v,o 4·128 + 3·(64 + 96).
const PARAMS_PER_RANK: usize = 2 * (4 * 128 + 3 * 160);

#[test]
fn policy_scheduler_plans_for_a_model_with_a_different_number_of_sites() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    small_model(&model, 64);
    let data = text_file(dir.path());
    let run = |name: &str| {
        let logdir = dir.path().join(name);
        let mut args = vec![
            "finetune",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--steps",
            "6",
            "--rounds",
            "3",
            "--scheduler",
            "policy:checkpoints/wireless-rayleigh",
            "--env",
            "wireless-rayleigh",
            "--budget",
            "rank:4",
            "--logdir",
            logdir.to_str().unwrap(),
        ];
        args.extend(SMALL_RUN);
        let o = common::rankpilot(&args);
        assert!(o.status.success(), "{}", common::text(&o));
        summary(&logdir)["report"].clone()
    };
    let a = run("a");
    let rounds = a["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    let set = [0u64, 1, 2, 4, 8, 16, 32, 64];
    for r in rounds {
        let ranks: Vec<u64> = r["ranks"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        // The policy was trained on 56 sites; this model has 14.
        assert_eq!(ranks.len(), 14);
        assert!(ranks.iter().all(|x| set.contains(x)), "{ranks:?}");
        let params = r["params"].as_u64().unwrap() as usize;
        assert!(params <= 4 * PARAMS_PER_RANK, "round plan {params} > budget {}", 4 * PARAMS_PER_RANK);
        assert!(params > 0, "the policy allocates something");
        assert!(r["cost"].as_f64().unwrap() <= r["budget"].as_f64().unwrap() || r["lost"].as_bool().unwrap());
    }
    // Same seed, same plans and losses.
    let b = run("b");
    for (x, y) in rounds.iter().zip(b["rounds"].as_array().unwrap()) {
        assert_eq!(x["ranks"], y["ranks"]);
        assert_eq!(x["train_loss"], y["train_loss"]);
    }
    assert_eq!(a["val_loss_final"], b["val_loss_final"]);
}

#[test]
fn a_round_that_does_not_fit_the_channel_is_lost_and_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    small_model(&model, 64);
    let data = text_file(dir.path());
    // The default channel with a deadline so short that no adapter fits.
    let text =
        envs::presets::embedded_text("wireless-rayleigh").unwrap().replace("deadline_s = 2.0", "deadline_s = 1e-9");
    assert!(text.contains("deadline_s = 1e-9"));
    let preset = dir.path().join("tight.toml");
    std::fs::write(&preset, text).unwrap();
    let logdir = dir.path().join("run");
    let mut args = vec![
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--steps",
        "4",
        "--rounds",
        "2",
        "--scheduler",
        "fixed:4",
        "--env",
        preset.to_str().unwrap(),
        "--logdir",
        logdir.to_str().unwrap(),
    ];
    args.extend(SMALL_RUN);
    let o = common::rankpilot(&args);
    assert!(o.status.success(), "{}", common::text(&o));
    let r = summary(&logdir)["report"].clone();
    assert_eq!(r["rounds_lost"], 2, "{r}");
    // Every round rolled back: the sites are as before round 0 (rank 0) and the model unchanged.
    assert_eq!(r["final_params"], 0);
    assert_eq!(r["val_loss_final"], r["val_loss_initial"]);
    assert!(r["cost_sent"].as_f64().unwrap() > 0.0, "lost rounds still spend their bits");
}

#[test]
fn compare_runs_all_four_schedulers_at_an_equal_budget_and_writes_tables() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    small_model(&model, 64);
    let data = text_file(dir.path());
    let logdir = dir.path().join("cmp");
    let mut args = vec![
        "compare",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--env",
        "wireless-rayleigh",
        "--budget",
        "rank:4",
        "--seeds",
        "2",
        "--steps",
        "8",
        "--rounds",
        "4",
        "--schedulers",
        "fixed,adalora,squeeze,policy:checkpoints/wireless-rayleigh",
        "--logdir",
        logdir.to_str().unwrap(),
    ];
    args.extend(SMALL_RUN);
    let o = common::rankpilot(&args);
    assert!(o.status.success(), "{}", common::text(&o));
    let md = std::fs::read_to_string(logdir.join("compare.md")).unwrap();
    assert!(md.contains("(paired, mean ± se [95% t interval]) | bits sent / run | bits vs fixed |"), "{md}");
    assert!(md.contains("| best |") && md.contains("| seed 0 | seed 1 |"), "{md}");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(logdir.join("compare.json")).unwrap()).unwrap();
    let rows = j["rows"].as_array().unwrap();
    // One best row; every other row carries its paired difference to it, interval around the mean.
    assert_eq!(rows.iter().filter(|r| r["vs_best"].is_null()).count(), 1);
    for r in rows.iter().filter(|r| !r["vs_best"].is_null()) {
        let d = &r["vs_best"];
        let (m, lo, hi) = (d["mean"].as_f64().unwrap(), d["lo"].as_f64().unwrap(), d["hi"].as_f64().unwrap());
        assert!(lo <= m && m <= hi && m >= 0.0, "{d}");
    }
    let names: Vec<&str> = rows.iter().map(|r| r["scheduler"].as_str().unwrap()).collect();
    assert_eq!(names, ["fixed", "adalora", "squeeze", "policy:wireless-rayleigh"]);
    for r in rows {
        assert_eq!(r["val_loss"].as_array().unwrap().len(), 2);
        let mean = r["mean_params"].as_f64().unwrap();
        assert!(mean <= 4.0 * PARAMS_PER_RANK as f64 + 1e-6, "{}: mean params {mean}", r["scheduler"]);
        assert!(r["val_loss_mean"].as_f64().unwrap().is_finite());
    }
    // Squeeze anneals 4t → 2t → t with t = 4 / 2.75 = 1.45 (mean factor (4+4+2+1)/4): 5, 5, 2, 1.
    let runs = j["runs"].as_array().unwrap();
    let squeeze = &runs[2][0]["rounds"];
    let first: Vec<u64> = (0..4).map(|i| squeeze[i]["ranks"][0].as_u64().unwrap()).collect();
    assert_eq!(first, [5, 5, 2, 1], "{squeeze}");
    assert!(logdir.join("adalora/seed0").is_dir() && logdir.join("policy-wireless-rayleigh/seed1").is_dir());

    // Without a resource the table has no resource columns (nothing is sent, lost or skipped).
    let none_dir = dir.path().join("cmp-none");
    let mut args = vec![
        "compare",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--env",
        "none",
        "--budget",
        "rank:4",
        "--seeds",
        "2",
        "--steps",
        "4",
        "--rounds",
        "2",
        "--schedulers",
        "fixed,adalora",
        "--logdir",
        none_dir.to_str().unwrap(),
    ];
    args.extend(SMALL_RUN);
    let o = common::rankpilot(&args);
    assert!(o.status.success(), "{}", common::text(&o));
    let md = std::fs::read_to_string(none_dir.join("compare.md")).unwrap();
    assert!(!md.contains("sent") && !md.contains("rounds lost") && !md.contains("0.00×"), "{md}");
    assert!(md.contains("| mean adapter params | final adapter params | wall s / run |"), "{md}");

    // `--jobs 2` runs the two seeds in two processes with the cores divided between them: the
    // same per-seed losses as one process at that thread count.
    let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1).to_string();
    let losses = |dir: &Path| -> Vec<serde_json::Value> {
        let j: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("compare.json")).unwrap()).unwrap();
        j["rows"].as_array().unwrap().iter().map(|r| r["val_loss"].clone()).collect()
    };
    let (seq_dir, par_dir) = (dir.path().join("cmp-seq"), dir.path().join("cmp-par"));
    args.retain(|&x| x != "--logdir" && x != none_dir.to_str().unwrap());
    let with_logdir = |d: &Path| -> Vec<String> {
        args.iter().map(|s| s.to_string()).chain(["--logdir".into(), d.to_str().unwrap().into()]).collect()
    };
    let seq = with_logdir(&seq_dir);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rankpilot"))
        .args(&seq)
        .current_dir(common::root())
        .env_remove("LD_LIBRARY_PATH")
        .env("OMP_NUM_THREADS", &threads)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let mut par = with_logdir(&par_dir);
    par.extend(["--jobs".into(), "2".into()]);
    let o = common::rankpilot(&par.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(
        common::text(&o).contains(&format!("in 2 processes at a time, {threads} thread(s) each")),
        "{}",
        common::text(&o)
    );
    assert_eq!(losses(&par_dir), losses(&seq_dir), "--jobs 2 against one process at {threads} thread(s)");
    assert_eq!(losses(&par_dir)[0].as_array().unwrap().len(), 2);
}

#[test]
fn calibrate_writes_a_preset_the_environments_and_trainer_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    small_model(&model, 64);
    let data = text_file(dir.path());
    let out = dir.path().join("presets/small.toml");
    let cal_logs = dir.path().join("cal");
    let mut args = vec![
        "calibrate",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--rank",
        "16",
        "--perturbation-coef",
        "0.3",
        "--logdir",
        cal_logs.to_str().unwrap(),
    ];
    args.extend(["--batch-size", "2", "--seq-len", "32", "--device", "cpu", "--seed", "0"]);
    let o = common::rankpilot(&args);
    assert!(o.status.success(), "{}", common::text(&o));
    let p = envs::presets::load(out.to_str().unwrap()).unwrap();
    let cal = p.calibration_data.as_ref().unwrap();
    assert_eq!(cal.sites.len(), 14);
    assert_eq!(cal.sites[0].name, "model.layers.0.self_attn.q_proj");
    assert_eq!((cal.sites[4].d_in, cal.sites[4].d_out), (64, 96), "gate_proj shape");
    assert!(cal.sites.iter().all(|s| s.spectrum.len() == 16 && s.sensitivity > 0.0));
    // Ranks above the narrowest projection (64) are dropped; the channel is rescaled.
    assert_eq!(p.ranks, [0, 1, 2, 4, 8, 16, 32, 64]);
    let template = envs::presets::load("wireless-rayleigh").unwrap();
    let (d0, d1) = (template.resource.channel.unwrap().deadline_s, p.resource.channel.unwrap().deadline_s);
    assert!(d1 < d0 / 10.0, "deadline {d0} -> {d1}");
    let o =
        common::rankpilot(&["eval", "--env", out.to_str().unwrap(), "--episodes", "2", "--policy", "uniform,oracle"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert_eq!(p.reward.perturbation_coef, 0.3);
    // A penalty the oracle cannot rely on is refused before anything is written.
    let bad = dir.path().join("presets/bad.toml");
    let mut args: Vec<&str> =
        args.iter().map(|a| if *a == out.to_str().unwrap() { bad.to_str().unwrap() } else { *a }).collect();
    args.extend(["--violation-coef", "1.0"]);
    let o = common::rankpilot(&args);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("violation_coef"), "{}", common::text(&o));
    assert!(!bad.exists() && !dir.path().join("presets/bad.calibration.json").exists());
    // So is a fit that would start after the probe ends, or before its first step.
    for from in ["0", "4"] {
        let mut args: Vec<&str> = args.iter().copied().take_while(|a| *a != "--violation-coef").collect();
        args.extend(["--decay-law", "power", "--fit-from", from]);
        let o = common::rankpilot(&args);
        assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
        assert!(common::text(&o).contains("--fit-from"), "{}", common::text(&o));
        assert!(!bad.exists());
    }
    // `--fit-ranks` runs real uniform-rank runs and writes the fitted spectrum exponent.
    let fitted = dir.path().join("presets/fitted.toml");
    let base: Vec<&str> = args
        .iter()
        .copied()
        .take_while(|a| *a != "--violation-coef")
        .map(|a| if a == bad.to_str().unwrap() { fitted.to_str().unwrap() } else { a })
        .collect();
    let mut fit_args = base.clone();
    fit_args.extend(["--fit-ranks", "4,1,16", "--fit-steps", "2", "--fit-seeds", "1"]);
    let o = common::rankpilot(&fit_args);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(common::text(&o).contains("fitted to real runs at uniform ranks"), "{}", common::text(&o));
    let text = std::fs::read_to_string(&fitted).unwrap();
    assert!(text.contains("--fit-ranks 1,4,16 --fit-steps 2 --fit-seeds 1"), "{text}");
    let p = envs::presets::load(fitted.to_str().unwrap()).unwrap();
    assert!(p.sites.spectrum_exponent > 0.0 && p.sites.spectrum_exponent <= 2.0, "{}", p.sites.spectrum_exponent);
    // A single rank, or one above the narrowest projection (64), is refused before anything is written.
    for (ranks, expect) in [("8", "at least two distinct ranks"), ("8,8", "at least two"), ("1,128", "ranks up to 64")]
    {
        let out2 = dir.path().join("presets/bad2.toml");
        let mut bad_args: Vec<&str> =
            base.iter().map(|a| if *a == fitted.to_str().unwrap() { out2.to_str().unwrap() } else { *a }).collect();
        bad_args.extend(["--fit-ranks", ranks]);
        let o = common::rankpilot(&bad_args);
        assert_eq!(o.status.code(), Some(2), "{ranks}: {}", common::text(&o));
        assert!(common::text(&o).contains("--fit-ranks") && common::text(&o).contains(expect), "{}", common::text(&o));
        assert!(!out2.exists());
    }
}

#[test]
fn bad_scheduler_inputs_exit_2_and_say_what_would_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    small_model(&model, 64);
    let narrow = dir.path().join("narrow");
    small_model(&narrow, 32);
    let data = text_file(dir.path());
    let case = |model: &Path, extra: &[&str], expect: &str| {
        let logdir = dir.path().join("bad");
        let mut args =
            vec!["finetune", "--model", model.to_str().unwrap(), "--data", &data, "--steps", "2", "--rounds", "2"];
        args.extend(extra);
        args.extend(["--logdir", logdir.to_str().unwrap()]);
        args.extend(SMALL_RUN);
        let o = common::rankpilot(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", common::text(&o));
        assert!(common::text(&o).contains(expect), "{extra:?}: expected `{expect}` in: {}", common::text(&o));
    };
    case(
        &model,
        &["--scheduler", "adalorra"],
        "allowed: fixed, fixed:R, adalora, adalora-svd, squeeze, eva, policy:<checkpoint dir>",
    );
    case(&model, &["--scheduler", "fixed", "--budget", "100"], "below the smallest uniform plan");
    case(&model, &["--scheduler", "fixed:8", "--budget", "rank:4"], "allowed: fixed:R with R <= 4");
    case(&model, &["--scheduler", "squeeze", "--budget", "rank:1"], "too small for squeeze");
    case(&model, &["--scheduler", "adalora", "--env", "nowhere"], "unknown preset `nowhere`");
    case(&model, &["--scheduler", "policy:/nonexistent/dir"], "allowed: a directory written by `rankpilot train`");
    // The shipped policy chooses ranks up to 64; this model's k_proj is 32 wide.
    case(&narrow, &["--scheduler", "policy:checkpoints/wireless-rayleigh"], "64");
    case(&model, &["--budget", "rank:4"], "--env and --budget need --scheduler");
    // PEFT's AdaLoRA counts rank triplets and has no resource to lose a round to.
    case(&model, &["--scheduler", "adalora-svd", "--budget", "5000"], "allowed: --budget rank:R");
    case(&model, &["--scheduler", "adalora-svd", "--env", "wireless-rayleigh"], "adalora-svd runs without a resource");
    case(&model, &["--scheduler", "adalora-svd+skip"], "adalora-svd runs without a resource");
}

#[test]
fn an_interrupted_scheduled_run_resumes_to_the_adapter_of_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    small_model(&model, 64);
    let data = text_file(dir.path());
    let run = |logdir: &Path, extra: &[&str]| {
        let mut args = vec!["finetune", "--model", model.to_str().unwrap(), "--data", &data];
        // A policy with an inferring prior (a belief that learns over rounds), a channel with its
        // own generator and lost rounds, dropout and gradient accumulation: all of it must resume.
        args.extend(["--steps", "16", "--rounds", "8", "--scheduler", "policy:checkpoints/default"]);
        args.extend(["--env", "wireless-rayleigh", "--budget", "rank:4", "--lora-dropout", "0.1"]);
        args.extend(["--grad-accum", "2", "--eval-every", "4", "--save-every", "2"]);
        args.extend(["--logdir", logdir.to_str().unwrap()]);
        args.extend(SMALL_RUN);
        args.extend(extra);
        let o = common::rankpilot(&args);
        assert!(o.status.success(), "{}", common::text(&o));
        common::text(&o)
    };
    let whole = dir.path().join("whole");
    run(&whole, &[]);
    let cut = dir.path().join("cut");
    let said = run(&cut, &["--stop-at-round", "4"]);
    assert!(said.contains("stopped at round 4"), "{said}");
    assert!(!cut.join("adapter").exists(), "an interrupted run exports nothing");
    let resume = cut.join("resume");
    run(&cut, &["--resume", resume.to_str().unwrap()]);
    let (a, b) = (summary(&whole)["report"].clone(), summary(&cut)["report"].clone());
    assert_eq!(a["rounds"].as_array().unwrap().len(), 8);
    for k in ["rounds_lost", "rounds_skipped", "val_loss_final", "cost_sent", "tokens"] {
        assert_eq!(a[k], b[k], "{k}: {a} vs {b}");
    }
    // Every round as recorded (its plan, the channel's budget, loss, lost or skipped), bar timing.
    let rounds = |r: &serde_json::Value| -> Vec<serde_json::Value> {
        let mut v: Vec<serde_json::Value> = r["rounds"].as_array().unwrap().clone();
        v.iter_mut().for_each(|x| _ = x.as_object_mut().unwrap().remove("plan_ms"));
        v
    };
    assert_eq!(rounds(&a), rounds(&b));
    let (ta, _) = runio::checkpoint::read_safetensors(&whole.join("adapter/adapter_model.safetensors")).unwrap();
    let (tb, _) = runio::checkpoint::read_safetensors(&cut.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(ta.len(), tb.len());
    for ((na, x), (nb, y)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(x.equal(y), "`{na}` differs after the resume");
    }
    // A resume with other settings is refused, naming the setting.
    let mut args = vec!["finetune", "--model", model.to_str().unwrap(), "--data", &data, "--steps", "16"];
    args.extend(["--rounds", "8", "--scheduler", "fixed:2", "--resume", resume.to_str().unwrap()]);
    args.extend(["--env", "wireless-rayleigh", "--budget", "rank:4", "--lora-dropout", "0.1"]);
    args.extend(["--grad-accum", "2", "--eval-every", "4"]);
    let other = dir.path().join("other");
    args.extend(["--logdir", other.to_str().unwrap()]);
    args.extend(SMALL_RUN);
    let o = common::rankpilot(&args);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("`scheduler`"), "{}", common::text(&o));
}

#[test]
fn peft_peers_train_on_the_same_windows_as_the_rust_rows_and_the_sweep_scores_each_row_on_its_own_half() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    small_model(&model, 64);
    let data = text_file(dir.path());
    let logdir = dir.path().join("cmp");
    let base = |schedulers: &str, logdir: &Path| -> Vec<String> {
        let mut v: Vec<String> = [
            "compare",
            "--model",
            model.to_str().unwrap(),
            "--data",
            &data,
            "--env",
            "none",
            "--budget",
            "rank:4",
            "--steps",
            "6",
            "--rounds",
            "2",
            "--schedulers",
            schedulers,
            "--logdir",
            logdir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(SMALL_RUN.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: &[String]| common::rankpilot(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args = base("fixed,peft:lora,peft:adalora,peft:eva,adalora-svd", &logdir);
    args.extend(["--seeds".into(), "1".into()]);
    let o = run(&args);
    assert!(o.status.success(), "{}", common::text(&o));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(logdir.join("compare.json")).unwrap()).unwrap();
    let runs = j["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r[0]["scheduler"].as_str().unwrap()).collect();
    assert_eq!(names, ["fixed", "peft:lora", "peft:adalora", "peft:eva", "adalora-svd"]);
    let md = std::fs::read_to_string(logdir.join("compare.md")).unwrap();
    assert!(md.contains("(one seed: no interval)") && !md.contains("NaN"), "{md}");
    // Every adapter starts at zero output (B = 0; AdaLoRA's E = 0), so before training each row's
    // loss is the base model's on the validation windows: Python reads the same windows.
    let base_loss = runs[0][0]["val_loss_initial"].as_f64().unwrap();
    for r in runs {
        let (l, name) = (r[0]["val_loss_initial"].as_f64().unwrap(), &r[0]["scheduler"]);
        assert!((l - base_loss).abs() < 1e-5, "{name}: base loss {l} against the Rust side's {base_loss}");
        assert!(r[0]["val_loss_final"].as_f64().unwrap() < l, "{name} did not train: {}", r[0]);
        // Validation at the same steps as the Rust loop's.
        assert_eq!(r[0]["val_curve"].as_array().unwrap().len(), runs[0][0]["val_curve"].as_array().unwrap().len());
    }
    // PEFT's LoRA at rank 4 everywhere has the Rust row's parameter count; EVA keeps the total rank
    let params = |i: usize| runs[i][0]["final_params"].as_f64().unwrap();
    assert_eq!(params(1), params(0));
    assert_eq!(params(0), (4 * PARAMS_PER_RANK) as f64);
    // (4 per module ± what moves between widths), and AdaLoRA's budget never exceeds its initial
    // 1.5 × 4 per module.
    for (i, name) in [(2, "peft:adalora"), (3, "peft:eva"), (4, "adalora-svd")] {
        let mean = runs[i][0]["mean_params"].as_f64().unwrap();
        assert!(params(i) > 0.0 && mean <= 1.5 * params(0), "{name}: mean {mean}, final {}", params(i));
    }
    // rankpilot's AdaLoRA in PEFT's form ends within PEFT's triplet budget: at most 4 of its 6
    // components per module on average, and it did mask (6 steps: tinit 1, tfinal 1).
    let last = runs[4][0]["rounds"].as_array().unwrap().last().unwrap()["ranks"].as_array().unwrap().clone();
    let kept: u64 = last.iter().map(|r| r.as_u64().unwrap()).sum();
    assert!(kept > 0 && kept <= 4 * last.len() as u64, "adalora-svd keeps {kept} triplets on {} sites", last.len());
    assert!(last.iter().all(|r| r.as_u64().unwrap() <= 6), "{last:?}");
    assert!(logdir.join("peft-eva/seed0").is_dir());

    // The sweep: each row at each rate on seed --seed + --seeds, scored on the first half of the
    // validation text; the reported runs at the row's best rate on the second half.
    let sweep_dir = dir.path().join("sweep");
    let mut args = base("fixed,peft:lora", &sweep_dir);
    args.extend(["--seeds", "2", "--lr-sweep", "1e-4,1e-2", "--jobs", "2"].map(String::from));
    let o = run(&args);
    assert!(o.status.success(), "{}", common::text(&o));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(sweep_dir.join("compare.json")).unwrap()).unwrap();
    let sweep = j["sweep_val_loss"].as_array().unwrap();
    assert_eq!(j["sweep_seed"], 2);
    for (row, losses) in j["rows"].as_array().unwrap().iter().zip(sweep) {
        let l: Vec<f64> = losses.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let chosen = if l[0] <= l[1] { 1e-4 } else { 1e-2 };
        assert_eq!(row["lr"].as_f64().unwrap(), chosen, "{row}");
    }
    let reported = j["runs"][0][0]["val_loss_initial"].as_f64().unwrap();
    assert!((reported - base_loss).abs() > 1e-6, "the reported half is not the whole validation text");
    assert!((j["runs"][1][0]["val_loss_initial"].as_f64().unwrap() - reported).abs() < 1e-5);
    let md = std::fs::read_to_string(sweep_dir.join("compare.md")).unwrap();
    assert!(md.contains("Learning-rate sweep (seed 2") && md.contains("*"), "{md}");

    // From the tensors rankpilot's matching row starts from (`--peer-init rankpilot`), PEFT's
    // LoRA and AdaLoRA follow rankpilot's fixed and adalora-svd step for step: the validation
    // curves agree to float rounding, and AdaLoRA ends with the same triplets kept. With PEFT's
    // own draw they do not (the control).
    let shared = |peer_init: &str| -> Vec<serde_json::Value> {
        let logdir = dir.path().join(format!("init-{peer_init}"));
        let mut args = base("fixed,peft:lora,adalora-svd,peft:adalora", &logdir);
        args.extend(["--seeds", "1", "--lr", "1e-2", "--peer-init", peer_init].map(String::from));
        let o = run(&args);
        assert!(o.status.success(), "{}", common::text(&o));
        let j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(logdir.join("compare.json")).unwrap()).unwrap();
        assert_eq!(j["peer_init"], peer_init);
        j["runs"].as_array().unwrap().iter().map(|r| r[0].clone()).collect()
    };
    let curve = |r: &serde_json::Value| -> Vec<f64> {
        r["val_curve"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect()
    };
    let gap = |x: &serde_json::Value, y: &serde_json::Value| -> f64 {
        curve(x).iter().zip(curve(y)).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
    };
    let same = shared("rankpilot");
    for (rust, peer) in [(0, 1), (2, 3)] {
        let (name, g) = (&same[peer]["scheduler"], gap(&same[rust], &same[peer]));
        assert!(
            g < 1e-4,
            "{name} from rankpilot's tensors: curves {:?} and {:?}",
            curve(&same[rust]),
            curve(&same[peer])
        );
        assert!(curve(&same[rust]).last() < curve(&same[rust]).first(), "{name}: the row did not train");
    }
    assert_eq!(same[2]["final_params"], same[3]["final_params"], "adalora-svd and peft:adalora keep other triplets");
    let own = shared("peft");
    assert!(gap(&own[0], &own[1]) > 1e-3, "peft:lora's own draw matches rankpilot's: the control says nothing");

    // A peer needs a plain rank budget and no simulated resource: refused by key otherwise.
    let mut args = base("fixed,peft:lora", &dir.path().join("bad"));
    let env_at = args.iter().position(|a| a == "none").unwrap();
    args[env_at] = "wireless-rayleigh".into();
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("--env wireless-rayleigh: the PEFT peers"), "{}", common::text(&o));
    let mut args = base("fixed,peft:eva", &dir.path().join("bad"));
    args.extend(["--peer-init".into(), "rankpilot".into()]);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("--peer-init rankpilot: peft:eva"), "{}", common::text(&o));
    let o = run(&base("peft:qlora", &dir.path().join("bad")));
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("allowed: peft:lora, peft:adalora, peft:eva"), "{}", common::text(&o));
}
