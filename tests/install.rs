//! The installation: rpath linking, the set-up script's behaviour without a package index.

mod common;

use std::process::Command;

#[test]
fn binary_resolves_libtorch_without_ld_library_path() {
    let out = Command::new("ldd").arg(env!("CARGO_BIN_EXE_rankpilot")).env_remove("LD_LIBRARY_PATH").output().unwrap();
    let text = common::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("not found"), "unresolved libraries:\n{text}");
    for lib in ["libtorch_cpu.so", "libtorch.so", "libc10.so"] {
        assert!(text.contains(lib), "{lib} not linked:\n{text}");
    }
    // And it runs: a matmul through libtorch on the CPU.
    let o = common::rankpilot(&["doctor", "--device", "cpu"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(common::text(&o).contains("matmul on cpu"), "{}", common::text(&o));
}

#[test]
fn setup_without_package_index_says_what_is_missing() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(common::root().join("scripts/setup.sh"))
        .env("RANKPILOT_CACHE", cache.path())
        // An index nobody listens on: the same failure as a machine without network to PyPI.
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_NO_CACHE_DIR", "1")
        .env("PIP_RETRIES", "0")
        .env("PIP_TIMEOUT", "2")
        .output()
        .unwrap();
    let text = common::text(&out);
    assert!(!out.status.success(), "set-up should fail without an index:\n{text}");
    assert!(text.contains("could not install the Python packages from PyPI"), "{text}");
    assert!(text.contains("torch==2.13.0") && text.contains("tensorboard=="), "names what is missing:\n{text}");
    // Nothing half-installed is left to be mistaken for a good cache.
    assert!(!cache.path().join("venv").exists());
}
