//! The model's parameters as one flat f32 vector, in a fixed order with names and shapes.
//!
//! The optimizer, checkpoints, the gradient all-reduce and ZeRO-1 sharding all work on
//! this flat view: one contiguous buffer per quantity (weights, gradients, Adam moments)
//! instead of one small tensor per parameter.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{DType, Gradients};
use serde::{Deserialize, Serialize};

/// One parameter's place in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSlot {
    /// burn module path, e.g. `dits.0.wq.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl ParamSlot {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The layout of a module's float parameters, in visiting order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamTable {
    pub slots: Vec<ParamSlot>,
    pub total: usize,
}

impl ParamTable {
    pub fn of<M: Module>(module: &M) -> Self {
        let mut v = Collect { path: Vec::new(), slots: Vec::new(), total: 0, values: None, grads: None };
        module.visit(&mut v);
        Self { slots: v.slots, total: v.total }
    }

    /// All parameter values, concatenated.
    pub fn read_values<M: Module>(&self, module: &M) -> Vec<f32> {
        let mut v = Collect {
            path: Vec::new(),
            slots: Vec::new(),
            total: 0,
            values: Some(Vec::with_capacity(self.total)),
            grads: None,
        };
        module.visit(&mut v);
        v.values.unwrap()
    }

    /// All gradients in `grads`, concatenated (zeros for a parameter without one).
    pub fn read_grads<M: Module>(&self, module: &M, grads: &Gradients) -> Vec<f32> {
        let mut v = Collect {
            path: Vec::new(),
            slots: Vec::new(),
            total: 0,
            values: Some(Vec::with_capacity(self.total)),
            grads: Some(grads),
        };
        module.visit(&mut v);
        v.values.unwrap()
    }

    /// Replace every parameter of `module` by its slice of `flat`.
    pub fn write_values<M: Module>(&self, module: M, flat: &[f32]) -> M {
        self.write_values_as(module, flat, DType::F32)
    }

    /// [`Self::write_values`] with the parameters stored as `dtype` (the low-precision copy a
    /// mixed-precision step computes with; each a leaf of its own for autodiff).
    pub fn write_values_as<M: Module>(&self, module: M, flat: &[f32], dtype: DType) -> M {
        assert_eq!(flat.len(), self.total, "flat parameter vector of the wrong length");
        module.map(&mut Write { table: self, flat, next: 0, dtype })
    }
}

struct Collect<'a> {
    path: Vec<String>,
    slots: Vec<ParamSlot>,
    total: usize,
    values: Option<Vec<f32>>,
    grads: Option<&'a Gradients>,
}

impl ModuleVisitor for Collect<'_> {
    // The variant of an enum module ([`crate::model::DitNet`]) is not part of a parameter's
    // name: names stay those of the family, as in the weight files.
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.path.pop();
        }
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let len: usize = shape.iter().product();
        if let Some(values) = self.values.as_mut() {
            let data = match self.grads {
                Some(grads) => tensor.grad(grads).map(|g| g.into_data()),
                None => Some(tensor.into_data()),
            };
            match data {
                // One copy where the data is f32 already; `iter` converts element by element
                // through a boxed iterator (a few ms per step for mnist-dits's gradients).
                Some(d) => match d.as_slice::<f32>() {
                    Ok(floats) => values.extend_from_slice(floats),
                    Err(_) => values.extend(d.iter::<f32>()),
                },
                None => values.extend(std::iter::repeat_n(0.0, len)),
            }
        } else {
            self.slots.push(ParamSlot { name: self.path.join("."), shape, offset: self.total });
        }
        self.total += len;
    }
}

struct Write<'a> {
    table: &'a ParamTable,
    flat: &'a [f32],
    next: usize,
    dtype: DType,
}

impl ModuleMapper for Write<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let slot = &self.table.slots[self.next];
        self.next += 1;
        let (id, old, mapper) = param.consume();
        let device = old.device();
        let data = TensorData::new(self.flat[slot.range()].to_vec(), slot.shape.clone());
        let mut new = Tensor::<D>::from_data(data, &device);
        if self.dtype != DType::F32 {
            // Cast outside the autodiff graph: the copy is a leaf, its gradient in `dtype`.
            new = Tensor::from_inner(new.inner().cast(self.dtype));
        }
        let new = new.set_require_grad(old.is_require_grad());
        Param::from_mapped_value(id, new, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};

    #[derive(Module, Debug)]
    struct Two {
        a: Linear,
        b: Vec<Linear>,
    }

    #[test]
    fn flat_view_round_trips_with_names_in_order() {
        let device = Device::flex();
        let m = crate::rng::with_device_seed(&device, 0, || Two {
            a: LinearConfig::new(2, 3).init(&device),
            b: vec![LinearConfig::new(3, 1).init(&device)],
        });
        let table = ParamTable::of(&m);
        let names: Vec<&str> = table.slots.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["a.weight", "a.bias", "b.0.weight", "b.0.bias"]);
        assert_eq!(table.total, 6 + 3 + 3 + 1);
        let flat: Vec<f32> = (0..table.total).map(|i| i as f32).collect();
        let m = table.write_values(m, &flat);
        assert_eq!(table.read_values(&m), flat);
        assert_eq!(m.a.bias.as_ref().unwrap().val().into_data().try_to_vec::<f32>().unwrap(), vec![6.0, 7.0, 8.0]);
    }

    /// A low-precision copy of both families computes in its type, its gradients are leaves
    /// (read back as f32) and close to the fp32 ones.
    #[test]
    fn low_precision_copies_compute_in_their_type_with_close_gradients() {
        use crate::model::{DitConfig, DitNet};
        for cfg in [DitConfig::mnist_dits(), DitConfig::preset("dit-s4").unwrap()] {
            let device = Device::flex().autodiff();
            let model = DitNet::new(&cfg, &device, 1);
            let (table, b) = (ParamTable::of(&model), 2);
            let mut flat = table.read_values(&model);
            // DiT zero-initialises its final layer, whose output (and most gradients) are then 0.
            flat.iter_mut().enumerate().for_each(|(i, v)| *v += 0.01 * ((i % 7) as f32 - 3.0));
            let x: Vec<f32> = (0..b * 784).map(|i| ((i * 37 % 200) as f32 / 100.0) - 1.0).collect();
            let grad_in = |dtype: DType| {
                let m = table.write_values_as(model.clone(), &flat, dtype);
                let x = Tensor::<4>::from_data(TensorData::new(x.clone(), [b, 1, 28, 28]), &device).cast(dtype);
                let t = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 500], [b]), &device);
                let y = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 2], [b]), &device);
                let out = m.forward(x, t, y);
                assert_eq!(out.dtype(), dtype);
                let grads = out.cast(DType::F32).square().mean().backward();
                table.read_grads(&m, &grads)
            };
            let reference = grad_in(DType::F32);
            let norm = |g: &[f32]| g.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(norm(&reference) > 0.0);
            for dtype in [DType::BF16, DType::F16] {
                let g = grad_in(dtype);
                let diff: Vec<f32> = g.iter().zip(&reference).map(|(a, b)| a - b).collect();
                let rel = norm(&diff) / norm(&reference);
                assert!(rel > 0.0 && rel < 0.05, "{:?} {dtype:?}: relative gradient error {rel}", cfg.family);
            }
        }
    }
}
