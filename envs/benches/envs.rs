//! Benchmarks: vectorized stepping (site-steps per second) and oracle solve time.
//!
//! `cargo bench -p envs --bench envs`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use envs::{VecEnv, presets};
use std::hint::black_box;

fn stepping(c: &mut Criterion) {
    let p = presets::load("llama7b").unwrap();
    let n_envs = 64;
    let mut v = VecEnv::new(&p, n_envs, 1).unwrap();
    let n = v.n_sites();
    // A mixed plan (ranks 1, 2, 4 by site), feasible in most rounds, so the full update path runs.
    let rs = v.spec().rank_set.clone();
    let plan: Vec<u32> = (0..n_envs * n).map(|i| rs.rank(1 + i % 3)).collect();
    let idx: Vec<u8> = plan
        .iter()
        .map(|&r| rs.index_of(r).unwrap() as u8)
        .collect();
    let mut g = c.benchmark_group("vec_step");
    g.throughput(Throughput::Elements((n_envs * n) as u64));
    g.bench_function("llama7b_64envs_x_224sites_ranks", |b| {
        b.iter(|| v.step(black_box(&plan)).unwrap())
    });
    g.bench_function("llama7b_64envs_x_224sites_indices", |b| {
        b.iter(|| v.step_indices(black_box(&idx)).unwrap())
    });
    g.finish();
    let viol = {
        let mut count = 0;
        let mut total = 0;
        for _ in 0..200 {
            v.step(&plan).unwrap();
            count += v.outcomes().iter().filter(|o| o.violation).count();
            total += n_envs;
        }
        count as f64 / total as f64
    };
    eprintln!("(violation share of the benchmark plan: {viol:.3})");
}

fn oracle(c: &mut Criterion) {
    let mut g = c.benchmark_group("oracle");
    for name in ["llama7b", "wireless-rayleigh"] {
        let p = presets::load(name).unwrap();
        let n_envs = 32;
        let mut v = VecEnv::new(&p, n_envs, 2).unwrap();
        let n = v.n_sites();
        // Whole episodes under the oracle: worst single solve and the core sizes seen.
        let mut worst = std::time::Duration::ZERO;
        let mut total = std::time::Duration::ZERO;
        let mut solves = 0u32;
        let mut max_core = 0;
        let mut max_states = 0;
        let mut inexact = 0;
        for _ in 0..p.rounds {
            let mut plan = Vec::with_capacity(n_envs * n);
            for e in 0..n_envs {
                let t0 = std::time::Instant::now();
                let (pl, st) = v.oracle_plan(e);
                let dt = t0.elapsed();
                worst = worst.max(dt);
                total += dt;
                solves += 1;
                max_core = max_core.max(st.core_items);
                max_states = max_states.max(st.max_states);
                inexact += (!st.exact) as u32;
                plan.extend(pl);
            }
            v.step(&plan).unwrap();
        }
        eprintln!(
            "({name}: {solves} solves over whole episodes: mean {:?}, worst {:?}, largest core {max_core} sites, largest DP layer {max_states} states, inexact {inexact})",
            total / solves,
            worst
        );
        // Mid-episode states of all environments, solved in turn (time per solve = time / n_envs).
        for _ in 0..7 {
            let mut plan = Vec::with_capacity(n_envs * n);
            for e in 0..n_envs {
                plan.extend(v.oracle_plan(e).0);
            }
            v.step(&plan).unwrap();
        }
        g.throughput(Throughput::Elements(n_envs as u64));
        g.bench_function(format!("{name}_{n}sites_x{n_envs}_states"), |b| {
            b.iter_batched(
                || (),
                |_| {
                    for e in 0..n_envs {
                        black_box(v.oracle_plan(e));
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, stepping, oracle);
criterion_main!(benches);
