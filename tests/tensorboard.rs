//! Our event files, read back by the real TensorBoard (the Python package's EventAccumulator).

mod common;

use std::process::Command;

use runio::tensorboard::{SummaryWriter, heatmap};

/// What TensorBoard's own reader (`EventAccumulator`) sees in `logdir`, as JSON.
fn read_events(logdir: &std::path::Path) -> serde_json::Value {
    let out = Command::new(common::python())
        .arg(common::root().join("tests/python/read_events.py"))
        .arg(logdir)
        .output()
        .expect("run python");
    assert!(out.status.success(), "python reader failed: {}", common::text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn real_tensorboard_reads_scalars_histograms_images_and_text() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut w = SummaryWriter::new(dir.path()).unwrap();
        for step in 0..10 {
            w.add_scalar("train/loss", 1.0 / (step as f64 + 1.0), step).unwrap();
        }
        w.add_scalar("charts/steps_per_s", 1234.5, 3).unwrap();
        let ranks: Vec<f64> = [0, 1, 2, 4, 8, 8, 16, 16, 16, 64].iter().map(|&r| r as f64).collect();
        w.add_histogram("ranks", &ranks, 7).unwrap();
        let values: Vec<f64> = (0..24).map(|i| (i % 8) as f64).collect();
        let img = heatmap(&values, 4, 6, 0.0, 7.0, 5);
        w.add_image_rgb("ranks/heatmap", img.width, img.height, &img.rgb, 2).unwrap();
        w.add_text("config", "| key | value |\n|---|---|\n| lr | 3e-4 |", 0).unwrap();
    }
    let v = read_events(dir.path());

    let loss = v["scalars"]["train/loss"].as_array().unwrap();
    assert_eq!(loss.len(), 10);
    for (i, e) in loss.iter().enumerate() {
        assert_eq!(e[0].as_i64().unwrap(), i as i64);
        assert!((e[1].as_f64().unwrap() - 1.0 / (i as f64 + 1.0)).abs() < 1e-6);
    }
    assert_eq!(v["scalars"]["charts/steps_per_s"][0][0], 3);
    assert!((v["scalars"]["charts/steps_per_s"][0][1].as_f64().unwrap() - 1234.5).abs() < 1e-3);

    let h = &v["histograms"]["ranks"][0];
    assert_eq!(h["step"], 7);
    assert_eq!(h["min"], 0.0);
    assert_eq!(h["max"], 64.0);
    assert_eq!(h["num"], 10.0);
    assert_eq!(h["sum"], 135.0);
    assert_eq!(h["sum_squares"], (1 + 4 + 16 + 64 + 64 + 256 * 3 + 4096) as f64);
    let counts: f64 = h["bucket"].as_array().unwrap().iter().map(|c| c.as_f64().unwrap()).sum();
    assert_eq!(counts, 10.0);

    let im = &v["images"]["ranks/heatmap"][0];
    assert_eq!((im["step"].as_i64(), im["width"].as_i64(), im["height"].as_i64()), (Some(2), Some(30), Some(20)));
    assert_eq!((im["png_width"].as_i64(), im["png_height"].as_i64()), (Some(30), Some(20)));

    let t = &v["texts"]["config"][0];
    assert_eq!(t["plugin"], "text");
    assert_eq!(t["step"], 0);
    assert!(t["text"].as_str().unwrap().contains("| lr | 3e-4 |"));
}

/// Issue 13, item 6: after a crash and `--resume` from an earlier checkpoint, the steps the
/// crashed run logged after that checkpoint must not appear twice.
#[test]
fn a_restart_mark_drops_the_steps_logged_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The interrupted run: logged steps 0..10, its last checkpoint was at step 6.
        let mut w = SummaryWriter::new(dir.path()).unwrap();
        for step in 0..10 {
            w.add_scalar("charts/mean_reward", step as f64, step).unwrap();
        }
    }
    {
        // The resumed run, in a new event file of the same log directory.
        let mut w = SummaryWriter::new(dir.path()).unwrap();
        w.add_session_start(6).unwrap();
        for step in 6..12 {
            w.add_scalar("charts/mean_reward", 100.0 + step as f64, step).unwrap();
        }
    }
    let v = read_events(dir.path());
    let seen: Vec<(i64, f64)> = v["scalars"]["charts/mean_reward"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_i64().unwrap(), e[1].as_f64().unwrap()))
        .collect();
    let want: Vec<(i64, f64)> = (0..12).map(|s| (s, if s < 6 { s as f64 } else { 100.0 + s as f64 })).collect();
    assert_eq!(seen, want, "each step once, the resumed run's values from the restart on");
}
