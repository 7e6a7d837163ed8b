//! Frames back to what they show: the background (the median pixel), the
//! shape's pixels (those far from it), their colour, their outline's shape
//! and where their centroid goes. Deterministic, with no learned parts, so
//! that it scores a model and the renderer alike.

use crate::{Clip, Colour, Motion, Shape};

/// What [`analyse`] read from a clip; `None` where it saw no shape (or, for
/// the motion, a shape that does not move).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Analysis {
    pub background: Colour,
    pub colour: Option<Colour>,
    pub shape: Option<Shape>,
    pub motion: Option<Motion>,
}

/// A pixel this far (RGB distance) from the background belongs to the
/// shape: under half the distance between the palette's closest entries
/// (yellow and orange, 80 apart).
const FOREGROUND_DISTANCE: f32 = 36.0;

pub fn analyse(clip: &Clip) -> Analysis {
    let (w, h) = (clip.width, clip.height);
    let background_rgb = median_pixel(clip);
    let background = Colour::nearest(background_rgb);
    // Per frame: the pixels `is_shape` picks, cleaned of specks.
    let shape_masks = |is_shape: &dyn Fn(&[u8]) -> bool| -> Vec<Vec<bool>> {
        clip.frames
            .iter()
            .map(|f| {
                let picked: Vec<bool> = f.chunks_exact(3).map(is_shape).collect();
                largest_component(&majority(&picked, w, h), w, h)
            })
            .collect()
    };
    let masks = shape_masks(&|p| distance(p, background_rgb) > FOREGROUND_DISTANCE);

    // The shape's colour: the per-channel median of its core pixels (those
    // whose whole 3x3 neighbourhood is shape, so not blended with the
    // background at a soft edge) over every frame, or of all its pixels
    // where it has no core; named by the nearest palette entry other than
    // the background.
    let cores: Vec<Vec<bool>> = masks.iter().map(|m| erode(m, w, h)).collect();
    let pixels_of = |masks: &[Vec<bool>]| {
        median(clip.frames.iter().zip(masks).flat_map(|(f, m)| {
            f.chunks_exact(3)
                .zip(m)
                .filter(|(_, &on)| on)
                .map(|(p, _)| p)
        }))
    };
    let Some(middle) = pixels_of(&cores).or_else(|| pixels_of(&masks)) else {
        return Analysis {
            background,
            colour: None,
            shape: None,
            motion: None,
        };
    };
    let colour = Colour::nearest_except(middle, background);

    // The outline from the pixels nearer the named colour than the
    // background: the edge at the half-way blend, where a soft or noisy
    // frame puts it, not wherever the first threshold cut it. (The measured
    // median leans towards the background, by the blended edge pixels.)
    let reference = colour.rgb().map(f32::from);
    let masks = shape_masks(&|p| distance(p, reference) < distance(p, background_rgb));
    let outlines: Vec<Outline> = masks.iter().filter_map(|m| Outline::of(m, w, h)).collect();
    let shape = shape_of(&outlines);
    let motion = motion_of(&outlines, w.min(h));
    Analysis {
        background,
        colour: Some(colour),
        shape,
        motion,
    }
}

fn distance(p: &[u8], rgb: [f32; 3]) -> f32 {
    (0..3)
        .map(|i| (p[i] as f32 - rgb[i]).powi(2))
        .sum::<f32>()
        .sqrt()
}

/// The per-channel median of every pixel of every frame: the background,
/// since the shape covers at most a sixteenth of a frame.
fn median_pixel(clip: &Clip) -> [f32; 3] {
    median(clip.frames.iter().flat_map(|f| f.chunks_exact(3))).unwrap_or_default()
}

/// The per-channel median of `pixels` (RGB8), or None if there are none.
fn median<'a>(pixels: impl Iterator<Item = &'a [u8]>) -> Option<[f32; 3]> {
    let mut histogram = [[0usize; 256]; 3];
    let mut n = 0;
    for p in pixels {
        for c in 0..3 {
            histogram[c][p[c] as usize] += 1;
        }
        n += 1;
    }
    if n == 0 {
        return None;
    }
    Some(histogram.map(|h| {
        let mut seen = 0;
        h.iter()
            .position(|&k| {
                seen += k;
                2 * seen >= n
            })
            .unwrap_or(255) as f32
    }))
}

/// A pixel stays foreground where at least 4 of its 3x3 neighbourhood are
/// (a square's corner has exactly 4): noise far from the background is
/// scattered, a shape's pixels are not.
fn majority(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut out = vec![false; mask.len()];
    for y in 0..h {
        for x in 0..w {
            let mut on = 0;
            for yy in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for xx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    on += mask[yy * w + xx] as usize;
                }
            }
            out[y * w + x] = on >= 4;
        }
    }
    out
}

/// The pixels of `mask` whose whole 3x3 neighbourhood is in it.
fn erode(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut out = vec![false; mask.len()];
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            out[y * w + x] = (y - 1..=y + 1).all(|yy| (x - 1..=x + 1).all(|xx| mask[yy * w + xx]));
        }
    }
    out
}

/// The largest 4-connected region of `mask` (the first found on ties): the
/// shape, without the specks a model leaves elsewhere.
fn largest_component(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut label = vec![0u32; mask.len()];
    let (mut best, mut best_size, mut next) = (0u32, 0usize, 0u32);
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let mut size = 0;
        while let Some(i) = stack.pop() {
            size += 1;
            let (x, y) = (i % w, i / w);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < w).then(|| i + 1),
                (y > 0).then(|| i - w),
                (y + 1 < h).then(|| i + w),
            ];
            for j in neighbours.into_iter().flatten() {
                if mask[j] && label[j] == 0 {
                    label[j] = next;
                    stack.push(j);
                }
            }
        }
        if size > best_size {
            (best, best_size) = (next, size);
        }
    }
    label.iter().map(|&l| best != 0 && l == best).collect()
}

/// One frame's foreground: its pixel count and centroid, the area of its
/// box (rows and columns holding at least a quarter of the fullest one's
/// pixels, so that a ragged pixel or two at an edge do not widen it), and
/// the mean width of that box's top and bottom quarters of rows.
struct Outline {
    area: usize,
    box_area: usize,
    centroid: (f64, f64),
    top_width: f64,
    bottom_width: f64,
}

impl Outline {
    fn of(mask: &[bool], w: usize, h: usize) -> Option<Outline> {
        let (mut area, mut sx, mut sy) = (0usize, 0f64, 0f64);
        let mut row_count = vec![0usize; h];
        let mut column_count = vec![0usize; w];
        for y in 0..h {
            for x in 0..w {
                if mask[y * w + x] {
                    area += 1;
                    sx += x as f64;
                    sy += y as f64;
                    row_count[y] += 1;
                    column_count[x] += 1;
                }
            }
        }
        if area == 0 {
            return None;
        }
        let solid = |counts: &[usize]| -> Vec<usize> {
            let max = counts.iter().copied().max().unwrap_or(0);
            (0..counts.len())
                .filter(|&i| 4 * counts[i] >= max)
                .collect()
        };
        let (rows, columns) = (solid(&row_count), solid(&column_count));
        let quarter = (rows.len() / 4).max(1);
        let mean =
            |r: &[usize]| r.iter().map(|&y| row_count[y]).sum::<usize>() as f64 / r.len() as f64;
        Some(Outline {
            area,
            box_area: rows.len() * columns.len(),
            centroid: (sx / area as f64, sy / area as f64),
            top_width: mean(&rows[..quarter]),
            bottom_width: mean(&rows[rows.len() - quarter..]),
        })
    }
}

/// A triangle's top rows are far narrower than its bottom ones; a square
/// fills its box (see [`Outline`]), a circle about 0.84 of it (pi/3.75: the
/// box spans the chords of at least a quarter of the diameter). Judged on
/// the median over frames.
fn shape_of(outlines: &[Outline]) -> Option<Shape> {
    if outlines.is_empty() {
        return None;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let taper = median(
        outlines
            .iter()
            .map(|o| o.top_width / o.bottom_width.max(1.0))
            .collect(),
    );
    let fill = median(
        outlines
            .iter()
            .map(|o| o.area as f64 / o.box_area as f64)
            .collect(),
    );
    Some(if taper < 0.5 {
        Shape::Triangle
    } else if fill > 0.92 {
        Shape::Square
    } else {
        Shape::Circle
    })
}

/// The direction from the first frame's centroid to the last's, if it moved
/// at least a sixteenth of the frame.
fn motion_of(outlines: &[Outline], size: usize) -> Option<Motion> {
    let (first, last) = (outlines.first()?, outlines.last()?);
    let dx = last.centroid.0 - first.centroid.0;
    let dy = last.centroid.1 - first.centroid.1;
    if dx.abs().max(dy.abs()) < size as f64 / 16.0 {
        return None;
    }
    Some(if dx.abs() >= dy.abs() {
        if dx < 0.0 {
            Motion::Left
        } else {
            Motion::Right
        }
    } else if dy < 0.0 {
        Motion::Up
    } else {
        Motion::Down
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{render, Scene};

    fn expected(scene: &Scene) -> Analysis {
        Analysis {
            background: scene.background,
            colour: Some(scene.colour),
            shape: Some(scene.shape),
            motion: Some(scene.motion),
        }
    }

    #[test]
    fn reads_every_rendered_scene_back() {
        for (i, scene) in Scene::all().iter().enumerate() {
            let clip = render(scene, i as u64, 8, 64);
            assert_eq!(analyse(&clip), expected(scene), "{}", scene.caption());
        }
    }

    /// A model's frames are soft and noisy: a 3x3 box blur and +-24 of
    /// deterministic noise per channel change nothing it reads.
    #[test]
    fn reads_blurred_noisy_frames_too() {
        let mut state = 1u64;
        for (i, scene) in Scene::all().iter().enumerate().step_by(5) {
            let mut clip = render(scene, 1000 + i as u64, 12, 64);
            for f in &mut clip.frames {
                let src = f.clone();
                for y in 0..64usize {
                    for x in 0..64usize {
                        for c in 0..3 {
                            let mut s = 0u32;
                            let mut n = 0u32;
                            for yy in y.saturating_sub(1)..=(y + 1).min(63) {
                                for xx in x.saturating_sub(1)..=(x + 1).min(63) {
                                    s += src[(yy * 64 + xx) * 3 + c] as u32;
                                    n += 1;
                                }
                            }
                            let noise = (crate::render::splitmix(&mut state) % 49) as i32 - 24;
                            f[(y * 64 + x) * 3 + c] = ((s / n) as i32 + noise).clamp(0, 255) as u8;
                        }
                    }
                }
            }
            assert_eq!(analyse(&clip), expected(scene), "{}", scene.caption());
        }
    }

    #[test]
    fn a_blank_clip_shows_no_shape() {
        let scene = Scene::parse("a red circle moving left on a green background").unwrap();
        let mut clip = render(&scene, 0, 4, 32);
        let green = scene.background.rgb();
        for f in &mut clip.frames {
            for p in f.chunks_exact_mut(3) {
                p.copy_from_slice(&green);
            }
        }
        let a = analyse(&clip);
        assert_eq!(a.background, scene.background);
        assert_eq!((a.colour, a.shape, a.motion), (None, None, None));
    }
}
