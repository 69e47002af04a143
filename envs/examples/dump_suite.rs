//! Prints every environment of a suite as one JSON line (its resource, dynamics, noise levels and
//! reward terms), to read which kinds of environment a policy gains or loses on.
//! `cargo run --release -p envs --example dump_suite -- default > suite.jsonl`
fn main() -> Result<(), envs::EnvError> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "default".to_string());
    for p in envs::distribution::EnvSuite::load(&name)?.environments()? {
        println!("{}", serde_json::to_string(&p).expect("a preset serializes"));
    }
    Ok(())
}
