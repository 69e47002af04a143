//! Link the rankpilot binaries so that they find libtorch without LD_LIBRARY_PATH.
//!
//! torch-sys reports its library directory as `DEP_TCH_LIBTORCH_LIB`, which Cargo passes only to
//! crates depending on torch-sys directly (hence the direct dependency in Cargo.toml). We embed it
//! as an rpath and link `libtorch.so` itself with `--no-as-needed`: in the PyPI wheel it is
//! libtorch.so that pulls in libtorch_cuda.so, so without it CUDA would never be available.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
            println!("cargo:rustc-link-arg=-Wl,-rpath={}", lib.to_string_lossy());
        }
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
