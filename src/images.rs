//! Model tensors in [-1, 1] to 8-bit images, and image grids (their rows labelled with class
//! names in the embedded DejaVu Sans, so a grid reads the same on every machine).

use std::path::Path;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
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

    /// The image as a PNG file's bytes (the bytes `save_png` writes).
    pub fn png_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let mut bytes = std::io::Cursor::new(Vec::new());
        self.to_dynamic()?.write_to(&mut bytes, image::ImageFormat::Png).context("encoding a PNG")?;
        Ok(bytes.into_inner())
    }

    pub fn save_png(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.png_bytes()?).with_context(|| format!("writing {}", path.display()))
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

/// `grid` (rows `pitch` pixels apart, starting `pad` below the top) with a margin on the left
/// holding each row's name, white on black, vertically centred on its row.
pub fn label_rows(grid: &FloatImage, names: &[String], pitch: usize, pad: usize) -> FloatImage {
    let font = FontRef::try_from_slice(dejavu::sans::regular()).expect("the embedded font parses");
    let px = (pitch as f32 * 0.5).clamp(9.0, 20.0);
    let scaled = font.as_scaled(PxScale::from(px));
    let advance = |s: &str| s.chars().map(|c| scaled.h_advance(font.glyph_id(c))).sum::<f32>();
    let margin = names.iter().map(|n| advance(n)).fold(0f32, f32::max).ceil() as usize + 3 * pad.max(2);
    let (c, h, w) = (grid.channels, grid.height, grid.width + margin);
    let mut data = vec![-1.0f32; c * h * w];
    for ch in 0..c {
        for y in 0..grid.height {
            let src = &grid.data[ch * grid.height * grid.width + y * grid.width..][..grid.width];
            data[ch * h * w + y * w + margin..][..grid.width].copy_from_slice(src);
        }
    }
    // Text height from the font's ascent and descent, centred on the row's images.
    let text_h = scaled.ascent() - scaled.descent();
    for (r, name) in names.iter().enumerate() {
        let row_mid = (pad + r * pitch) as f32 + (pitch - pad) as f32 / 2.0;
        let baseline = row_mid - text_h / 2.0 + scaled.ascent();
        let mut x = pad.max(2) as f32;
        for ch_char in name.chars() {
            let id = font.glyph_id(ch_char);
            if let Some(outline) = font.outline_glyph(id.with_scale_and_position(px, point(x, baseline))) {
                let b = outline.px_bounds();
                outline.draw(|gx, gy, coverage| {
                    let (px_x, px_y) = (b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64);
                    if px_x < 0 || px_y < 0 || px_x as usize >= margin || px_y as usize >= h {
                        return;
                    }
                    for plane in 0..c {
                        let v = &mut data[plane * h * w + px_y as usize * w + px_x as usize];
                        *v = v.max(coverage.clamp(0.0, 1.0) * 2.0 - 1.0);
                    }
                });
            }
            x += scaled.h_advance(id);
        }
    }
    FloatImage { channels: c, height: h, width: w, data }
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

    #[test]
    fn row_labels_are_drawn_in_a_left_margin_beside_their_rows() {
        let img = |v: f32| FloatImage { channels: 3, height: 28, width: 28, data: vec![v; 3 * 28 * 28] };
        let g = grid(&[vec![img(0.0)], vec![img(0.0)]], 2).unwrap();
        let names = vec!["cat".to_string(), "ankle boot".to_string()];
        let l = label_rows(&g, &names, 30, 2);
        let margin = l.width - g.width;
        assert!(margin > 30 && l.height == g.height, "{margin}");
        // The grid is unchanged to the right of the margin.
        assert_eq!(l.data[margin + 5 * l.width + 5], g.data[5 * g.width + 5]);
        // Ink in each row's part of the margin, and in no other part of it.
        let ink = |y0: usize, y1: usize| (y0..y1).any(|y| (0..margin).any(|x| l.data[y * l.width + x] > 0.0));
        assert!(ink(2, 30) && ink(32, 60));
        assert!(!ink(0, 1) && !ink(61, 62));
        // The longer name reaches further right.
        let reach = |y0: usize, y1: usize| {
            let inked = |x: usize| (y0..y1).any(|y| l.data[y * l.width + x] > 0.0);
            (0..margin).filter(|&x| inked(x)).max().unwrap()
        };
        assert!(reach(32, 60) > reach(2, 30) + 10);
    }
}
