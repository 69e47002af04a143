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
