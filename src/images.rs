//! Model tensors in [-1, 1] to 8-bit images, and image grids.

use std::path::Path;

use anyhow::{Context, ensure};
use image::{DynamicImage, GrayImage, RgbImage};

/// One image as channel-major floats in [-1, 1].
#[derive(Debug, Clone)]
pub struct FloatImage {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// [-1, 1] → 0..=255, rounding to nearest.
pub fn to_u8(v: f32) -> u8 {
    ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
}

impl FloatImage {
    pub fn to_dynamic(&self) -> anyhow::Result<DynamicImage> {
        let (w, h) = (self.width as u32, self.height as u32);
        let plane = self.height * self.width;
        match self.channels {
            1 => Ok(DynamicImage::ImageLuma8(
                GrayImage::from_raw(w, h, self.data.iter().map(|&v| to_u8(v)).collect()).context("image size")?,
            )),
            3 => {
                let interleaved =
                    (0..plane).flat_map(|i| (0..3).map(move |c| c * plane + i)).map(|j| to_u8(self.data[j])).collect();
                Ok(DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, interleaved).context("image size")?))
            }
            c => anyhow::bail!("cannot write a {c}-channel image (1 or 3 supported)"),
        }
    }

    pub fn save_png(&self, path: &Path) -> anyhow::Result<()> {
        self.to_dynamic()?.save(path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Images laid out in rows (each row its own list), `pad` pixels of black between them.
pub fn grid(rows: &[Vec<FloatImage>], pad: usize) -> anyhow::Result<FloatImage> {
    let first = rows.iter().flatten().next().context("an image grid needs at least one image")?;
    let (c, h, w) = (first.channels, first.height, first.width);
    ensure!(rows.iter().flatten().all(|i| (i.channels, i.height, i.width) == (c, h, w)), "grid images differ in size");
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (gh, gw) = (rows.len() * (h + pad) + pad, cols * (w + pad) + pad);
    let mut data = vec![-1.0f32; c * gh * gw];
    for (r, row) in rows.iter().enumerate() {
        for (k, img) in row.iter().enumerate() {
            let (y0, x0) = (pad + r * (h + pad), pad + k * (w + pad));
            for ch in 0..c {
                for y in 0..h {
                    let src = &img.data[ch * h * w + y * w..ch * h * w + (y + 1) * w];
                    let dst = ch * gh * gw + (y0 + y) * gw + x0;
                    data[dst..dst + w].copy_from_slice(src);
                }
            }
        }
    }
    Ok(FloatImage { channels: c, height: gh, width: gw, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_mapping_and_grid_layout() {
        assert_eq!((to_u8(-1.0), to_u8(0.0), to_u8(1.0), to_u8(7.0)), (0, 128, 255, 255));
        let img = |v| FloatImage { channels: 1, height: 2, width: 2, data: vec![v; 4] };
        let g = grid(&[vec![img(1.0)], vec![img(0.0), img(1.0)]], 1).unwrap();
        assert_eq!((g.height, g.width), (2 * 3 + 1, 2 * 3 + 1));
        assert_eq!(g.data[g.width + 1], 1.0); // first image
        assert_eq!(g.data[0], -1.0); // padding
        assert_eq!(g.data[4 * g.width + 1], 0.0); // second row
    }
}
