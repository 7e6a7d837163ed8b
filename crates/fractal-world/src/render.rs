//! Scenes to frames: integer geometry, hard edges, no floats in the raster,
//! so a scene and a seed give the same bytes everywhere.

use crate::{Motion, Scene, Shape};

/// RGB8 frames, row-major, `width * height * 3` bytes each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clip {
    pub width: usize,
    pub height: usize,
    pub frames: Vec<Vec<u8>>,
}

impl Clip {
    pub fn pixel(&self, frame: usize, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        let f = &self.frames[frame];
        [f[i], f[i + 1], f[i + 2]]
    }
}

/// SplitMix64: the start position's only randomness, fixed here so that the
/// world does not depend on a crate's generator.
pub(crate) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in `lo..=hi`.
fn between(state: &mut u64, lo: i64, hi: i64) -> i64 {
    lo + (splitmix(state) % (hi - lo + 1) as u64) as i64
}

/// `frames` frames of `scene`, `size` x `size` pixels (at least 16). The
/// shape is `size / 4` across and travels `size / 2` pixels from the first
/// frame to the last, in whole pixels per frame where they divide; its
/// start (and the coordinate across its motion) comes from `seed`, always
/// keeping it wholly inside the frame.
pub fn render(scene: &Scene, seed: u64, frames: usize, size: usize) -> Clip {
    assert!(
        size >= 16 && frames >= 2,
        "a clip is at least 2 frames of 16x16"
    );
    let s = size as i64;
    let extent = s / 4;
    let travel = s / 2;
    let mut state = seed;
    // Top-left corner of the shape's box at frame 0, along and across.
    let along_lo = 0;
    let along_hi = s - extent - travel;
    let across = between(&mut state, 0, s - extent);
    let along = between(&mut state, along_lo, along_hi);
    let (dx, dy) = scene.motion.step();
    let start = match scene.motion {
        // Moving towards negative coordinates starts on the far side.
        Motion::Left => (along + travel, across),
        Motion::Right => (along, across),
        Motion::Up => (across, along + travel),
        Motion::Down => (across, along),
    };
    let background = scene.background.rgb();
    let colour = scene.colour.rgb();
    let last = frames as i64 - 1;
    let frames = (0..=last)
        .map(|f| {
            // Rounded to the nearest pixel, in integers.
            let moved = (2 * travel * f + last) / (2 * last);
            let (x0, y0) = (start.0 + dx * moved, start.1 + dy * moved);
            let mut pixels = Vec::with_capacity(size * size * 3);
            for y in 0..s {
                for x in 0..s {
                    let inside = covers(scene.shape, extent, x - x0, y - y0);
                    pixels.extend_from_slice(if inside { &colour } else { &background });
                }
            }
            pixels
        })
        .collect();
    Clip {
        width: size,
        height: size,
        frames,
    }
}

/// Whether the pixel at (`x`, `y`) from the top-left of an `extent`-pixel
/// box is inside the shape (pixel centres, in doubled coordinates).
fn covers(shape: Shape, extent: i64, x: i64, y: i64) -> bool {
    if x < 0 || y < 0 || x >= extent || y >= extent {
        return false;
    }
    let (cx, cy) = (2 * x + 1, 2 * y + 1);
    let e = 2 * extent;
    match shape {
        Shape::Square => true,
        Shape::Circle => {
            let (ox, oy) = (cx - extent, cy - extent);
            ox * ox + oy * oy <= extent * extent
        }
        // Apex at the top centre, base along the bottom: at (doubled) row
        // cy the half-width is cy / 2, so |cx - e/2| <= cy / 2.
        Shape::Triangle => (2 * cx - e).abs() <= cy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Colour;

    fn scene(shape: Shape, motion: Motion) -> Scene {
        Scene {
            shape,
            colour: Colour::from_name("red").unwrap(),
            motion,
            background: Colour::from_name("blue").unwrap(),
        }
    }

    #[test]
    fn same_scene_and_seed_same_bytes_other_seed_other_start() {
        let s = scene(Shape::Circle, Motion::Left);
        assert_eq!(render(&s, 7, 8, 64), render(&s, 7, 8, 64));
        assert_ne!(render(&s, 7, 8, 64), render(&s, 8, 8, 64));
    }

    #[test]
    fn the_shape_stays_inside_and_keeps_its_area() {
        for shape in Shape::ALL {
            for motion in Motion::ALL {
                for seed in 0..20 {
                    let clip = render(&scene(shape, motion), seed, 12, 64);
                    let red = Colour::from_name("red").unwrap().rgb();
                    let areas: Vec<usize> = (0..clip.frames.len())
                        .map(|f| {
                            (0..64 * 64)
                                .filter(|i| clip.pixel(f, i % 64, i / 64) == red)
                                .count()
                        })
                        .collect();
                    // Never clipped by the border: the same area every frame.
                    assert!(
                        areas.iter().all(|&a| a == areas[0] && a > 0),
                        "{shape:?} {motion:?} {areas:?}"
                    );
                    let box_area = 16 * 16;
                    let fill = areas[0] as f64 / box_area as f64;
                    let want = match shape {
                        Shape::Square => 1.0,
                        Shape::Circle => std::f64::consts::FRAC_PI_4,
                        Shape::Triangle => 0.5,
                    };
                    assert!((fill - want).abs() < 0.06, "{shape:?} fills {fill}");
                }
            }
        }
    }
}
