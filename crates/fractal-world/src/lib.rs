//! The toy world a built-in model can learn on a 2-core machine: one shape
//! (circle, square, triangle) of one colour moving in one direction over a
//! plain background of another colour.
//!
//! Everything here is deterministic: a [`Scene`] and a seed render the same
//! [`Clip`] bytes on every machine (integer geometry, no floats in the
//! raster), captions come from one template ([`Scene::caption`], read back by
//! [`Scene::parse`]), and [`Split`] holds some combinations out of training
//! by a fixed rule. [`analyse`] reads a clip's frames back into what they
//! show, so a model's output can be scored against its prompt and the
//! renderer's own clips give the ceiling.

mod analyse;
mod render;

pub use analyse::{analyse, Analysis};
pub use render::{render, Clip};

/// A named colour of the world's palette.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Colour(u8);

/// Names and sRGB values, far apart so that a blurred or tinted pixel still
/// has one nearest entry.
const PALETTE: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [240, 220, 40]),
    ("purple", [150, 60, 200]),
    ("orange", [245, 140, 30]),
    ("white", [240, 240, 240]),
    ("black", [20, 20, 20]),
];

impl Colour {
    /// Every colour, in palette order.
    pub fn all() -> impl Iterator<Item = Colour> {
        (0..PALETTE.len() as u8).map(Colour)
    }

    pub fn name(self) -> &'static str {
        PALETTE[self.0 as usize].0
    }

    pub fn rgb(self) -> [u8; 3] {
        PALETTE[self.0 as usize].1
    }

    pub fn from_name(name: &str) -> Option<Colour> {
        Colour::all().find(|c| c.name() == name)
    }

    /// The palette entry nearest `rgb` (squared distance; ties to the first).
    pub fn nearest(rgb: [f32; 3]) -> Colour {
        Self::nearest_of(rgb, Colour::all())
    }

    /// [`Colour::nearest`] among the palette's other entries than `except`.
    pub fn nearest_except(rgb: [f32; 3], except: Colour) -> Colour {
        Self::nearest_of(rgb, Colour::all().filter(|&c| c != except))
    }

    fn nearest_of(rgb: [f32; 3], candidates: impl Iterator<Item = Colour>) -> Colour {
        let distance = |c: Colour| -> f32 {
            let p = c.rgb();
            (0..3).map(|i| (rgb[i] - p[i] as f32).powi(2)).sum()
        };
        candidates
            .min_by(|a, b| distance(*a).total_cmp(&distance(*b)))
            .expect("the palette has more than one entry")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// The direction the shape moves in, on screen (up is towards row 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Motion {
    Left,
    Right,
    Up,
    Down,
}

impl Motion {
    pub const ALL: [Motion; 4] = [Motion::Left, Motion::Right, Motion::Up, Motion::Down];

    pub fn name(self) -> &'static str {
        match self {
            Motion::Left => "left",
            Motion::Right => "right",
            Motion::Up => "up",
            Motion::Down => "down",
        }
    }

    /// Unit step in (column, row).
    fn step(self) -> (i64, i64) {
        match self {
            Motion::Left => (-1, 0),
            Motion::Right => (1, 0),
            Motion::Up => (0, -1),
            Motion::Down => (0, 1),
        }
    }
}

/// What a clip shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scene {
    pub shape: Shape,
    pub colour: Colour,
    pub motion: Motion,
    pub background: Colour,
}

/// Whether a scene is trained on or kept for evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorldError {
    #[error("not a caption of the toy world: {0:?} (want \"a <colour> <shape> moving <direction> on a <colour> background\")")]
    NotACaption(String),
    #[error("the shape's colour and the background are both {0}")]
    InvisibleShape(&'static str),
}

impl Scene {
    /// Every scene of the world: each shape, colour and motion on each other
    /// background colour.
    pub fn all() -> Vec<Scene> {
        let mut scenes = Vec::new();
        for shape in Shape::ALL {
            for colour in Colour::all() {
                for motion in Motion::ALL {
                    for background in Colour::all().filter(|&b| b != colour) {
                        scenes.push(Scene {
                            shape,
                            colour,
                            motion,
                            background,
                        });
                    }
                }
            }
        }
        scenes
    }

    /// "a red circle moving left on a blue background".
    pub fn caption(&self) -> String {
        format!(
            "a {} {} moving {} on a {} background",
            self.colour.name(),
            self.shape.name(),
            self.motion.name(),
            self.background.name()
        )
    }

    /// The scene a caption of [`Scene::caption`]'s form names (case and
    /// surrounding whitespace aside).
    pub fn parse(caption: &str) -> Result<Scene, WorldError> {
        let bad = || WorldError::NotACaption(caption.to_string());
        let lower = caption.trim().to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        let ["a", colour, shape, "moving", motion, "on", "a", background, "background"] = words[..]
        else {
            return Err(bad());
        };
        let colour = Colour::from_name(colour).ok_or_else(bad)?;
        let background = Colour::from_name(background).ok_or_else(bad)?;
        let shape = Shape::ALL
            .into_iter()
            .find(|s| s.name() == shape)
            .ok_or_else(bad)?;
        let motion = Motion::ALL
            .into_iter()
            .find(|m| m.name() == motion)
            .ok_or_else(bad)?;
        if colour == background {
            return Err(WorldError::InvisibleShape(colour.name()));
        }
        Ok(Scene {
            shape,
            colour,
            motion,
            background,
        })
    }

    /// Held out: one (shape, colour, motion) combination in seven, picked
    /// by a fixed rule that leaves every colour, shape and motion, and every
    /// pair of them, in training with other partners.
    pub fn split(&self) -> Split {
        let s = self.shape as usize;
        let c = self.colour.0 as usize;
        let m = self.motion as usize;
        if (c + 3 * s + 5 * m) % 7 == 3 {
            Split::HeldOut
        } else {
            Split::Train
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn captions_read_back_and_bad_ones_are_refused() {
        for scene in Scene::all() {
            assert_eq!(Scene::parse(&scene.caption()), Ok(scene));
        }
        assert_eq!(
            Scene::parse("  A Red Circle moving LEFT on a blue background "),
            Ok(Scene {
                shape: Shape::Circle,
                colour: Colour::from_name("red").unwrap(),
                motion: Motion::Left,
                background: Colour::from_name("blue").unwrap(),
            })
        );
        for bad in [
            "a fox running through snow",
            "a red circle moving left on a blue",
            "a teal circle moving left on a blue background",
            "a red hexagon moving left on a blue background",
            "a red circle moving sideways on a blue background",
        ] {
            assert!(
                matches!(Scene::parse(bad), Err(WorldError::NotACaption(_))),
                "{bad}"
            );
        }
        assert_eq!(
            Scene::parse("a red circle moving left on a red background"),
            Err(WorldError::InvisibleShape("red"))
        );
    }

    #[test]
    fn held_out_combinations_leave_every_attribute_and_pair_in_training() {
        let all = Scene::all();
        assert_eq!(all.len(), 3 * 8 * 4 * 7);
        let (held, train): (Vec<Scene>, Vec<Scene>) =
            all.iter().partition(|s| s.split() == Split::HeldOut);
        assert!(!held.is_empty());
        let share = held.len() as f64 / all.len() as f64;
        assert!((0.1..0.2).contains(&share), "held out {share}");
        let pairs = |scenes: &[Scene]| -> BTreeSet<(u8, u8, u8)> {
            scenes
                .iter()
                .flat_map(|s| {
                    let (sh, c, m) = (s.shape as u8, s.colour.0, s.motion as u8);
                    [(0, sh * 8 + c, 0), (1, sh, m), (2, c, m)]
                })
                .collect()
        };
        // Every (shape, colour), (shape, motion), (colour, motion) pair of
        // a held-out scene is also trained on.
        assert!(pairs(&held).is_subset(&pairs(&train)));
        // And no held-out (shape, colour, motion) is ever trained on.
        let triple = |s: &Scene| (s.shape, s.colour, s.motion);
        let trained: BTreeSet<_> = train.iter().map(triple).collect();
        assert!(held.iter().all(|s| !trained.contains(&triple(s))));
    }

    #[test]
    fn nearest_colour_is_the_palette_entry_itself() {
        for c in Colour::all() {
            let [r, g, b] = c.rgb();
            assert_eq!(Colour::nearest([r as f32, g as f32, b as f32]), c);
            assert_eq!(Colour::from_name(c.name()), Some(c));
        }
    }
}
