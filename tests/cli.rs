//! CLI behaviour: help, bad input, exit codes.

mod common;

#[test]
fn help_lists_commands_and_options() {
    let o = common::rankpilot(&["--help"]);
    assert!(o.status.success());
    let t = common::text(&o);
    assert!(t.contains("doctor"), "{t}");
    let o = common::rankpilot(&["doctor", "--help"]);
    let t = common::text(&o);
    assert!(t.contains("--seed") && t.contains("--device"), "{t}");
}

#[test]
fn bad_device_is_bad_input() {
    let o = common::rankpilot(&["doctor", "--device", "gpu"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("allowed: auto, cpu, cuda, cuda:N"), "{}", common::text(&o));
    let o = common::rankpilot(&["doctor", "--device", "cuda:57"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
}

#[test]
fn unknown_command_is_bad_input() {
    let o = common::rankpilot(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

/// Issue 13, items 10, 11 and 13: arguments that used to panic, abort or print NaN are bad
/// input (exit 2) with a one-line message naming the flag or file, key and what is allowed.
#[test]
fn hostile_arguments_and_presets_are_bad_input_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let text = p.join("t.txt");
    std::fs::write(&text, "def f(x):\n    return x\n".repeat(400)).unwrap();
    let data = text.to_str().unwrap();
    let preset = std::fs::read_to_string(common::root().join("envs/presets/wireless-rayleigh.toml")).unwrap();
    std::fs::write(p.join("wide.toml"), preset.replace("ranks = [0, 1, 2, 4, 8, 16, 32, 64]", "ranks = [0, 8, 4096]"))
        .unwrap();
    std::fs::write(p.join("inf.toml"), preset.replace("deadline_s = 2.0", "deadline_s = inf")).unwrap();
    std::fs::write(p.join("wide-net.toml"), "name = 'x'\n[ppo]\nnet = { hidden = 100000000 }\n").unwrap();
    std::fs::write(p.join("big-replay.toml"), "name = 'x'\n[ddim]\nenabled = true\nreplay_capacity = 1000000000000\n")
        .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["pretrain", "--data", data, "--eval-every", "0"], "--eval-every"),
        (vec!["pretrain", "--data", data, "--hidden", "0", "--heads", "0"], "--hidden"),
        (vec!["pretrain", "--data", data, "--hidden", "30", "--heads", "2", "--kv-heads", "2"], "head_dim"),
        (vec!["pretrain", "--data", data, "--val-fraction", "1"], "--val-fraction"),
        (vec!["pretrain", "--data", data, "--val-fraction", "1.5"], "--val-fraction"),
        (vec!["pretrain", "--data", data, "--hidden", "100000000"], "--hidden"),
        (vec!["train", "--eval-episodes", "0", "--steps", "64"], "--eval-episodes"),
        (vec!["train", "--eval-episodes", "1000000000000", "--steps", "64"], "--eval-episodes"),
        (vec!["eval", "--episodes", "1000000000000"], "--episodes"),
        (vec!["eval", "--env", "wide.toml", "--episodes", "1"], "wide.toml"),
        (vec!["eval", "--env", "inf.toml", "--episodes", "1"], "resource.channel.deadline_s"),
        (vec!["train", "--policy", "wide-net.toml", "--steps", "64"], "ppo.net.hidden"),
        (vec!["train", "--policy", "big-replay.toml", "--steps", "64"], "ddim.replay_capacity"),
        (vec!["eval", "--suite", "no-such-suite"], "no-such-suite"),
        (vec!["train", "--distribution", "no-such-dist", "--steps", "64"], "no-such-dist"),
    ];
    for (args, named) in cases {
        let o = common::rankpilot_in(&args, p);
        let t = common::text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {t}");
        assert!(t.contains(named) && !t.contains("panicked") && !t.contains("NaN"), "{args:?}: {t}");
        assert_eq!(t.trim().lines().count(), 1, "{args:?}: one line: {t}");
    }
}

/// Issue 12, item 4: a policy with a skip head acts on a parameter budget (where skipping is
/// not allowed) with the head masked, instead of failing.
#[test]
fn the_shipped_policy_acts_on_a_budget_preset() {
    let o = common::rankpilot(&["eval", "--env", "budget", "--episodes", "2", "--policy", "uniform", "--checkpoint"]);
    assert_eq!(o.status.code(), Some(2), "--checkpoint needs a value: {}", common::text(&o));
    let o = common::rankpilot_in(
        &[
            "eval",
            "--env",
            "budget",
            "--episodes",
            "2",
            "--policy",
            "uniform",
            "--checkpoint",
            "checkpoints/wireless-rayleigh",
        ],
        &common::root(),
    );
    let t = common::text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("wireless-rayleigh") && !t.contains("NaN"), "{t}");
}

/// Issue 12, item 4: the shipped default policy (trained on the distribution) acts on every
/// built-in preset: every resource kind, 56 to 224 sites; it never skips on the budget preset.
#[test]
fn the_shipped_default_policy_acts_on_every_built_in_preset() {
    for env in ["wireless-rayleigh", "wireless-rician", "latency", "budget", "llama7b"] {
        let o = common::rankpilot_in(
            &["eval", "--env", env, "--episodes", "2", "--policy", "uniform", "--checkpoint", "checkpoints/default"],
            &common::root(),
        );
        let t = common::text(&o);
        assert!(o.status.success(), "{env}: {t}");
        let row = t.lines().find(|l| l.starts_with("default ")).unwrap_or_else(|| panic!("{env}: {t}"));
        assert!(!row.contains("NaN"), "{env}: {row}");
        if env == "budget" {
            // Columns: name, return ± se, loss ± se, resource, violations, skips, gap.
            let skips: f64 = row.split_whitespace().nth(9).unwrap().parse().unwrap();
            assert_eq!(skips, 0.0, "{row}");
        }
    }
}

/// Issue 12, item 1: `eval --suite` runs every environment of a suite (here a small one: two
/// draws of the default distribution and the budget preset) and prints per-environment and mean
/// gap closed with intervals, and the checkpoint's paired differences to its prior and AdaLoRA.
#[test]
fn eval_suite_prints_intervals_and_paired_differences() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("small-suite.toml");
    std::fs::write(&suite, "name = 'small'\ndistribution = 'default'\ndraws = 2\nseed = 7\npresets = ['budget']\n")
        .unwrap();
    let json = dir.path().join("suite.json");
    let o = common::rankpilot_in(
        &[
            "eval",
            "--suite",
            suite.to_str().unwrap(),
            "--episodes",
            "6",
            "--resamples",
            "50",
            "--checkpoint",
            "checkpoints/wireless-rayleigh",
            "--json",
            json.to_str().unwrap(),
        ],
        &common::root(),
    );
    let t = common::text(&o);
    assert!(o.status.success(), "{t}");
    for want in ["small-00", "small-01", "budget", "MEAN", "wireless-rayleigh prior", "wireless-rayleigh − adalora"] {
        assert!(t.contains(want), "`{want}` missing: {t}");
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["summary"]["environments"].as_array().unwrap().len(), 3);
    let mean = &v["summary"]["mean"][0];
    assert!(mean["lo"].as_f64().unwrap() <= mean["value"].as_f64().unwrap());
}

/// Issue 13, items 9 and 13: `squeeze` keeps a rank-0 site empty under `--energy`, refuses an
/// all-rank-0 adapter as bad input; a corrupt checkpoint is bad input; an OS error is printed
/// once and names the file asked for, not a temporary file.
#[test]
fn squeeze_checkpoint_and_os_errors_are_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let pre = "base_model.model.model.layers.0.self_attn";
    let write_adapter = |name: &str, q_rank: i64| {
        let d = p.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"q_proj": q_rank, "k_proj": 0}});
        std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
        let t = |s: [i64; 2]| tch::Tensor::randn(s, (tch::Kind::Float, tch::Device::Cpu));
        let ts = vec![
            (format!("{pre}.q_proj.lora_A.weight"), t([q_rank, 16])),
            (format!("{pre}.q_proj.lora_B.weight"), t([12, q_rank])),
            (format!("{pre}.k_proj.lora_A.weight"), t([0, 16])),
            (format!("{pre}.k_proj.lora_B.weight"), t([12, 0])),
        ];
        runio::checkpoint::write_safetensors(&d.join("adapter_model.safetensors"), &ts, None).unwrap();
        d.to_str().unwrap().to_string()
    };
    let some = write_adapter("some", 2);
    let o =
        common::rankpilot_in(&["squeeze", "--adapter", &some, "--energy", "0.5", "--out", "sq", "--device", "cpu"], p);
    let t = common::text(&o);
    assert!(o.status.success(), "{t}");
    let k_row = t.lines().find(|l| l.contains("k_proj")).unwrap();
    let cols: Vec<&str> = k_row.split_whitespace().collect();
    assert_eq!((cols[1], cols[2]), ("0", "0"), "a rank-0 site stays empty: {k_row}");

    let empty = write_adapter("empty", 0);
    let o = common::rankpilot_in(&["squeeze", "--adapter", &empty, "--rank", "1", "--out", "e2", "--device", "cpu"], p);
    let t = common::text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("rank 0") && t.contains("allowed"), "{t}");

    // A checkpoint whose weights file is missing.
    std::fs::create_dir_all(p.join("ck")).unwrap();
    std::fs::copy(common::root().join("checkpoints/wireless-rayleigh/checkpoint.json"), p.join("ck/checkpoint.json"))
        .unwrap();
    let o = common::rankpilot_in(&["eval", "--episodes", "1", "--checkpoint", "ck"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));

    let o =
        common::rankpilot_in(&["eval", "--episodes", "1", "--policy", "uniform", "--json", "no/such/dir/t.json"], p);
    let t = common::text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert_eq!(t.matches("os error").count(), 1, "{t}");
    assert!(t.contains("no/such/dir/t.json") && !t.contains("rankpilot-tmp"), "{t}");
}
