//! The server's one model and the requests waiting for it. Requests wait in a bounded queue
//! (counted in images); one worker thread takes the oldest request together with every queued
//! request that denoises the same way (steps, guidance, sampler), up to `max_batch` images, and
//! runs them as one chain: concurrent clients share model calls. Each image keeps the noise of
//! its own (seed, class, index), so a request draws the same images whoever it was batched with,
//! and the images `dits sample` draws with that seed.
//!
//! The queue is a `Mutex<VecDeque>` and a `Condvar`, not a channel: taking a batch means picking
//! the compatible requests out of the middle of the queue, which no channel offers.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::prelude::*;
use serde::Serialize;
use tokio::sync::oneshot;

use super::query::DrawRequest;
use crate::diffusion::guidance::Guided;
use crate::diffusion::sampler::{Chain, Clip, StepRule, sample_images};
use crate::images::FloatImage;
use crate::sample::LoadedModel;

/// A request's images, or the message of a 500.
pub type Reply = Result<Drawn, String>;

/// A request's images and how they were made.
#[derive(Debug)]
pub struct Drawn {
    pub images: Vec<FloatImage>,
    /// Images and requests in the chain that drew them (more than this request's when shared).
    pub batch_images: usize,
    pub batch_requests: usize,
    /// Time in the queue, and the chain's time.
    pub waited: Duration,
    pub computed: Duration,
}

/// What the server has done since it started.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Counters {
    /// Requests answered with images.
    pub served: u64,
    pub images: u64,
    /// Chains run (each a model call per step, or two with Heun).
    pub batches: u64,
    /// Requests turned away with a full queue.
    pub busy: u64,
    /// Requests whose client left (or timed out) before their turn: never computed.
    pub abandoned: u64,
    /// Requests whose chain failed.
    pub failed: u64,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    Busy { queued: usize, capacity: usize },
    Closed,
}

struct Job {
    request: DrawRequest,
    reply: oneshot::Sender<Reply>,
    since: Instant,
}

struct State {
    jobs: VecDeque<Job>,
    queued_images: usize,
    closed: bool,
    counters: Counters,
}

impl State {
    /// Forget the requests nobody waits for any more.
    fn drop_abandoned(&mut self) {
        let before = self.jobs.len();
        self.jobs.retain(|j| !j.reply.is_closed());
        self.counters.abandoned += (before - self.jobs.len()) as u64;
        self.queued_images = self.jobs.iter().map(|j| j.request.n).sum();
    }
}

pub struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    /// Images waiting, at most.
    capacity: usize,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        let state = State { jobs: VecDeque::new(), queued_images: 0, closed: false, counters: Counters::default() };
        Self { state: Mutex::new(state), ready: Condvar::new(), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queue half-changed (each change is one
        // statement), so a poisoned lock is still a good one.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `request`; its images arrive on the receiver.
    pub fn submit(&self, request: DrawRequest) -> Result<oneshot::Receiver<Reply>, Refusal> {
        let mut s = self.lock();
        if s.closed {
            return Err(Refusal::Closed);
        }
        if s.queued_images + request.n > self.capacity {
            s.drop_abandoned();
        }
        if s.queued_images + request.n > self.capacity {
            s.counters.busy += 1;
            return Err(Refusal::Busy { queued: s.queued_images, capacity: self.capacity });
        }
        let (reply, receiver) = oneshot::channel();
        s.queued_images += request.n;
        s.jobs.push_back(Job { request, reply, since: Instant::now() });
        self.ready.notify_one();
        Ok(receiver)
    }

    /// Take no more requests; the worker finishes the queued ones, then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Images waiting, and the counters.
    pub fn snapshot(&self) -> (usize, Counters) {
        let s = self.lock();
        (s.queued_images, s.counters)
    }

    /// The oldest request and the queued requests that share its chain, up to `max_images`;
    /// waits for one. None once the queue is closed and empty.
    fn take(&self, max_images: usize) -> Option<Vec<Job>> {
        let mut s = self.lock();
        loop {
            s.drop_abandoned();
            if !s.jobs.is_empty() {
                break;
            }
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        let first = s.jobs.pop_front().expect("a job");
        let chain = first.request.chain;
        let mut images = first.request.n;
        let mut batch = vec![first];
        let mut rest = VecDeque::with_capacity(s.jobs.len());
        while let Some(job) = s.jobs.pop_front() {
            if job.request.chain == chain && images + job.request.n <= max_images {
                images += job.request.n;
                batch.push(job);
            } else {
                rest.push_back(job);
            }
        }
        s.jobs = rest;
        s.queued_images -= images;
        Some(batch)
    }

    fn record(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.lock().counters);
    }
}

/// The worker: draws the queue's requests with `model` until the queue is closed and empty.
pub fn spawn(queue: Arc<Queue>, model: LoadedModel, device: Device, max_batch: usize) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("dits-serve-model".into())
        .spawn(move || {
            let prepared = model.model.prepare_inference();
            let painter = Painter { model: &model, prepared: &prepared, sigmas: model.schedule.sigmas(), device };
            while let Some(jobs) = queue.take(max_batch) {
                let began = Instant::now();
                let requests: Vec<&DrawRequest> = jobs.iter().map(|j| &j.request).collect();
                // A panic in a chain fails its requests, not the server.
                let drawn = catch_unwind(AssertUnwindSafe(|| painter.draw(&requests)))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the model panicked (see the server's log)")));
                let computed = began.elapsed();
                let batch_images = requests.iter().map(|r| r.n).sum();
                let batch_requests = jobs.len();
                match drawn {
                    Ok(mut images) => {
                        queue.record(|c| {
                            c.batches += 1;
                            c.served += batch_requests as u64;
                            c.images += batch_images as u64;
                        });
                        for job in jobs {
                            let rest = images.split_off(job.request.n);
                            let mine = std::mem::replace(&mut images, rest);
                            let waited = began.duration_since(job.since);
                            let _ = job.reply.send(Ok(Drawn {
                                images: mine,
                                batch_images,
                                batch_requests,
                                waited,
                                computed,
                            }));
                        }
                    }
                    Err(e) => {
                        tracing::error!("a batch of {batch_requests} requests failed: {e:#}");
                        queue.record(|c| c.failed += batch_requests as u64);
                        for job in jobs {
                            let _ = job.reply.send(Err(format!("drawing failed: {e:#}")));
                        }
                    }
                }
            }
        })
        .expect("spawning the model thread")
}

/// Draws requests that share a chain with one model.
struct Painter<'a> {
    model: &'a LoadedModel,
    prepared: &'a crate::model::net::Inference<'a>,
    sigmas: Vec<f64>,
    device: Device,
}

impl Painter<'_> {
    /// Every request's images, in order (request by request, index by index).
    fn draw(&self, requests: &[&DrawRequest]) -> anyhow::Result<Vec<FloatImage>> {
        let chain = requests[0].chain;
        let cfg = &self.model.config;
        let schedule = &self.model.schedule;
        let denoiser = Guided::as_sampled(self.prepared, cfg.null_label(), &self.sigmas, Some(chain.cfg), None)?;
        let rule = StepRule::of(chain.sampler, 0.0, 1.0, 0.0)?;
        let steps = Chain::trailing(schedule, chain.steps, rule, Clip::X0)?;
        // (seed, class, index) of every image.
        let images: Vec<(u64, usize, usize)> =
            requests.iter().flat_map(|r| (0..r.n).map(move |i| (r.seed, r.class, i))).collect();
        sample_images(
            &denoiser,
            schedule,
            &steps,
            &images,
            [cfg.channels, cfg.image_size, cfg.image_size],
            &self.device,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::SamplerKind;
    use crate::serve::query::Chain as Recipe;

    fn request(n: usize, steps: usize) -> DrawRequest {
        DrawRequest { class: 0, n, seed: 0, chain: Recipe { steps, cfg: 1.0, sampler: SamplerKind::Euler } }
    }

    #[test]
    fn a_batch_takes_every_compatible_request_in_order_up_to_its_size() {
        let q = Queue::new(100);
        let _r: Vec<_> = [(3, 20), (5, 10), (4, 20), (9, 20), (2, 20)]
            .iter()
            .map(|&(n, steps)| q.submit(request(n, steps)).unwrap())
            .collect();
        assert_eq!(q.snapshot().0, 23);
        let sizes = |b: Vec<Job>| b.iter().map(|j| j.request.n).collect::<Vec<_>>();
        // 3 + 4 + 2 (9 would pass 10); the 10-step request waits for its own batch.
        assert_eq!(sizes(q.take(10).unwrap()), vec![3, 4, 2]);
        assert_eq!(sizes(q.take(10).unwrap()), vec![5]);
        assert_eq!(sizes(q.take(10).unwrap()), vec![9]);
        assert_eq!(q.snapshot().0, 0);
        q.close();
        assert!(q.take(10).is_none());
        assert_eq!(q.submit(request(1, 20)).unwrap_err(), Refusal::Closed);
    }

    #[test]
    fn a_full_queue_refuses_and_forgets_clients_that_left() {
        let q = Queue::new(8);
        let kept = q.submit(request(5, 20)).unwrap();
        assert_eq!(q.submit(request(4, 20)).unwrap_err(), Refusal::Busy { queued: 5, capacity: 8 });
        let left = q.submit(request(3, 20)).unwrap();
        drop(left);
        // The 3 images of the client that left no longer count.
        let _r = q.submit(request(3, 20)).unwrap();
        let (queued, counters) = q.snapshot();
        assert_eq!((queued, counters.busy, counters.abandoned), (8, 1, 1));
        drop(kept);
        assert_eq!(q.take(100).unwrap().len(), 1);
    }
}
