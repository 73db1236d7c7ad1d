//! Golden numerics: both model families against their PyTorch originals, mnist-dits
//! (`tests/fixtures/make_golden.py`, the reference in ../shared/bench) and the DiT paper's
//! (`tests/fixtures/make_golden_dit.py`, facebookresearch/DiT `models.py`). The reference
//! weights are loaded from the `.pth` each script saved, which also exercises the PyTorch
//! interop.

use std::collections::HashMap;
use std::path::PathBuf;

use burn::prelude::*;
use dits::model::{DitConfig, DitNet, weights};
use dits::train::LossKind;
use dits::train::params::ParamTable;
use dits::train::step::noise_loss;
use safetensors::SafeTensors;

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

struct Golden {
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    i64s: HashMap<String, Vec<i64>>,
}

/// One family's fixture: its files, the config it was made with, its loss.
struct Reference {
    stem: &'static str,
    config: DitConfig,
    loss: LossKind,
}

fn mnist_dits() -> Reference {
    Reference { stem: "golden_mnist_dits", config: DitConfig::mnist_dits(), loss: LossKind::L1 }
}

fn paper_dit() -> Reference {
    // make_golden_dit.py: 28×28×1, patch 4, width 64 = 4 heads × 16, depth 2, null label.
    let config = DitConfig { depth: 2, heads: 4, ..DitConfig::dit(4, 2, 4, 16) };
    Reference { stem: "golden_dit", config, loss: LossKind::Mse }
}

fn read_golden(r: &Reference) -> Golden {
    let bytes = std::fs::read(fixture(&format!("{}.safetensors", r.stem))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut g = Golden { f32s: HashMap::new(), i64s: HashMap::new() };
    for (name, view) in st.tensors() {
        match view.dtype() {
            safetensors::Dtype::F32 => {
                let v = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                g.f32s.insert(name, (view.shape().to_vec(), v));
            }
            safetensors::Dtype::I64 => {
                let v = view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                g.i64s.insert(name, v);
            }
            other => panic!("unexpected dtype {other:?}"),
        }
    }
    g
}

fn tensor4(g: &Golden, name: &str, device: &Device) -> Tensor<4> {
    let (shape, v) = &g.f32s[name];
    Tensor::from_data(TensorData::new(v.clone(), [shape[0], shape[1], shape[2], shape[3]]), device)
}

fn ints(g: &Golden, name: &str, device: &Device) -> Tensor<1, Int> {
    let v = &g.i64s[name];
    Tensor::from_data(TensorData::new(v.clone(), [v.len()]), device)
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut worst, mut at) = (0f32, 0);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let err = (a - b).abs() / b.abs().max(1.0);
        if err > worst {
            (worst, at) = (err, i);
        }
    }
    assert!(worst <= TOL, "{what}: error {worst:e} at {at} (got {}, want {})", got[at], want[at]);
}

fn reference_model(r: &Reference, device: &Device) -> DitNet {
    let mut model = DitNet::new(&r.config, device, 0);
    weights::load_pytorch(&mut model, &fixture(&format!("{}.pth", r.stem))).unwrap();
    model
}

/// The model input and the loss target under each fixture's names.
fn input_and_target(r: &Reference) -> (&'static str, &'static str) {
    if r.stem == "golden_dit" { ("x", "target") } else { ("xt", "eps") }
}

#[test]
fn forward_matches_pytorch() {
    for r in [mnist_dits(), paper_dit()] {
        let device = Device::flex();
        let g = read_golden(&r);
        let model = reference_model(&r, &device);
        let (input, _) = input_and_target(&r);
        let out = model.forward(tensor4(&g, input, &device), ints(&g, "t", &device), ints(&g, "y", &device));
        assert_close(
            &format!("{} forward", r.stem),
            &out.into_data().iter::<f32>().collect::<Vec<_>>(),
            &g.f32s["out"].1,
        );
    }
}

#[test]
fn noising_matches_pytorch() {
    let g = read_golden(&mnist_dits());
    let schedule = dits::diffusion::NoiseSchedule::ddpm();
    let t: Vec<usize> = g.i64s["t"].iter().map(|&v| v as usize).collect();
    let mut xt = vec![0f32; g.f32s["x0"].1.len()];
    schedule.add_noise(&g.f32s["x0"].1, &t, &g.f32s["eps"].1, &mut xt);
    assert_close("x_t", &xt, &g.f32s["xt"].1);
}

#[test]
fn loss_and_every_gradient_match_pytorch() {
    for r in [mnist_dits(), paper_dit()] {
        check_gradients(&r);
    }
}

fn check_gradients(r: &Reference) {
    let device = Device::flex().autodiff();
    let g = read_golden(r);
    let model = reference_model(r, &device);
    let (input, target) = input_and_target(r);
    let loss = noise_loss(
        &model,
        tensor4(&g, input, &device),
        ints(&g, "t", &device),
        ints(&g, "y", &device),
        tensor4(&g, target, &device),
        r.loss,
    );
    assert_close("loss", &loss.to_data().iter::<f32>().collect::<Vec<_>>(), &g.f32s["loss"].1);
    let grads = loss.backward();

    // Route the gradients through the production export path (names, Linear transposes).
    let table = ParamTable::of(&model);
    let flat = table.read_grads(&model, &grads);
    let as_model = table.write_values(model, &flat);
    let bytes = weights::to_safetensors_bytes(&as_model).unwrap();
    let ours = SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for (name, view) in ours.tensors() {
        let (shape, want) = &g.f32s[&format!("grad.{name}")];
        assert_eq!(view.shape(), shape.as_slice(), "{name}: shape");
        let got: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_close(&format!("{} grad {name}", r.stem), &got, want);
        checked += 1;
    }
    assert_eq!(checked, g.f32s.keys().filter(|k| k.starts_with("grad.")).count(), "every parameter compared");
}

#[test]
fn our_safetensors_use_the_pytorch_state_dict_names() {
    for r in [mnist_dits(), paper_dit()] {
        check_names(&r);
    }
}

fn check_names(r: &Reference) {
    let model = reference_model(r, &Device::flex());
    let bytes = weights::to_safetensors_bytes(&model).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let g = read_golden(r);
    let mut want: Vec<String> = g.f32s.keys().filter_map(|k| k.strip_prefix("grad.")).map(String::from).collect();
    want.sort();
    assert_eq!(names, want);
    // And the PyTorch weights survive the round trip bit-exactly.
    let mut again = DitNet::new(&r.config, &Device::flex(), 0);
    weights::load_safetensors_bytes(&mut again, bytes, std::path::Path::new("mem")).unwrap();
    let t = ParamTable::of(&model);
    assert_eq!(t.read_values(&model), t.read_values(&again));
}
