//! Ranks as threads of one process, one device each: several GPUs of one machine
//! (`--dist devices`), or CPU threads for testing the same code paths without MPI.
//!
//! The small collectives (broadcasts, gathers, the ZeRO-1 and Ulysses exchanges) meet in shared
//! memory. With `on_devices`, the gradient all-reduce runs on the devices through burn's
//! collective all-reduce, which on CUDA is NCCL's; otherwise in shared memory too, summed in
//! rank order (so a threaded run reproduces a one-process run bit for bit, as MPI does).

use std::sync::{Arc, Barrier, Mutex};

use burn::prelude::*;
use burn::tensor::distributed::{DistributedConfig, DistributedContext, ReduceOperation, all_reduce};

use super::{Collective, CommStats, StatsRecorder};

/// What the ranks of one process share.
struct Shared {
    size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
    bytes: Mutex<Vec<u8>>,
}

/// One rank of an in-process world.
pub struct DeviceWorld {
    rank: usize,
    shared: Arc<Shared>,
    devices: Vec<Device>,
    on_devices: Option<Arc<DistributedContext>>,
    stats: StatsRecorder,
}

impl DeviceWorld {
    /// One rank per device (rank `i` on `devices[i]`). With `on_devices`, gradients are summed
    /// by burn's collective all-reduce on the devices (a backend that implements it: CUDA/NCCL).
    pub fn world(devices: Vec<Device>, on_devices: bool) -> Vec<DeviceWorld> {
        let size = devices.len();
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
            bytes: Mutex::new(Vec::new()),
        });
        let context = on_devices.then(|| {
            Arc::new(DistributedContext::init(
                devices.clone(),
                DistributedConfig { all_reduce_op: ReduceOperation::Sum },
            ))
        });
        (0..size)
            .map(|rank| DeviceWorld {
                rank,
                shared: shared.clone(),
                devices: devices.clone(),
                on_devices: context.clone(),
                stats: StatsRecorder::default(),
            })
            .collect()
    }

    /// This rank's device.
    pub fn device(&self) -> &Device {
        &self.devices[self.rank]
    }

    /// Every rank posts `mine`; once all have, `read` sees all posts (in rank order); no rank
    /// posts again before all have read.
    fn exchange<T>(&self, mine: Vec<f32>, read: impl FnOnce(&[Vec<f32>]) -> T) -> T {
        let bytes = 4 * mine.len();
        self.stats.record(bytes, || {
            self.shared.slots.lock().unwrap_or_else(|p| p.into_inner())[self.rank] = mine;
            self.shared.barrier.wait();
            let out = read(&self.shared.slots.lock().unwrap_or_else(|p| p.into_inner()));
            self.shared.barrier.wait();
            out
        })
    }
}

impl Collective for DeviceWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        if self.on_devices.is_some() {
            let device = self.device();
            self.stats.record(4 * buf.len(), || {
                let t = Tensor::<1>::from_data(TensorData::new(buf.to_vec(), [buf.len()]), device);
                let summed = all_reduce(t, ReduceOperation::Sum, self.devices.clone()).resolve();
                let values = summed.into_data().try_into_vec::<f32>().expect("an f32 tensor");
                buf.copy_from_slice(&values);
            });
            return;
        }
        self.exchange(buf.to_vec(), |all| {
            buf.fill(0.0);
            for other in all {
                buf.iter_mut().zip(other).for_each(|(b, &v)| *b += v);
            }
        });
    }

    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) {
        let block = recv.len();
        assert_eq!(send.len(), block * self.size(), "reduce-scatter: send must hold one block per rank");
        let at = self.rank * block;
        self.exchange(send.to_vec(), |all| {
            recv.fill(0.0);
            for other in all {
                recv.iter_mut().zip(&other[at..at + block]).for_each(|(r, &v)| *r += v);
            }
        });
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32]) {
        assert_eq!(recv.len(), send.len() * self.size(), "all-gather: recv must hold one block per rank");
        self.exchange(send.to_vec(), |all| {
            for (dst, src) in recv.chunks_exact_mut(send.len().max(1)).zip(all) {
                dst.copy_from_slice(src);
            }
        });
    }

    fn gather_to_root(&self, send: &[f32]) -> Option<Vec<f32>> {
        let lead = self.rank == 0;
        self.exchange(send.to_vec(), |all| lead.then(|| all.concat()))
    }

    fn broadcast(&self, buf: &mut [f32]) {
        let mine = if self.rank == 0 { buf.to_vec() } else { Vec::new() };
        self.exchange(mine, |all| buf.copy_from_slice(&all[0]));
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        let sent = if self.rank == 0 { bytes.len() } else { 0 };
        self.stats.record(sent, || {
            if self.rank == 0 {
                *self.shared.bytes.lock().unwrap_or_else(|p| p.into_inner()) = bytes.clone();
            }
            self.shared.barrier.wait();
            if self.rank != 0 {
                *bytes = self.shared.bytes.lock().unwrap_or_else(|p| p.into_inner()).clone();
            }
            self.shared.barrier.wait();
        });
    }

    fn all_to_all(&self, send: &[f32], recv: &mut [f32]) {
        assert_eq!(send.len(), recv.len(), "all-to-all: send and recv differ in length");
        let block = send.len() / self.size();
        let at = self.rank * block;
        self.exchange(send.to_vec(), |all| {
            for (dst, src) in recv.chunks_exact_mut(block.max(1)).zip(all) {
                dst.copy_from_slice(&src[at..at + block]);
            }
        });
    }

    fn abort(&self, code: i32) -> ! {
        // The other ranks are threads of this process, possibly waiting at a barrier.
        std::process::exit(code)
    }

    fn stats(&self) -> CommStats {
        self.stats.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every collective on three CPU ranks against its definition.
    #[test]
    fn collectives_on_three_threads() {
        let world = DeviceWorld::world(vec![Device::flex(); 3], false);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = world
                .iter()
                .map(|w| {
                    s.spawn(move || {
                        let r = w.rank() as f32;
                        let mut sum = vec![r, 10.0 * r];
                        w.all_reduce_sum(&mut sum);
                        let mut part = [0f32; 2];
                        w.reduce_scatter_sum(&[r, r, 1.0, 1.0, 2.0 * r, 0.0], &mut part);
                        let mut gathered = [0f32; 3];
                        w.all_gather(&[r], &mut gathered);
                        let mut b = vec![r + 5.0];
                        w.broadcast(&mut b);
                        let mut bytes = if w.rank() == 0 { b"hi".to_vec() } else { Vec::new() };
                        w.broadcast_bytes(&mut bytes);
                        let mut a2a = [0f32; 3];
                        w.all_to_all(&[10.0 * r, 10.0 * r + 1.0, 10.0 * r + 2.0], &mut a2a);
                        let root = w.gather_to_root(&[r]);
                        (sum, part, gathered, b, bytes, a2a, root)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (sum, part, gathered, b, bytes, a2a, root)) in results.into_iter().enumerate() {
            let r = rank as f32;
            assert_eq!(sum, vec![3.0, 30.0]);
            let want_part = [[3.0, 3.0], [3.0, 3.0], [6.0, 0.0]][rank];
            assert_eq!(part, want_part);
            assert_eq!(gathered, [0.0, 1.0, 2.0]);
            assert_eq!(b, vec![5.0]);
            assert_eq!(bytes, b"hi");
            assert_eq!(a2a, [r, 10.0 + r, 20.0 + r]);
            assert_eq!(root, (rank == 0).then(|| vec![0.0, 1.0, 2.0]));
        }
    }
}
