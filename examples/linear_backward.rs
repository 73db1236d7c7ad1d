//! The Linear backward engines side by side at mnist-dits's shapes for a batch of 256 (the
//! folded attention's `64 → 512` projection, the MLP's `64 → 256` and `256 → 64`), interleaved
//! call by call so that a noisy host slows both alike: each engine's fastest and median time
//! and GFLOP/s (the input and weight gradients, `4·rows·input·output` FLOPs), per layer, in the
//! two ways a training step calls it: once over the batch's 12544 token rows on all threads
//! (`--micro-batches 1`), and as two concurrent calls of 6272 rows (the default two
//! micro-batches, one per core). The engines are those this CPU runs, or that
//! `DITS_CPU_CAPABILITY` caps it to.
//!
//!     cargo run --release --example linear_backward

use std::time::Instant;

use dits::kernels::linear::{Activation, BackwardEngine, LinearDims, backward_on};

const REPEATS: usize = 30;
const BATCH_ROWS: usize = 256 * 49;

fn median_and_best(t: &mut [f64]) -> (f64, f64) {
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[0])
}

fn main() {
    println!("cpu: {}; {}", dits::bench::cpu_model(), dits::kernels::isa::describe());
    let value = |i: usize| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5;
    for (input, output) in [(64, 512), (64, 256), (256, 64)] {
        for concurrent in [1, 2] {
            let rows = BATCH_ROWS / concurrent;
            let d = LinearDims { rows, input, output };
            let x: Vec<f32> = (0..rows * input).map(value).collect();
            let w: Vec<f32> = (0..input * output).map(|i| value(i + 1)).collect();
            let dy: Vec<f32> = (0..rows * output).map(|i| value(i + 2)).collect();
            let run = |engine| {
                let mut g = dy.clone();
                std::hint::black_box(backward_on(engine, &x, &w, &[], &mut g, d, Activation::Identity));
            };
            let engines = BackwardEngine::available();
            let mut times = vec![Vec::new(); engines.len()];
            for _ in 0..REPEATS {
                for (&engine, t) in engines.iter().zip(times.iter_mut()) {
                    let start = Instant::now();
                    if concurrent == 1 {
                        run(engine);
                    } else {
                        rayon::join(|| run(engine), || run(engine));
                    }
                    t.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            let flops = 4.0 * (BATCH_ROWS * input * output) as f64;
            let report: Vec<String> = engines
                .iter()
                .zip(times.iter_mut())
                .map(|(e, t)| {
                    let (median, best) = median_and_best(t);
                    format!("{e:?} {best:.2} ms best ({:.1} GFLOP/s), {median:.2} median", flops / best / 1e6)
                })
                .collect();
            let how = if concurrent == 1 { "1 call of 12544 rows " } else { "2 calls of 6272 rows" };
            println!("{input}→{output}, {how}: {}", report.join("; "));
        }
    }
}
