//! `rankpilot train` / `eval` end to end: checkpoints, exact resume, bad input.

mod common;

use std::path::Path;

fn meta(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("checkpoint.json")).unwrap()).unwrap()
}

fn train(dir: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--policy", "tiny", "--steps", "256", "--seed", "5", "--device", "cpu"];
    args.extend(["--eval-episodes", "4", "--eval-every", "2", "--checkpoint-every", "1"]);
    args.extend(["--out", out, "--logdir", "runs"]);
    args.extend(extra);
    common::rankpilot_in(&args, dir)
}

#[test]
fn train_resume_equals_uninterrupted_and_eval_adds_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let o = train(dir.path(), "straight", &[]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(common::text(&o).contains("oracle gap closed"), "{}", common::text(&o));

    let o = train(dir.path(), "split", &["--stop-after", "2"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert_eq!(meta(&dir.path().join("split"))["step"], 128);
    let o = train(dir.path(), "split", &["--resume"]);
    assert!(o.status.success(), "{}", common::text(&o));

    let (a, b) = (meta(&dir.path().join("straight")), meta(&dir.path().join("split")));
    assert_eq!(a["step"], 256);
    assert_eq!(a["weights_sha256"], b["weights_sha256"], "resumed run must equal the uninterrupted one");

    // TensorBoard logs exist.
    let runs: Vec<_> = std::fs::read_dir(dir.path().join("runs")).unwrap().collect();
    assert!(!runs.is_empty());

    let o = common::rankpilot_in(
        &["eval", "--episodes", "3", "--policy", "uniform,oracle", "--checkpoint", "straight", "--json", "t.json"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", common::text(&o));
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("t.json")).unwrap()).unwrap();
    let names: Vec<&str> = t["rows"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["uniform", "oracle", "straight"]);
}

#[test]
fn bad_input_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    // Unknown policy name: lists the allowed ones.
    let o = common::rankpilot_in(&["eval", "--policy", "greedy", "--episodes", "1"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("allowed: uniform, adalora, random, oracle"), "{}", common::text(&o));

    // A preset with an unknown key: file, key and allowed keys named.
    std::fs::write(p.join("bad.toml"), "name = 'x'\n[ppo]\nlearning_rat = 0.1\n").unwrap();
    let o = common::rankpilot_in(&["train", "--policy", "bad.toml", "--steps", "1"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    let t = common::text(&o);
    assert!(t.contains("bad.toml") && t.contains("learning_rat") && t.contains("learning_rate"), "{t}");

    // An out-of-range value.
    std::fs::write(p.join("range.toml"), "name = 'x'\n[ppo]\ngamma = 1.5\n").unwrap();
    let o = common::rankpilot_in(&["train", "--policy", "range.toml", "--steps", "1"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("ppo.gamma"), "{}", common::text(&o));

    // A checkpoint trained for another rank set: refused, saying which ranks.
    let o = train(p, "ck", &["--stop-after", "1"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let preset = std::fs::read_to_string(common::root().join("envs/presets/wireless-rayleigh.toml")).unwrap();
    std::fs::write(
        p.join("fewer-ranks.toml"),
        preset.replace("ranks = [0, 1, 2, 4, 8, 16, 32, 64]", "ranks = [0, 4, 16]"),
    )
    .unwrap();
    let o = common::rankpilot_in(&["eval", "--env", "fewer-ranks.toml", "--episodes", "1", "--checkpoint", "ck"], p);
    let t = common::text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("[0, 4, 16]") && t.contains("[0, 1, 2, 4, 8, 16, 32, 64]"), "{t}");

    // A truncated checkpoint: a clear error and nothing overwritten.
    let meta_before = std::fs::read(p.join("ck/checkpoint.json")).unwrap();
    let weights = p.join("ck").join(meta(&p.join("ck"))["weights"].as_str().unwrap());
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let o = common::rankpilot_in(&["eval", "--episodes", "1", "--checkpoint", "ck"], p);
    assert_ne!(o.status.code(), Some(0));
    assert!(common::text(&o).contains("corrupted or truncated"), "{}", common::text(&o));
    let o = train(p, "ck", &["--resume"]);
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(std::fs::read(p.join("ck/checkpoint.json")).unwrap(), meta_before, "a failed resume must not overwrite");
}
