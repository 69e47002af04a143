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
