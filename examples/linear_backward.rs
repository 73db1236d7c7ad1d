//! The Linear backward engines side by side at mnist-dits's shapes for a batch of 256 (the
//! folded attention's `64 → 512` projection, the MLP's `64 → 256` and `256 → 64`), interleaved
//! call by call so that a noisy host slows both alike: each engine's fastest and median time
//! and GFLOP/s (the input and weight gradients, `4·rows·input·output` FLOPs), per layer. The
//! engines are those this CPU runs, or that `DITS_CPU_CAPABILITY` caps it to.
//!
//!     cargo run --release --example linear_backward

use std::time::Instant;

use dits::kernels::linear::{Activation, BackwardEngine, LinearDims, backward_on};

const REPEATS: usize = 40;

fn main() {
    println!("cpu: {}; kernels {}", dits::bench::cpu_model(), dits::kernels::isa::describe());
    let rows = 256 * 49;
    let value = |i: usize| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5;
    for (input, output) in [(64, 512), (64, 256), (256, 64)] {
        let d = LinearDims { rows, input, output };
        let x: Vec<f32> = (0..rows * input).map(value).collect();
        let w: Vec<f32> = (0..input * output).map(|i| value(i + 1)).collect();
        let dy: Vec<f32> = (0..rows * output).map(|i| value(i + 2)).collect();
        let engines = BackwardEngine::available();
        let mut times = vec![Vec::new(); engines.len()];
        for _ in 0..REPEATS {
            for (e, t) in engines.iter().zip(times.iter_mut()) {
                let mut g = dy.clone();
                let start = Instant::now();
                std::hint::black_box(backward_on(*e, &x, &w, &[], &mut g, d, Activation::Identity));
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        let flops = 4.0 * (rows * input * output) as f64;
        let report: Vec<String> = engines
            .iter()
            .zip(times.iter_mut())
            .map(|(e, t)| {
                t.sort_by(f64::total_cmp);
                let (best, median) = (t[0], t[t.len() / 2]);
                format!("{e:?} {best:.2} ms best ({:.1} GFLOP/s), {median:.2} median", flops / best / 1e6)
            })
            .collect();
        println!("{rows}×{input}→{output}: {}", report.join("; "));
    }
}
