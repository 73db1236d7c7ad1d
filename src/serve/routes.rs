//! The server's pages: `GET /` (pick a class, draw), `GET /sample` (a PNG: one image, or a grid
//! of several), `GET /health` (the model, the queue and what was served, as JSON). Every error
//! is JSON, `{"error": "…"}`: 400 for a bad request, 503 when busy, timed out or shutting down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::batcher::{Drawn, Queue, Refusal};
use super::query::{self, Bounds};
use crate::images::{FloatImage, grid};

/// Seconds a client that was turned away is asked to wait (`Retry-After`).
const RETRY_AFTER_S: &str = "1";

pub struct ServerState {
    pub queue: Arc<Queue>,
    pub bounds: Bounds,
    /// The longest a request waits for its images before a 503.
    pub timeout: Duration,
    /// Where the model came from.
    pub model: String,
    /// Channels and side of the model's images.
    pub image: (usize, usize),
    pub page: String,
    pub started: Instant,
    pub shutting_down: AtomicBool,
}

pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/sample", get(sample))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({ "error": message.into() }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn unavailable(message: String) -> Response {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
    response
}

async fn page(State(s): State<Arc<ServerState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], s.page.clone()).into_response()
}

async fn sample(State(s): State<Arc<ServerState>>, RawQuery(raw): RawQuery) -> Response {
    let request = match query::parse(raw.as_deref(), &s.bounds) {
        Ok(r) => r,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let waiting = match s.queue.submit(request) {
        Ok(w) => w,
        Err(Refusal::Busy { queued, capacity }) => {
            return unavailable(format!("busy: {queued} images are queued (at most {capacity}); retry later"));
        }
        Err(Refusal::Closed) => return unavailable("the server is shutting down".into()),
    };
    match tokio::time::timeout(s.timeout, waiting).await {
        Err(_) => unavailable(format!("timed out: no images within {:.1} s; retry later", s.timeout.as_secs_f64())),
        Ok(Err(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, "the model thread stopped"),
        Ok(Ok(Err(message))) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
        Ok(Ok(Ok(drawn))) => match png(&drawn) {
            Ok(bytes) => {
                let timing = format!(
                    "queue;dur={:.1}, draw;dur={:.1}",
                    drawn.waited.as_secs_f64() * 1e3,
                    drawn.computed.as_secs_f64() * 1e3
                );
                let headers = [
                    (header::CONTENT_TYPE, "image/png".to_string()),
                    (header::HeaderName::from_static("server-timing"), timing),
                    // How many images and requests shared the chain that drew these.
                    (header::HeaderName::from_static("x-dits-batch-images"), drawn.batch_images.to_string()),
                    (header::HeaderName::from_static("x-dits-batch-requests"), drawn.batch_requests.to_string()),
                ];
                (headers, bytes).into_response()
            }
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the PNG: {e:#}")),
        },
    }
}

/// One image as it is, several as a near-square grid (2 black pixels between them), rows
/// filled left to right in index order.
fn png(drawn: &Drawn) -> anyhow::Result<Vec<u8>> {
    match drawn.images.as_slice() {
        [one] => one.png_bytes(),
        many => {
            let columns = (many.len() as f64).sqrt().ceil() as usize;
            let rows: Vec<Vec<FloatImage>> = many.chunks(columns).map(<[FloatImage]>::to_vec).collect();
            grid(&rows, 2)?.png_bytes()
        }
    }
}

async fn health(State(s): State<Arc<ServerState>>) -> Response {
    let (queued, counters) = s.queue.snapshot();
    let status = if s.shutting_down.load(Ordering::Relaxed) { "shutting down" } else { "ok" };
    let body = json!({
        "status": status,
        "model": s.model,
        "classes": s.bounds.class_names,
        "image": { "channels": s.image.0, "size": s.image.1 },
        "limits": {
            "max_images": s.bounds.max_images,
            "max_steps": s.bounds.steps_limit(),
            "timeout_s": s.timeout.as_secs_f64(),
        },
        "queue": { "images": queued },
        "served": counters,
        "uptime_s": s.started.elapsed().as_secs_f64(),
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let path: String = uri.path().chars().take(80).collect();
    error(StatusCode::NOT_FOUND, format!("no page {path:?}: this server has /, /sample and /health"))
}

async fn not_allowed() -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served")
}
