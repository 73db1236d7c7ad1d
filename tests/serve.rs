//! `dits serve`: the API draws what `dits sample` draws, concurrent clients share model calls,
//! bad and hostile requests get answers (JSON 400s, 503s when busy or late) and never a crash,
//! a load of 200 requests from 20 clients is answered in full, SIGTERM lets the requests in
//! flight finish, and the page draws a class when a browser clicks it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::server::{Server, agent, get};
use common::{dits, fails_with, ok, train_args, write_toy_dataset};

/// A small model trained once for every test here (with a null label, so guidance works).
fn model() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &RUN.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        write_toy_dataset(&tmp.path().join("data"), 64);
        let flags = ["--steps", "6", "--batch", "8", "--threads", "2", "--seed", "3", "--depth", "1"];
        let flags = [&flags[..], &["--label-dropout", "0.1", "--no-progress", "--sample-every", "0"]].concat();
        let flags = [&flags[..], &["--no-final-samples"]].concat();
        let args = train_args("run", &flags);
        ok(&dits(&args.iter().map(String::as_str).collect::<Vec<_>>(), tmp.path()));
        let run = tmp.path().join("run");
        (tmp, run)
    })
    .1
}

/// The JSON error of a response that must have `status`.
fn json_error(url: &str, status: u16) -> String {
    let (got, headers, body) = get(url);
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(got, status, "{url}: {text}");
    assert_eq!(headers["content-type"], "application/json", "{url}");
    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}"));
    value["error"].as_str().unwrap_or_else(|| panic!("{url}: no error field: {text}")).to_string()
}

fn decode(png: &[u8]) -> image::GrayImage {
    image::load_from_memory_with_format(png, image::ImageFormat::Png).unwrap().to_luma8()
}

/// Image `k` of a grid of 28×28 images in `columns` columns, 2 pixels apart.
fn tile(grid: &image::GrayImage, columns: u32, k: u32) -> image::GrayImage {
    let (x, y) = (2 + (k % columns) * 30, 2 + (k / columns) * 30);
    image::imageops::crop_imm(grid, x, y, 28, 28).to_image()
}

#[test]
fn the_api_draws_what_dits_sample_draws_and_batches_clients_together() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sevens");
    let flags = ["--classes", "3", "--per-class", "4", "--seed", "1", "--steps", "20", "--cfg-scale", "1.5"];
    ok(&dits(
        &[
            &["sample", "--checkpoint", model().to_str().unwrap(), "--out"],
            &[out.to_str().unwrap()][..],
            &flags,
            &["--threads", "2"],
        ]
        .concat(),
        tmp.path(),
    ));
    let server = Server::start(model(), &["--max-images", "128", "--timeout", "600"]);

    // One image: the very file `dits sample` wrote.
    let (status, headers, one) = get(&server.url("/sample?class=3&n=1&seed=1&steps=20&cfg=1.5"));
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "image/png");
    assert!(headers.contains_key("server-timing"));
    assert_eq!(one, std::fs::read(out.join("3_00000.png")).unwrap());

    // Several: a 2×2 grid of those files' images, whoever else shares the model calls. A long
    // request first keeps the model busy while the next three queue, so those three are drawn
    // together in one chain.
    let slow = server.url("/sample?class=1&n=128&seed=9&steps=250&cfg=1.5");
    let clients: Vec<_> = std::iter::once(slow)
        .chain([
            server.url("/sample?class=3&n=4&seed=1&steps=20&cfg=1.5"),
            server.url("/sample?class=5&n=3&seed=2&steps=20&cfg=1.5"),
            server.url("/sample?class=3&n=2&seed=7&steps=20&cfg=1.5"),
        ])
        .enumerate()
        .map(|(k, url)| {
            std::thread::spawn(move || {
                if k > 0 {
                    std::thread::sleep(Duration::from_millis(150));
                }
                get(&url)
            })
        })
        .collect();
    let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    for (status, _, body) in &answers {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
    }
    let (_, headers, grid) = &answers[1];
    let grid = decode(grid);
    assert_eq!(grid.dimensions(), (62, 62));
    for k in 0..4 {
        let file = decode(&std::fs::read(out.join(format!("3_{k:05}.png"))).unwrap());
        assert!(tile(&grid, 2, k) == file, "image {k} of the grid differs from dits sample's");
    }
    assert_eq!(headers["x-dits-batch-images"], "9", "the three queued requests share one chain");
    assert_eq!(headers["x-dits-batch-requests"], "3");
    let health = server.health();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["served"]["served"], 5);
    assert_eq!(health["served"]["images"], 1 + 128 + 9);
    assert_eq!(health["served"]["batches"], 3);
    assert_eq!(health["classes"].as_array().unwrap().len(), 10);
}

#[test]
fn bad_requests_are_json_errors_that_name_the_problem() {
    let server = Server::start(model(), &["--max-images", "16", "--max-steps", "50"]);
    for (query, needle) in [
        ("", "\"class\" is required"),
        ("class=10", "outside the model's 10 classes"),
        ("class=seven", "unknown class"),
        ("class=1&n=17", "n must be a whole number from 1 to 16"),
        ("class=1&n=0", "n must be"),
        ("class=1&n=-1", "n must be"),
        ("class=1&n=99999999999999999999999999999", "n must be"),
        ("class=1&n=abc", "n must be"),
        ("class=1&steps=51", "steps must be a whole number from 1 to 50"),
        ("class=1&cfg=NaN", "cfg must be"),
        ("class=1&cfg=1e308", "cfg must be"),
        ("class=1&seed=-5", "seed must be"),
        ("class=1&sampler=best", "unknown sampler"),
        ("class=1&clas=2", "unknown parameter"),
        ("class=1&class=2", "given twice"),
        ("class=%ZZ&n=%", "unknown class"),
        ("&&&=&==", "unknown parameter"),
    ] {
        let error = json_error(&server.url(&format!("/sample?{query}")), 400);
        assert!(error.contains(needle), "{query:?}: {error}");
    }
    assert!(json_error(&server.url("/nothing/here"), 404).contains("/sample"));
    let (status, headers, body) = get(&server.url("/"));
    assert_eq!(status, 200);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(String::from_utf8_lossy(&body).contains("\"max_images\":16"));
    let posted = agent().post(server.url("/sample?class=1")).send("x").unwrap();
    assert_eq!(posted.status().as_u16(), 405);
    let health = server.health();
    assert_eq!(health["served"]["served"], 0, "no bad request reached the model");
}

/// What the server sends back on a raw connection after `request`, up to its closing (or a
/// 10-second silence), as text.
fn raw(addr: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn hostile_clients_get_answers_and_the_server_survives() {
    let server = Server::start(model(), &[]);
    let addr = server.addr();
    let close = "Connection: close\r\n\r\n";
    let status_of = |answer: &str| answer.split(' ').nth(1).unwrap_or("").to_string();
    // Not HTTP at all; a request line with bytes no URI may hold; a megabyte of query string;
    // invalid percent-encoding; a huge header; a header without a colon.
    for request in [
        b"HELLO THERE\r\n\r\n".to_vec(),
        [&b"GET /sample?class=\xff\x00 HTTP/1.1\r\nHost: x\r\n"[..], close.as_bytes()].concat(),
        format!("GET /sample?class=1&junk={} HTTP/1.1\r\nHost: x\r\n{close}", "a".repeat(1 << 20)).into_bytes(),
        format!("GET /sample?class=%E0%A4%A&n=%%% HTTP/1.1\r\nHost: x\r\n{close}").into_bytes(),
        format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n{close}", "b".repeat(1 << 20)).into_bytes(),
        format!("GET /health HTTP/1.1\r\nHost x\r\n{close}").into_bytes(),
    ] {
        let answer = raw(&addr, &request);
        let status = status_of(&answer);
        assert!(answer.is_empty() || status.starts_with('4'), "{:?}…: {answer:?}", &request[..20]);
    }
    // A client that leaves right after asking for a long chain: the server carries on.
    let mut gone = TcpStream::connect(&addr).unwrap();
    gone.write_all(b"GET /sample?class=2&n=64&steps=250 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    drop(gone);
    // A slow client: its request dribbles in, a byte at a time, while another client is served
    // at once; then it gets its answer too.
    let slow_addr = addr.clone();
    let slow = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(&slow_addr).unwrap();
        for b in "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".bytes() {
            stream.write_all(&[b]).unwrap();
            std::thread::sleep(Duration::from_millis(40));
        }
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    });
    std::thread::sleep(Duration::from_millis(200));
    let began = Instant::now();
    assert_eq!(server.health()["status"], "ok");
    assert!(began.elapsed() < Duration::from_secs(5), "a slow client held up another");
    assert!(slow.join().unwrap().starts_with("HTTP/1.1 200"));
    // A client that never finishes its headers is cut off (10 s), not kept forever.
    let began = Instant::now();
    let answer = raw(&addr, b"GET /health HTTP/1.1\r\nHost:");
    let waited = began.elapsed();
    assert!(answer.is_empty() || status_of(&answer) == "408", "{answer:?}");
    assert!(waited >= Duration::from_secs(8) && waited < Duration::from_secs(20), "{waited:?}");
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn a_full_queue_and_a_late_request_are_503s_with_retry_after() {
    // The queue holds one request of 4; twelve arrive at once while the model is busy.
    let server = Server::start(model(), &["--queue", "4", "--max-images", "4", "--max-batch", "4"]);
    let url = server.url("/sample?class=0&n=4&steps=250");
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || get(&url))
        })
        .collect();
    let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let busy: Vec<_> = answers.iter().filter(|(status, _, _)| *status == 503).collect();
    assert!(answers.iter().all(|(status, _, _)| *status == 200 || *status == 503));
    assert!(!busy.is_empty() && busy.len() < 12, "{} of 12 refused", busy.len());
    for (_, headers, body) in &busy {
        assert_eq!(headers["retry-after"], "1");
        let error: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert!(error["error"].as_str().unwrap().starts_with("busy"), "{error}");
    }
    let health = server.health();
    assert_eq!(health["served"]["busy"], busy.len());
    assert_eq!(health["served"]["served"], 12 - busy.len());

    let late = Server::start(model(), &["--timeout", "0.05"]);
    let error = json_error(&late.url("/sample?class=0&n=64&steps=250"), 503);
    assert!(error.starts_with("timed out"), "{error}");
}

#[test]
fn two_hundred_requests_from_twenty_clients_are_all_answered() {
    let server = Server::start(model(), &[]);
    let (clients, each) = (20usize, 10usize);
    let began = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let base = server.base.clone();
            std::thread::spawn(move || {
                let agent = agent();
                (0..each)
                    .map(|i| {
                        let n = 1 + (c + i) % 4;
                        let url = format!("{base}/sample?class={}&n={n}&seed={}&steps=10", (c + i) % 10, c * 100 + i);
                        let sent = Instant::now();
                        let mut response = agent.get(&url).call().unwrap();
                        let status = response.status().as_u16();
                        let shared: usize =
                            response.headers()["x-dits-batch-requests"].to_str().unwrap().parse().unwrap();
                        let png = response.body_mut().read_to_vec().unwrap();
                        let latency = sent.elapsed();
                        assert_eq!(status, 200);
                        let side = decode(&png).width();
                        let columns = (n as f64).sqrt().ceil() as u32;
                        assert_eq!(side, if n == 1 { 28 } else { columns * 30 + 2 });
                        (latency, n, shared)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let seconds = began.elapsed().as_secs_f64();
    assert_eq!(results.len(), clients * each, "every request answered");
    let mut latencies: Vec<f64> = results.iter().map(|r| r.0.as_secs_f64() * 1e3).collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let images: usize = results.iter().map(|r| r.1).sum();
    let health = server.health();
    assert_eq!(health["served"]["served"], clients * each);
    assert_eq!(health["served"]["images"], images);
    assert_eq!(health["served"]["busy"], 0);
    let batches = health["served"]["batches"].as_u64().unwrap();
    assert!(batches < (clients * each) as u64, "concurrent requests share chains ({batches} for 200)");
    assert!(results.iter().any(|r| r.2 > 1));
    eprintln!(
        "load: {} requests from {clients} clients, {images} images in {seconds:.2} s ({:.1} images/s, {batches} chains); \
         latency ms p50 {:.0}, p90 {:.0}, p99 {:.0}, max {:.0}",
        results.len(),
        images as f64 / seconds,
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}

#[test]
fn sigterm_answers_the_requests_in_flight_then_exits() {
    let mut server = Server::start(model(), &["--max-images", "128", "--max-steps", "500", "--timeout", "600"]);
    let url = server.url("/sample?class=4&n=128&steps=500");
    let in_flight = std::thread::spawn(move || get(&url));
    std::thread::sleep(Duration::from_millis(300));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (status, headers, _) = in_flight.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "image/png");
    let began = Instant::now();
    let exit = loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            break exit;
        }
        assert!(began.elapsed() < Duration::from_secs(30), "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    let mut rest = String::new();
    server.stdout.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("served 1 requests (128 images"), "{rest}");
    assert!(TcpStream::connect(server.addr()).is_err(), "still accepting after shutting down");
}

#[test]
fn serve_refuses_bad_setups_with_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(&dits(&["serve", "--checkpoint", "no-such-run"], dir.path()), "does not exist");
    let run = model().to_str().unwrap();
    fails_with(
        &dits(&["serve", "--checkpoint", run, "--max-images", "300"], dir.path()),
        "--max-batch (256) must hold",
    );
    fails_with(&dits(&["serve", "--checkpoint", run, "--timeout=-1"], dir.path()), "--timeout must be");
    fails_with(&dits(&["serve", "--checkpoint", run, "--timeout", "0"], dir.path()), "--timeout must be");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    fails_with(&dits(&["serve", "--checkpoint", run, "--port", &port], dir.path()), "cannot listen on 127.0.0.1:");
}

/// A WebDriver session of chromedriver on a headless Chromium.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    fn start(driver: &Path, chromium: &Path, profile: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let began = Instant::now();
        while agent().get(format!("{base}/status")).call().is_err() {
            assert!(began.elapsed() < Duration::from_secs(30), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=900,900",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = serde_json::json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let mut browser = Self { driver: child, base, session: String::new() };
        let created = browser.call("POST", "/session", Some(capabilities));
        browser.session = created["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}")).to_string();
        browser
    }

    /// A WebDriver command: its `value`.
    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        let url = if self.session.is_empty() {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let response = match method {
            "POST" => agent().post(&url).send_json(body.unwrap_or(serde_json::json!({}))),
            "DELETE" => agent().delete(&url).call(),
            _ => agent().get(&url).call(),
        };
        let value: serde_json::Value = response.unwrap().body_mut().read_json().unwrap();
        value["value"].clone()
    }

    fn script(&self, script: &str) -> serde_json::Value {
        self.call("POST", "/execute/sync", Some(serde_json::json!({ "script": script, "args": [] })))
    }

    fn click(&self, css: &str) {
        let found = self.call("POST", "/element", Some(serde_json::json!({ "using": "css selector", "value": css })));
        let id = found["element-6066-11e4-a52e-4f735466cecf"].as_str().unwrap_or_else(|| panic!("no {css}: {found}"));
        self.call("POST", &format!("/element/{id}/click"), None);
    }

    /// Wait until `script` returns true.
    fn wait_for(&self, script: &str) {
        let began = Instant::now();
        while self.script(script) != serde_json::Value::Bool(true) {
            let status = self.script("return document.getElementById('status').textContent");
            assert!(began.elapsed() < Duration::from_secs(60), "timed out waiting for {script}; status: {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = agent().delete(format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn the_page_draws_a_class_when_a_browser_clicks_it() {
    let Some((driver, chromium)) = common::chromedriver() else { return };
    let server = Server::start(model(), &[]);
    let profile = tempfile::tempdir().unwrap();
    let browser = Browser::start(&driver, &chromium, profile.path());
    let url = server.url("/");
    browser.call("POST", "/url", Some(serde_json::json!({ "url": url })));
    assert_eq!(browser.script("return document.querySelectorAll('#classes button').length"), 10);
    browser.click("#classes button[data-class='7']");
    browser.wait_for("const i = document.getElementById('result'); return !i.hidden && i.naturalWidth > 0");
    // 16 images (the page's default) in a 4×4 grid.
    assert_eq!(browser.script("return document.getElementById('result').naturalWidth"), 4 * 30 + 2);
    let status = browser.script("return document.getElementById('status').textContent");
    assert!(status.as_str().unwrap().starts_with("7: 16 images, seed 0"), "{status}");
    // The screenshot shows the grid where the page put it: black with bright strokes, on the
    // white page.
    let shot = browser.call("GET", "/screenshot", None);
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.decode(shot.as_str().unwrap()).unwrap();
    if let Some(keep) = std::env::var_os("DITS_KEEP_SCREENSHOT") {
        std::fs::write(keep, &png).unwrap();
    }
    let shot = decode(&png);
    let rect = browser.script(
        "const r = document.getElementById('result').getBoundingClientRect(); return [r.x, r.y, r.width, r.height]",
    );
    let [x, y, w, h] = [0, 1, 2, 3].map(|i| rect[i].as_f64().unwrap() as u32);
    assert!(
        w >= 400 && x + w <= shot.width() && y + h <= shot.height(),
        "grid at {rect}, screenshot {:?}",
        shot.dimensions()
    );
    let inside = image::imageops::crop_imm(&shot, x + 2, y + 2, w - 4, h - 4).to_image();
    let share = |f: &dyn Fn(u8) -> bool| inside.pixels().filter(|p| f(p.0[0])).count() as f64 / inside.len() as f64;
    let (black, bright) = (share(&|v| v < 8), share(&|v| v > 128));
    assert!(black > 0.2 && bright > 0.02, "the grid shows {black:.3} black and {bright:.3} bright");
    let page_white = shot.pixels().filter(|p| p.0[0] > 250).count() as f64 / shot.len() as f64;
    assert!(page_white > 0.3, "the page around it: {page_white:.3} white");
    // A bad setting shows the server's error on the page.
    browser.script("document.getElementById('n').value = 1000");
    browser.click("#classes button[data-class='2']");
    browser.wait_for("return document.getElementById('status').className === 'error'");
    let status = browser.script("return document.getElementById('status').textContent");
    assert!(status.as_str().unwrap().starts_with("400: n must be"), "{status}");
    // Nothing went wrong in the page's scripts (the failed fetch's 400 is logged by the browser
    // as a network error, which is the expected answer).
    let log = browser.call("POST", "/se/log", Some(serde_json::json!({ "type": "browser" })));
    let severe: Vec<_> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["level"] == "SEVERE" && !e["message"].as_str().unwrap_or("").contains("400 (Bad Request)"))
        .collect();
    assert!(severe.is_empty(), "console errors: {severe:?}");
    assert_eq!(server.health()["served"]["served"], 1);
}
