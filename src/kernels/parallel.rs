//! Megatron-LM's two conjugate operators over a tensor-parallel group, as differentiable
//! operations of the kernel extension: `f` (identity forward, all-reduce of the gradient
//! backward) at the input of a column-parallel layer, `g` (all-reduce forward, identity
//! backward) after the partial output of a row-parallel one. Between them each rank computes
//! its own heads and MLP columns; around them everything is the same on every rank.

use std::sync::Arc;

use burn::backend::Dispatch;
use burn::backend::flex::FlexTensor;
use burn::prelude::*;

use super::flex::{contiguous, flex_tensor};
use super::ops::on_flex;
use super::{Activation, DitKernels, fused_linear, linear_act};
use crate::collective::Collective;

/// Which of the two operators, i.e. in which pass the all-reduce runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceIn {
    /// `g`: the forward pass sums the ranks' partial outputs.
    Forward,
    /// `f`: the backward pass sums the ranks' partial input gradients.
    Backward,
}

/// A sum over the ranks of a tensor-parallel group.
#[derive(Clone)]
pub struct GroupSum {
    pub comm: Arc<dyn Collective>,
    pub pass: ReduceIn,
}

impl std::fmt::Debug for GroupSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupSum({:?} over {} ranks)", self.pass, self.comm.size())
    }
}

impl super::Adjoint for GroupSum {
    fn forward(&self, x: &FlexTensor) -> FlexTensor {
        match self.pass {
            ReduceIn::Forward => self.sum(x),
            ReduceIn::Backward => x.clone(),
        }
    }

    fn backward(&self, grad: &FlexTensor) -> FlexTensor {
        match self.pass {
            ReduceIn::Forward => grad.clone(),
            ReduceIn::Backward => self.sum(grad),
        }
    }
}

impl GroupSum {
    /// The all-reduce of `x` over the group, as a new tensor.
    fn sum(&self, x: &FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let mut data = x.storage::<f32>().to_vec();
        self.comm.all_reduce_sum(&mut data);
        flex_tensor(data, x.layout().shape().to_vec())
    }
}

/// The tensor-parallel group a model's blocks are split over: one rank (no split) or the
/// ranks of a [`Collective`].
#[derive(Clone, Default)]
pub struct TensorParallel {
    comm: Option<Arc<dyn Collective>>,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorParallel(rank {} of {})", self.rank(), self.size())
    }
}

impl TensorParallel {
    /// No split: every operator is the identity.
    pub fn single() -> Self {
        Self { comm: None }
    }

    /// Split over the ranks of `comm` (a group of one is no split).
    pub fn over(comm: Arc<dyn Collective>) -> Self {
        Self { comm: (comm.size() > 1).then_some(comm) }
    }

    pub fn size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.size())
    }

    pub fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    /// The group's collective, when it has more than one rank.
    pub fn comm(&self) -> Option<&Arc<dyn Collective>> {
        self.comm.as_ref()
    }

    /// Megatron's `f`, before a column-parallel layer: `x` itself, whose gradient is summed
    /// over the group.
    pub fn enter<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.group_sum(x, ReduceIn::Backward)
    }

    /// Megatron's `g`, after a row-parallel layer: the sum of the ranks' partial outputs `x`,
    /// whose gradient passes unchanged.
    pub fn reduce<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.group_sum(x, ReduceIn::Forward)
    }

    /// A row-parallel Linear (Megatron's `RowParallelLinear`): this rank's rows of the weight
    /// times its share `x` of the input, summed over the group, then the bias (whole on every
    /// rank). On one rank, the Linear itself.
    pub fn row_linear<const D: usize>(&self, layer: &burn::nn::Linear, x: Tensor<D>) -> Tensor<D> {
        if self.comm.is_none() {
            return linear_act(layer, x, Activation::Identity);
        }
        let weight = layer.weight.val();
        let zeros = Tensor::zeros([weight.dims()[1]], &weight.device());
        let sum = self.reduce(fused_linear(x, weight, zeros, Activation::Identity));
        match &layer.bias {
            Some(b) => sum + b.val().unsqueeze(),
            None => sum,
        }
    }

    fn group_sum<const D: usize>(&self, x: Tensor<D>, pass: ReduceIn) -> Tensor<D> {
        let Some(comm) = &self.comm else { return x };
        assert!(
            on_flex(&x.device()) && x.dtype() == burn::tensor::DType::F32,
            "tensor parallelism runs on the CPU backend, in f32"
        );
        let op = GroupSum { comm: comm.clone(), pass };
        Tensor::from_dispatch(<Dispatch as DitKernels>::group_sum(x.into_dispatch(), op))
    }
}
