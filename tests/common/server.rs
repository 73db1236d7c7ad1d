//! A `dits serve` process for the tests, and an HTTP client to ask it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

/// A `dits serve` on a free port of the loopback address, stopped when dropped.
pub struct Server {
    pub child: Child,
    pub stdout: BufReader<ChildStdout>,
    pub base: String,
}

impl Server {
    pub fn start(checkpoint: &Path, flags: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dits"))
            .args(["serve", "--checkpoint"])
            .arg(checkpoint)
            .args(["--port", "0", "--threads", "2"])
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting dits serve");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let start = line.find("http://").unwrap_or_else(|| panic!("no address in {line:?}"));
        let base = line[start..].split('/').take(3).collect::<Vec<_>>().join("/");
        Self { child, stdout, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    pub fn health(&self) -> serde_json::Value {
        let (status, _, body) = get(&self.url("/health"));
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

/// Status, headers and body of `GET url`.
pub fn get(url: &str) -> (u16, axum::http::HeaderMap, Vec<u8>) {
    let mut response = agent().get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let body = response.body_mut().with_config().limit(64 << 20).read_to_vec().unwrap();
    (response.status().as_u16(), response.headers().clone(), body)
}
