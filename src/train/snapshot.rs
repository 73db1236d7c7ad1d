//! Rank 0's trainer sent to every rank when a multi-rank run starts: a byte format of its own,
//! since the other ranks may not see rank 0's files. A tag byte; then the state as JSON, Adam's
//! step, and the weights, their moving average and Adam's moments as little-endian f32
//! vectors, each after its length; or, when rank 0 could not start the run, its error.

use anyhow::{Context, bail, ensure};
use burn::prelude::*;

use super::params::ParamTable;
use super::state::RunState;
use super::step::Trainer;
use crate::collective::Collective;
use crate::model::DitNet;
use crate::optim::AdamState;

/// The first byte of a trainer snapshot.
const TRAINER: u8 = 1;
/// The first byte of rank 0's error message.
const FAILED: u8 = 0;

impl Trainer {
    /// Rank 0's trainer on every rank: rank 0 passes its own (or the error that kept it from
    /// building one), the others receive its state, weights and optimizer state, or its error,
    /// so that every rank reports why a run could not start. A world of one returns `lead` as
    /// it is.
    pub fn broadcast_from_lead(
        lead: Option<anyhow::Result<Self>>,
        comm: &dyn Collective,
        device: &Device,
    ) -> anyhow::Result<Self> {
        if comm.size() == 1 {
            return lead.expect("rank 0 builds the trainer");
        }
        let failed = |e: &anyhow::Error| [&[FAILED][..], format!("{e:#}").as_bytes()].concat();
        let lead = lead.map(|t| t.and_then(|t| t.snapshot().map(|bytes| (t, bytes))));
        let (lead, mut bytes) = match lead {
            None => (None, Vec::new()),
            Some(Ok((trainer, bytes))) => (Some(Ok(trainer)), bytes),
            Some(Err(e)) => {
                let bytes = failed(&e);
                (Some(Err(e)), bytes)
            }
        };
        comm.broadcast_bytes(&mut bytes);
        match (lead, bytes.split_first()) {
            (Some(result), _) => result,
            (None, Some((&FAILED, message))) => bail!("{}", String::from_utf8_lossy(message)),
            (None, _) => Self::from_snapshot(&bytes, device),
        }
    }

    /// State, weights, moving average and optimizer state as bytes (the format above).
    fn snapshot(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = vec![TRAINER];
        let json = serde_json::to_vec(&self.state)?;
        out.extend((json.len() as u64).to_le_bytes());
        out.extend(json);
        out.extend(self.adam.step.to_le_bytes());
        for v in [&self.params, &self.ema, &self.adam.m, &self.adam.v] {
            out.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Ok(out)
    }

    fn from_snapshot(bytes: &[u8], device: &Device) -> anyhow::Result<Self> {
        ensure!(bytes.first() == Some(&TRAINER), "not a trainer snapshot from rank 0");
        let mut at = 1;
        let mut take = |n: usize| -> anyhow::Result<&[u8]> {
            let s = bytes.get(at..at + n).context("truncated trainer snapshot from rank 0")?;
            at += n;
            Ok(s)
        };
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let json_len = u64_of(take(8)?) as usize;
        let state: RunState = serde_json::from_slice(take(json_len)?)?;
        let adam_step = u64_of(take(8)?);
        let mut vector = || -> anyhow::Result<Vec<f32>> {
            let n = u64_of(take(8)?) as usize;
            Ok(take(4 * n)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
        };
        let (params, ema, m, v) = (vector()?, vector()?, vector()?, vector()?);
        let device = device.clone().autodiff();
        let model = DitNet::new(&state.model, &device, 0);
        let table = ParamTable::of(&model);
        ensure!(table == state.params && params.len() == table.total, "trainer snapshot: parameter layout mismatch");
        let model = table.write_values(model, &params);
        let adam = AdamState { m, v, step: adam_step };
        Ok(Self::assemble(device, model, table, params, adam, ema, state))
    }
}
