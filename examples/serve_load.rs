//! A bounded load on a running `dits serve`: CLIENTS threads send REQUESTS requests in all, each
//! for n images of a class (n cycling 1..=MAX_N), and the run prints what came back: status
//! counts, latency percentiles, images/s, and how many requests shared a chain.
//!
//!     cargo run --release --example serve_load -- http://127.0.0.1:8000 [--clients 20]
//!         [--requests 200] [--max-n 4] [--steps 20]
//!
//! `bench/serve_load.sh` starts the server, runs this and stops it.

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(base) = args.first().cloned() else {
        eprintln!("error: usage: serve_load URL [--clients N] [--requests N] [--max-n N] [--steps N]");
        std::process::exit(2);
    };
    let option = |name: &str, default: usize| -> usize {
        match args.iter().position(|a| a == name) {
            None => default,
            Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("error: {name} needs a whole number");
                std::process::exit(2)
            }),
        }
    };
    let (clients, requests) = (option("--clients", 20).max(1), option("--requests", 200));
    let (max_n, steps) = (option("--max-n", 4).max(1), option("--steps", 20));
    let base = base.trim_end_matches('/').to_string();
    let began = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let base = base.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(300)))
                    .build()
                    .into();
                // Client c sends requests c, c + clients, c + 2·clients, …
                (c..requests)
                    .step_by(clients)
                    .map(|r| {
                        let n = 1 + r % max_n;
                        let url = format!("{base}/sample?class={}&n={n}&seed={r}&steps={steps}", r % 10);
                        let sent = Instant::now();
                        match agent.get(&url).call() {
                            Ok(mut response) => {
                                let shared = response
                                    .headers()
                                    .get("x-dits-batch-requests")
                                    .and_then(|v| v.to_str().ok()?.parse().ok())
                                    .unwrap_or(0usize);
                                let status = response.status().as_u16();
                                let ok = response.body_mut().read_to_vec().is_ok();
                                (Some(status).filter(|_| ok), sent.elapsed(), n, shared)
                            }
                            Err(_) => (None, sent.elapsed(), n, 0),
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().flat_map(|t| t.join().expect("a client thread")).collect();
    let seconds = began.elapsed().as_secs_f64();
    let answered: Vec<_> = results.iter().filter(|r| r.0 == Some(200)).collect();
    let mut latencies: Vec<f64> = answered.iter().map(|r| r.1.as_secs_f64() * 1e3).collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies.get(((latencies.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    let images: usize = answered.iter().map(|r| r.2).sum();
    let shared = answered.iter().filter(|r| r.3 > 1).count();
    let mut statuses: Vec<String> = Vec::new();
    for code in [Some(200), Some(400), Some(503), None] {
        let count = results.iter().filter(|r| r.0 == code).count();
        let name = code.map_or("no answer".to_string(), |c| c.to_string());
        if count > 0 || code == Some(200) {
            statuses.push(format!("{name}: {count}"));
        }
    }
    let other = results.iter().filter(|r| !matches!(r.0, Some(200 | 400 | 503) | None)).count();
    if other > 0 {
        statuses.push(format!("other: {other}"));
    }
    println!("requests: {} sent by {clients} clients, {} ({})", results.len(), answered.len(), statuses.join(", "));
    println!(
        "images: {images} in {seconds:.2} s, {:.1} images/s, {:.1} requests/s; {shared} of {} requests shared a chain",
        images as f64 / seconds,
        answered.len() as f64 / seconds,
        answered.len()
    );
    println!(
        "latency ms: p50 {:.0}, p90 {:.0}, p99 {:.0}, max {:.0} (n = 1..={max_n} images, {steps} steps)",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
    if answered.len() != results.len() {
        std::process::exit(1);
    }
}
