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
    // A keep probability of 1 would never redraw a rank; an unknown allocation order is named.
    std::fs::write(p.join("keep.toml"), "name = 'x'\n[ppo]\nnet = { hidden = 8, keep = 1.0 }\n").unwrap();
    let o = common::rankpilot_in(&["train", "--policy", "keep.toml", "--steps", "1"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("ppo.net.keep") && common::text(&o).contains("[0, 1)"), "{}", common::text(&o));
    std::fs::write(p.join("order.toml"), "name = 'x'\n[ppo]\nnet = { hidden = 8, fit = { order = 'last' } }\n")
        .unwrap();
    let o = common::rankpilot_in(&["train", "--policy", "order.toml", "--steps", "1"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("largest-first"), "{}", common::text(&o));
    // The anchor KL needs a prior to anchor to; a skip-only teacher needs a skip head.
    std::fs::write(p.join("kl.toml"), "name = 'x'\n[ppo]\nprior_kl_coef = 0.1\n").unwrap();
    let o = common::rankpilot_in(&["train", "--policy", "kl.toml", "--steps", "1"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(
        common::text(&o).contains("ppo.prior_kl_coef") && common::text(&o).contains("[prior]"),
        "{}",
        common::text(&o)
    );
    std::fs::write(
        p.join("teach.toml"),
        "name = 'x'\n[ppo]\nteacher_targets = 'skip'\nnet = { hidden = 8, skip = false }\n",
    )
    .unwrap();
    let o = common::rankpilot_in(&["train", "--policy", "teach.toml", "--steps", "1"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("ppo.teacher_targets"), "{}", common::text(&o));
    // A defer head hands rounds to a prior and learns on vine branches: it needs both.
    std::fs::write(p.join("defer.toml"), "name = 'x'\n[ppo]\nnet = { hidden = 8, defer = true }\n").unwrap();
    let o = common::rankpilot_in(&["train", "--policy", "defer.toml", "--steps", "1"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(
        common::text(&o).contains("ppo.net.defer") && common::text(&o).contains("skip_vine"),
        "{}",
        common::text(&o)
    );
    // Ranks that are the prior's need a prior.
    std::fs::write(p.join("ranks.toml"), "name = 'x'\n[ppo]\nnet = { hidden = 8, prior_ranks = true }\n").unwrap();
    let o = common::rankpilot_in(&["train", "--policy", "ranks.toml", "--steps", "1"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(
        common::text(&o).contains("ppo.net.prior_ranks") && common::text(&o).contains("[prior]"),
        "{}",
        common::text(&o)
    );
    // The risk-aware budget is inferred: it needs the inference on.
    std::fs::write(p.join("risk.toml"), "name = 'x'\n[prior]\nenabled = true\nrisk = true\n").unwrap();
    let o = common::rankpilot_in(&["train", "--policy", "risk.toml", "--steps", "1"], p);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(common::text(&o).contains("prior.risk") && common::text(&o).contains("infer"), "{}", common::text(&o));

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

/// Issue 13, items 1, 2 and 13: a resumed run keeps the best evaluation it had (so `best/` is
/// replaced only by a better policy), keeps its planned steps, and resuming a finished run says
/// so instead of printing NaN.
#[test]
fn resume_keeps_the_best_policy_and_the_run_plan() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec!["train", "--policy", "tiny", "--device", "cpu", "--eval-episodes", "4", "--seed", "7"];
        args.extend(["--checkpoint-every", "1", "--eval-every", "2", "--out", out, "--logdir", "runs"]);
        args.extend(extra);
        let o = common::rankpilot_in(&args, p);
        assert!(o.status.success(), "{}", common::text(&o));
        o
    };
    run("U", &["--steps", "1280"]);
    run("K", &["--steps", "1280", "--stop-after", "11"]);
    run("K", &["--resume"]);
    let (u, k) = (meta(&p.join("U")), meta(&p.join("K")));
    assert_eq!(k["config"]["total_steps"], 1280, "a resume without --steps continues the planned run");
    assert_eq!(u["weights_sha256"], k["weights_sha256"]);
    let (ub, kb) = (meta(&p.join("U/best")), meta(&p.join("K/best")));
    assert_eq!(ub["step"], kb["step"], "best/ after a resume is the uninterrupted run's best");
    assert_eq!(ub["weights_sha256"], kb["weights_sha256"]);
    assert_eq!(u["state"]["best"], k["state"]["best"]);
    // The finished run: nothing to do, and no NaN.
    let o = run("K", &["--resume"]);
    let t = common::text(&o);
    assert!(t.contains("already finished") && !t.contains("NaN") && !t.contains("inf"), "{t}");
    assert_eq!(meta(&p.join("K"))["weights_sha256"], k["weights_sha256"]);
}

/// Issue 13, items 3 and 4: a fresh run never replaces another run's checkpoint without
/// --force, and a second writer on the same --out is refused while the first runs.
#[test]
fn one_writer_per_output_and_no_silent_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let o = train(p, "ck", &["--stop-after", "1"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let before = std::fs::read(p.join("ck/checkpoint.json")).unwrap();
    let o = train(p, "ck", &[]);
    let t = common::text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("already holds a checkpoint") && t.contains("--resume") && t.contains("--force"), "{t}");
    assert_eq!(std::fs::read(p.join("ck/checkpoint.json")).unwrap(), before, "nothing was overwritten");
    let o = train(p, "ck", &["--force"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert_eq!(meta(&p.join("ck"))["step"], 256);

    // A long first writer; the second one starts while it holds the lock.
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_rankpilot"))
        .args(["train", "--policy", "tiny", "--steps", "100000000", "--device", "cpu", "--eval-every", "0"])
        .args(["--out", "busy", "--logdir", "runs-busy"])
        .current_dir(p)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = p.join("busy/.lock");
    let t0 = std::time::Instant::now();
    while !lock.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let o = train(p, "busy", &["--force"]);
    let _ = first.kill();
    let _ = first.wait();
    let t = common::text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("another rankpilot process is writing to this directory"), "{t}");
}

/// Issue 13, item 12: a hand-edited `checkpoint.json` is checked like fresh input — bad input
/// (exit 2) naming the key, never a panic.
#[test]
fn an_edited_checkpoint_is_validated_like_fresh_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let o = train(p, "ck", &["--stop-after", "1"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let good = meta(&p.join("ck"));
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 4] = [
        ("normalizer", |m| {
            m["state"]["normalizer"]["site"]["var"].as_array_mut().unwrap().truncate(3);
        }),
        ("normalizer", |m| m["state"]["normalizer"]["global"]["var"][0] = serde_json::json!(-1.0)),
        ("rounds", |m| m["config"]["env_preset"]["rounds"] = serde_json::json!(0)),
        ("best", |m| m["state"]["best"] = serde_json::json!({"oracle_gap_closed": "high", "step": 1})),
    ];
    for (key, edit) in edits {
        let mut m = good.clone();
        edit(&mut m);
        std::fs::write(p.join("ck/checkpoint.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        for args in [&["--resume"][..], &[]] {
            let o = if args.is_empty() {
                common::rankpilot_in(&["eval", "--episodes", "1", "--checkpoint", "ck"], p)
            } else {
                train(p, "ck", args)
            };
            let t = common::text(&o);
            if key == "best" && args.is_empty() {
                continue; // eval does not read the training state's best
            }
            assert_eq!(o.status.code(), Some(2), "{key} {args:?}: {t}");
            assert!(t.contains(key) && !t.contains("panicked"), "{key} {args:?}: {t}");
        }
    }
}
