//! Where one core's time goes in mnist-dits's folded attention forward (one block, no kept
//! probabilities): the whole kernel, then its parts timed image by image — the query
//! transposes, the score product, the column softmax and the output products — each with its
//! GFLOP/s, and the one-core FMA peak to read them against. The engine is the CPU's best, or
//! the one `DITS_CPU_CAPABILITY` caps it to; the peak probe measures the widest of the kernels'
//! and gemm's extensions, so an AVX2 figure on an AVX-512 machine wants gemm built without its
//! AVX-512 code too:
//!
//!     RAYON_NUM_THREADS=1 DITS_CPU_CAPABILITY=avx2 \
//!         cargo run --release --no-default-features --example attention_breakdown
//!
//! The parts call the same public pieces the kernel calls, in its order; the output product here
//! reads the values in place (the kernel packs them first for the AVX2 tiles).

use std::time::Instant;

use dits::kernels::attention::{Engine, FoldedDims, folded_forward};
use dits::kernels::simd::softmax_columns;
use dits::kernels::tile::{self, Strided};
use dits::kernels::{peak, tile_avx2, transpose::transpose};

/// Images per call: enough that the inputs live in memory, not in cache, as in a real batch.
const IMAGES: usize = 128;
const REPEATS: usize = 30;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let d = FoldedDims { batch: IMAGES, seq: 49, heads: 4, width: 64 };
    let (s, heads, w, row, hs) = (d.seq, d.heads, d.width, d.row(), d.heads * d.seq);
    // A fixed pseudo-random fill (the timings do not depend on the values).
    let value = |i: usize| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5;
    let qv: Vec<f32> = (0..IMAGES * s * row).map(value).collect();
    let keys: Vec<f32> = (0..IMAGES * s * w).map(|i| value(i + 3)).collect();
    let flops = (4 * s * hs * w * IMAGES) as f64; // two products of 2·S·H·S·W each
    let engine = Engine::best();
    let product = match engine {
        Engine::Tiles => tile::broadcast_product,
        Engine::Avx2Tiles => tile_avx2::broadcast_product,
        Engine::Gemm => {
            eprintln!("error: this CPU has neither AVX-512 nor AVX2 + FMA; the parts time the register tiles");
            std::process::exit(2);
        }
    };
    let peak = peak::measure(0.5);
    println!(
        "engine {engine:?}, {} thread(s); FMA peak {:.1} GFLOP/s ({:?}), {:.1} per thread",
        rayon::current_num_threads(),
        peak.gflops,
        peak.isa,
        peak.gflops / peak.threads as f64
    );
    let whole = median(
        (0..REPEATS)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(folded_forward(&qv, &keys, d, 0.125, false, engine));
                start.elapsed().as_secs_f64()
            })
            .collect(),
    );
    println!("folded_forward, {IMAGES} images: {:.3} ms, {:.1} GFLOP/s", whole * 1e3, flops / whole / 1e9);

    let (mut queries, mut p, mut out) = (vec![0f32; w * hs], vec![0f32; s * hs], vec![0f32; s * w]);
    let mut columns = vec![0f32; 2 * hs];
    let mut parts = [const { Vec::new() }; 4];
    for _ in 0..REPEATS {
        let mut t = [0.0f64; 4];
        for image in 0..IMAGES {
            let (x, k) = (qv[image * s * row..].as_ptr(), keys[image * s * w..].as_ptr());
            let clock = Instant::now();
            for h in 0..heads {
                // SAFETY: head h's S × W query block of this image into W rows of H·S values.
                unsafe { transpose(queries[h * s..].as_mut_ptr(), hs, x.add(h * w), row, s, w) };
            }
            let after_transpose = Instant::now();
            let keys = Strided { ptr: k, row_stride: w, x_stride: 1 };
            // SAFETY (products): the engine runs on this CPU; operands are this image's blocks
            // and the buffers above, sized for them.
            unsafe { product(s, hs, w, p.as_mut_ptr(), hs, keys, queries.as_ptr(), hs, false) };
            let after_scores = Instant::now();
            softmax_columns(&mut p, hs, 0.125, &mut columns);
            let after_softmax = Instant::now();
            for h in 0..heads {
                let probs = Strided { ptr: p[h * s..].as_ptr(), row_stride: 1, x_stride: hs };
                unsafe { product(s, w, s, out.as_mut_ptr(), w, probs, x.add((heads + h) * w), row, h > 0) };
            }
            let end = Instant::now();
            for (sum, (a, b)) in t.iter_mut().zip([
                (clock, after_transpose),
                (after_transpose, after_scores),
                (after_scores, after_softmax),
                (after_softmax, end),
            ]) {
                *sum += (b - a).as_secs_f64();
            }
        }
        std::hint::black_box(&out);
        for (part, t) in parts.iter_mut().zip(t) {
            part.push(t);
        }
    }
    let [transposes, scores, softmax, outputs] = parts.map(median);
    let total = transposes + scores + softmax + outputs;
    let share = |t: f64| 100.0 * t / total;
    println!("  query transposes  {:.3} ms  {:4.1}%", transposes * 1e3, share(transposes));
    println!(
        "  score product     {:.3} ms  {:4.1}%  {:.1} GFLOP/s",
        scores * 1e3,
        share(scores),
        flops / 2.0 / scores / 1e9
    );
    println!("  column softmax    {:.3} ms  {:4.1}%", softmax * 1e3, share(softmax));
    println!(
        "  output products   {:.3} ms  {:4.1}%  {:.1} GFLOP/s",
        outputs * 1e3,
        share(outputs),
        flops / 2.0 / outputs / 1e9
    );
}
