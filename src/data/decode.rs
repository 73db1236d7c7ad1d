//! One image file → channel-major 8-bit pixels, the step every file-based format (image folders,
//! CSV lists) shares: grayscale stays one channel, everything else (RGB, RGBA, palette) becomes
//! three, alpha is dropped (as PIL's `convert("RGB")` does) and 16-bit samples are scaled to 8.

use std::io::Cursor;

use anyhow::{Context, bail};
use image::imageops::FilterType;
use image::{ColorType, DynamicImage, ImageReader, Limits};

/// Files larger than this many pixels a side are refused before decoding: a 64-byte PNG can
/// declare a 100k × 100k image, and the decoder would try to allocate it.
pub const MAX_SIDE: u32 = 8192;
/// The most memory one decode may allocate.
const MAX_ALLOC: u64 = 512 << 20;

/// The filter `--image-size` resizes with: the triangle (bilinear) filter, its support widened
/// when shrinking so that it also low-passes (what torchvision's `Resize` does with
/// `antialias=True`).
pub const RESIZE_FILTER: FilterType = FilterType::Triangle;

/// A decoded image as `[channels, height, width]` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

/// The channel count an image of this colour type becomes.
pub fn channels_of(color: ColorType) -> usize {
    match color {
        ColorType::L8 | ColorType::L16 | ColorType::La8 | ColorType::La16 => 1,
        _ => 3,
    }
}

/// Decode a PNG or JPEG (recognised by its bytes, not its name) and, with `size`, centre-crop it
/// to a square and resize it to `size × size`.
pub fn decode(bytes: &[u8], size: Option<u32>) -> anyhow::Result<Pixels> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().context("reading the image")?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
        Some(other) => bail!("{other:?} images are not supported (PNG or JPEG)"),
        None => bail!("not a PNG or JPEG file"),
    }
    let image = reader.decode().context("decoding the image")?;
    let channels = channels_of(image.color());
    let image = match size {
        Some(s) => fit(image, s),
        None => image,
    };
    Ok(planes(&image, channels))
}

/// Centre-crop to the largest square, then resize to `size` (a no-op at that size already).
fn fit(image: DynamicImage, size: u32) -> DynamicImage {
    let (w, h) = (image.width(), image.height());
    let side = w.min(h);
    let square = if w == h { image } else { image.crop_imm((w - side) / 2, (h - side) / 2, side, side) };
    if side == size { square } else { square.resize_exact(size, size, RESIZE_FILTER) }
}

/// Interleaved pixels → channel planes.
fn planes(image: &DynamicImage, channels: usize) -> Pixels {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let data = if channels == 1 {
        image.to_luma8().into_raw()
    } else {
        let rgb = image.to_rgb8().into_raw();
        (0..3).flat_map(|c| rgb.iter().skip(c).step_by(3).copied()).collect()
    };
    Pixels { channels, height: h, width: w, data }
}

#[cfg(test)]
mod tests {
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

    use super::*;

    fn png(image: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        image.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn grayscale_stays_one_channel_and_colour_becomes_planes() {
        let gray = ImageBuffer::from_fn(3, 2, |x, y| Luma([(10 * x + y) as u8]));
        let p = decode(&png(DynamicImage::ImageLuma8(gray)), None).unwrap();
        assert_eq!((p.channels, p.height, p.width), (1, 2, 3));
        assert_eq!(p.data, vec![0, 10, 20, 1, 11, 21]);

        let rgb = ImageBuffer::from_fn(2, 1, |x, _| Rgb([x as u8, 100 + x as u8, 200 + x as u8]));
        let p = decode(&png(DynamicImage::ImageRgb8(rgb)), None).unwrap();
        assert_eq!(p.channels, 3);
        assert_eq!(p.data, vec![0, 1, 100, 101, 200, 201]);
    }

    #[test]
    fn alpha_is_dropped_and_sixteen_bits_scaled() {
        let rgba = ImageBuffer::from_fn(1, 1, |_, _| Rgba([1u8, 2, 3, 0]));
        assert_eq!(decode(&png(DynamicImage::ImageRgba8(rgba)), None).unwrap().data, vec![1, 2, 3]);
        let la = ImageBuffer::from_fn(1, 1, |_, _| LumaA([77u8, 9]));
        let p = decode(&png(DynamicImage::ImageLumaA8(la)), None).unwrap();
        assert_eq!((p.channels, p.data.clone()), (1, vec![77]));
        let deep = ImageBuffer::from_fn(2, 1, |x, _| Luma([if x == 0 { 65535u16 } else { 257 * 100 }]));
        assert_eq!(decode(&png(DynamicImage::ImageLuma16(deep)), None).unwrap().data, vec![255, 100]);
    }

    #[test]
    fn jpeg_decodes_and_garbage_is_an_error() {
        let rgb = ImageBuffer::from_fn(8, 8, |_, _| Rgb([200u8, 30, 30]));
        let mut jpeg = Vec::new();
        DynamicImage::ImageRgb8(rgb).write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        let p = decode(&jpeg, None).unwrap();
        assert_eq!((p.channels, p.height, p.width), (3, 8, 8));
        assert!(p.data[..64].iter().all(|&r| r.abs_diff(200) < 8), "{:?}", &p.data[..8]);

        assert!(decode(b"not an image at all", None).is_err());
        let truncated = png(DynamicImage::ImageRgb8(ImageBuffer::from_fn(16, 16, |x, _| Rgb([x as u8; 3]))));
        assert!(decode(&truncated[..truncated.len() / 2], None).is_err());
    }

    #[test]
    fn image_size_centre_crops_then_resizes() {
        // A 6×4 image whose middle 4×4 square is white and its side columns black.
        let wide = ImageBuffer::from_fn(6, 4, |x, _| Luma([if (1..5).contains(&x) { 255u8 } else { 0 }]));
        let p = decode(&png(DynamicImage::ImageLuma8(wide)), Some(2)).unwrap();
        assert_eq!((p.height, p.width), (2, 2));
        assert_eq!(p.data, vec![255; 4]);
        let same = decode(&png(DynamicImage::ImageLuma8(ImageBuffer::from_pixel(4, 4, Luma([9u8])))), Some(4)).unwrap();
        assert_eq!(same.data, vec![9; 16]);
    }

    /// The fuzz target's property (fuzz/fuzz_targets/image.rs) on seeded mutations of real
    /// files, run with the tests: truncations, flipped bytes and overwritten runs of a PNG and
    /// a JPEG are errors or well-formed images, never panics.
    #[test]
    fn damaged_png_and_jpeg_files_are_errors_or_well_formed_images() {
        use rand::{Rng, SeedableRng};
        let rgb = ImageBuffer::from_fn(12, 9, |x, y| Rgb([(x * 20) as u8, (y * 25) as u8, 90]));
        let mut jpeg = Vec::new();
        DynamicImage::ImageRgb8(rgb.clone()).write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
        for file in [png(DynamicImage::ImageRgb8(rgb)), jpeg] {
            for _ in 0..300 {
                let mut bytes = file.clone();
                match rng.random_range(0..3) {
                    0 => bytes.truncate(rng.random_range(0..bytes.len())),
                    1 => (0..4).for_each(|_| {
                        let i = rng.random_range(0..bytes.len());
                        bytes[i] ^= 1 << rng.random_range(0..8);
                    }),
                    _ => {
                        let i = rng.random_range(0..bytes.len());
                        let end = (i + rng.random_range(1..32)).min(bytes.len());
                        bytes[i..end].fill(rng.random());
                    }
                }
                for size in [None, Some(5)] {
                    if let Ok(p) = decode(&bytes, size) {
                        assert_eq!(p.data.len(), p.channels * p.height * p.width);
                        assert!(p.channels == 1 || p.channels == 3);
                    }
                }
            }
        }
    }
}
