//! Synthetic challenges that look like app traffic.
//!
//! A prover that could tell the verifier's challenges from app jobs could
//! be honest on the first and cheat on the second, so challenges are drawn
//! from the app jobs this verifier's gateway routed recently: a challenge
//! copies the shape of a random recent job (size, frames, steps, guidance,
//! output, prompt and negative prompt lengths in words) and replaces its
//! text with new text of the same length from a position-indexed
//! word-bigram chain over recent prompts of that length (and over the
//! negative prompts, for the negative prompt). The words at each position,
//! their neighbours and the lengths therefore follow the traffic's own
//! distribution. Until enough traffic has been seen, the chain also reads a
//! built-in seed corpus (`assets/`) and shapes fall back to the verifier's
//! configured challenge shape.
//!
//! Recent prompts are kept in memory only (bounded) and their words are
//! only ever sent to the same provers the app jobs went to.

use std::collections::{BTreeMap, VecDeque};

use fractal_protocol::manifest::{ModelManifest, Size};
use fractal_protocol::wire::{GenerateRequest, OutputFormat, PROTOCOL_VERSION};
use fractal_protocol::{JobId, ManifestId, Seed};
use rand::Rng;

const SEED_PROMPTS: &str = include_str!("../assets/prompts.txt");
const SEED_NEGATIVES: &str = include_str!("../assets/negative-prompts.txt");

/// App jobs remembered.
pub const RECENT_JOBS: usize = 512;
/// Below this many recent jobs the seed corpus is mixed into the text.
pub const MIN_TRAFFIC: usize = 64;

/// What a challenge copies from an app job (everything but the text).
#[derive(Clone, Debug, PartialEq)]
pub struct JobShape {
    pub size: Size,
    pub frames: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub output: OutputFormat,
    pub prompt_words: usize,
    pub negative_words: usize,
    /// The queueing bound the app job's gateway sent, so challenges carry
    /// one as app jobs do.
    pub start_within_ms: Option<u64>,
}

impl JobShape {
    pub fn of(req: &GenerateRequest) -> Self {
        JobShape {
            size: req.size,
            frames: req.frames,
            steps: req.steps,
            guidance_scale: req.guidance_scale,
            output: req.output,
            prompt_words: words(&req.prompt).len(),
            negative_words: words(&req.negative_prompt).len(),
            start_within_ms: req.start_within_ms,
        }
    }
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

fn corpus(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(words)
        .collect()
}

/// A position-indexed word-bigram chain over texts, one per text length:
/// for texts of `len` words, the first words, and each word's successors at
/// each position (repeated as often as seen, so draws are
/// frequency-weighted). A walk of `len` words then has exactly the sources'
/// word frequencies at every position and their pairs of neighbours; only
/// longer-range structure is new.
struct Chain<'a> {
    by_len: BTreeMap<usize, Positions<'a>>,
}

#[derive(Default)]
struct Positions<'a> {
    starts: Vec<&'a str>,
    next: BTreeMap<(usize, &'a str), Vec<&'a str>>,
}

impl<'a> Chain<'a> {
    fn new(texts: impl Iterator<Item = &'a Vec<String>>) -> Self {
        let mut by_len: BTreeMap<usize, Positions<'a>> = BTreeMap::new();
        for t in texts.filter(|t| !t.is_empty()) {
            let p = by_len.entry(t.len()).or_default();
            p.starts.push(t[0].as_str());
            for (i, w) in t.windows(2).enumerate() {
                p.next
                    .entry((i, w[0].as_str()))
                    .or_default()
                    .push(w[1].as_str());
            }
        }
        Chain { by_len }
    }

    /// A text of `len` words (of the nearest length the sources have).
    fn text(&self, len: usize, rng: &mut impl Rng) -> String {
        if len == 0 {
            return String::new();
        }
        let Some(p) = self
            .by_len
            .range(len..)
            .next()
            .or_else(|| self.by_len.range(..len).next_back())
            .map(|(_, p)| p)
        else {
            return String::new();
        };
        let mut cur = p.starts[rng.gen_range(0..p.starts.len())];
        let mut out = vec![cur];
        while let Some(n) = p.next.get(&(out.len() - 1, cur)) {
            cur = n[rng.gen_range(0..n.len())];
            out.push(cur);
        }
        out.join(" ")
    }
}

/// Recent app traffic and the challenges drawn from it.
pub struct ChallengeMix {
    manifest_id: ManifestId,
    fallback: JobShape,
    recent: VecDeque<(JobShape, Vec<String>, Vec<String>)>,
    seed_prompts: Vec<Vec<String>>,
    seed_negatives: Vec<Vec<String>>,
}

impl ChallengeMix {
    /// Challenges for `manifest` shaped like its defaults until traffic is seen.
    pub fn new(manifest: &ModelManifest, manifest_id: ManifestId) -> Self {
        let d = &manifest.defaults;
        Self::with_fallback(
            manifest_id,
            JobShape {
                size: d.size,
                frames: d.frames,
                steps: d.steps,
                guidance_scale: d.guidance_scale,
                output: OutputFormat::Mp4,
                prompt_words: 0,
                negative_words: 0,
                start_within_ms: None,
            },
        )
    }

    /// `fallback` is the shape before any traffic (its word counts are
    /// drawn from the seed corpus).
    pub fn with_fallback(manifest_id: ManifestId, fallback: JobShape) -> Self {
        ChallengeMix {
            manifest_id,
            fallback,
            recent: VecDeque::with_capacity(RECENT_JOBS),
            seed_prompts: corpus(SEED_PROMPTS),
            seed_negatives: corpus(SEED_NEGATIVES),
        }
    }

    /// Remembers an app job (the oldest is forgotten past [`RECENT_JOBS`]).
    pub fn observe(&mut self, req: &GenerateRequest) {
        if self.recent.len() == RECENT_JOBS {
            self.recent.pop_front();
        }
        self.recent.push_back((
            JobShape::of(req),
            words(&req.prompt),
            words(&req.negative_prompt),
        ));
    }

    pub fn traffic_seen(&self) -> usize {
        self.recent.len()
    }

    /// A fresh challenge: a random recent job's shape with new text, a
    /// fresh seed and job id.
    pub fn draw(&self, rng: &mut impl Rng) -> GenerateRequest {
        let shape = if self.recent.is_empty() {
            let p = &self.seed_prompts[rng.gen_range(0..self.seed_prompts.len())];
            JobShape {
                prompt_words: p.len(),
                negative_words: if rng.gen_bool(0.5) {
                    0
                } else {
                    self.seed_negatives[rng.gen_range(0..self.seed_negatives.len())].len()
                },
                ..self.fallback.clone()
            }
        } else {
            self.recent[rng.gen_range(0..self.recent.len())].0.clone()
        };
        let with_seed = self.recent.len() < MIN_TRAFFIC;
        let prompts = Chain::new(
            self.recent
                .iter()
                .map(|r| &r.1)
                .chain(self.seed_prompts.iter().filter(|_| with_seed)),
        );
        let negatives = Chain::new(
            self.recent
                .iter()
                .map(|r| &r.2)
                .chain(self.seed_negatives.iter().filter(|_| with_seed)),
        );
        let mut prompt = prompts.text(shape.prompt_words.max(1), rng);
        if prompt.trim().is_empty() {
            prompt = seed_prompt(&self.seed_prompts, rng);
        }
        GenerateRequest {
            version: PROTOCOL_VERSION,
            job_id: JobId::random(),
            manifest_id: self.manifest_id,
            prompt,
            negative_prompt: negatives.text(shape.negative_words, rng),
            seed: Seed(rng.gen()),
            size: shape.size,
            frames: shape.frames,
            steps: shape.steps,
            guidance_scale: shape.guidance_scale,
            output: shape.output,
            start_within_ms: shape.start_within_ms,
        }
    }
}

fn seed_prompt(seed: &[Vec<String>], rng: &mut impl Rng) -> String {
    seed[rng.gen_range(0..seed.len())].join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// App traffic as a test stands in for it: prompts from phrase lists
    /// the challenge generator never saw, varied shapes, some negative
    /// prompts.
    fn app_job(rng: &mut impl Rng) -> GenerateRequest {
        const SUBJECTS: [&str; 12] = [
            "a grey heron",
            "an elderly fisherman",
            "a tiny robot",
            "two kittens",
            "a marching band",
            "a vintage tram",
            "a glowing jellyfish",
            "a lone cyclist",
            "a paper dragon",
            "a chef",
            "a red balloon",
            "a stray dog",
        ];
        const ACTIONS: [&str; 10] = [
            "walking slowly",
            "dancing",
            "floating gently",
            "racing",
            "sleeping peacefully",
            "spinning around",
            "jumping over puddles",
            "looking at the camera",
            "climbing",
            "drifting",
        ];
        const PLACES: [&str; 10] = [
            "in a rainy harbour",
            "across a frozen lake",
            "through a sunflower field",
            "on a crowded platform",
            "under neon lights",
            "inside an old library",
            "along a misty canal",
            "on the surface of the moon",
            "in a bamboo forest",
            "at a night market",
        ];
        const STYLES: [&str; 8] = [
            "",
            ", cinematic",
            ", 35mm film, grainy",
            ", watercolor style",
            ", slow motion, 4k",
            ", drone shot",
            ", studio lighting, highly detailed",
            ", pixar style animation",
        ];
        const NEGATIVES: [&str; 4] = [
            "",
            "blurry, low quality",
            "text, watermark, distorted faces",
            "flicker",
        ];
        let prompt = format!(
            "{} {} {}{}",
            SUBJECTS[rng.gen_range(0..SUBJECTS.len())],
            ACTIONS[rng.gen_range(0..ACTIONS.len())],
            PLACES[rng.gen_range(0..PLACES.len())],
            STYLES[rng.gen_range(0..STYLES.len())]
        );
        let sizes = [(64, 64), (32, 32), (128, 128)];
        let (w, h) = sizes[rng.gen_range(0..sizes.len())];
        GenerateRequest {
            version: PROTOCOL_VERSION,
            job_id: JobId::random(),
            manifest_id: ManifestId(fractal_protocol::Digest32([3; 32])),
            prompt,
            negative_prompt: NEGATIVES[rng.gen_range(0..NEGATIVES.len())].into(),
            seed: Seed(rng.gen()),
            size: Size {
                width: w,
                height: h,
            },
            frames: [8, 16, 24][rng.gen_range(0..3)],
            steps: [10, 25, 50][rng.gen_range(0..3)],
            guidance_scale: [7.5, 9.0][rng.gen_range(0..2)],
            output: if rng.gen_bool(0.8) {
                OutputFormat::Mp4
            } else {
                OutputFormat::Gif
            },
            // Gateways bound the queueing of most first tries.
            start_within_ms: rng.gen_bool(0.7).then(|| rng.gen_range(250..20_000)),
        }
    }

    /// The old challenges: 4-9 words of a fixed list, one fixed shape.
    fn old_challenge(rng: &mut impl Rng) -> GenerateRequest {
        const WORDS: [&str; 12] = [
            "a",
            "red",
            "fox",
            "running",
            "through",
            "snow",
            "old",
            "lighthouse",
            "at",
            "dusk",
            "neon",
            "city",
        ];
        let n = rng.gen_range(4..10);
        GenerateRequest {
            prompt: (0..n)
                .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
                .collect::<Vec<_>>()
                .join(" "),
            negative_prompt: String::new(),
            size: Size {
                width: 64,
                height: 64,
            },
            frames: 8,
            steps: 10,
            guidance_scale: 9.0,
            output: OutputFormat::Mp4,
            ..app_job(rng)
        }
    }

    /// Every feature a prover sees, as tokens for a naive Bayes classifier:
    /// the words of both prompts, their lengths and every shape field.
    fn features(r: &GenerateRequest) -> Vec<String> {
        let mut f: Vec<String> = r
            .prompt
            .split_whitespace()
            .map(|w| format!("w:{w}"))
            .collect();
        f.extend(
            r.negative_prompt
                .split_whitespace()
                .map(|w| format!("n:{w}")),
        );
        let p = r.prompt.split_whitespace().count();
        let n = r.negative_prompt.split_whitespace().count();
        f.extend([
            format!("plen:{p}"),
            format!("nlen:{n}"),
            format!("size:{}", r.size),
            format!("frames:{}", r.frames),
            format!("steps:{}", r.steps),
            format!("g:{}", r.guidance_scale),
            format!("out:{:?}", r.output),
            format!("within_s:{:?}", r.start_within_ms.map(|ms| ms / 1000)),
        ]);
        f
    }

    /// Multinomial naive Bayes with Laplace smoothing, trained on `train`
    /// (label true = challenge), accuracy on `test`.
    fn classifier_accuracy(
        train: &[(GenerateRequest, bool)],
        test: &[(GenerateRequest, bool)],
    ) -> f64 {
        let mut counts: [BTreeMap<String, f64>; 2] = Default::default();
        let mut totals = [0f64; 2];
        let mut docs = [0f64; 2];
        for (r, label) in train {
            let c = *label as usize;
            docs[c] += 1.0;
            for t in features(r) {
                *counts[c].entry(t).or_default() += 1.0;
                totals[c] += 1.0;
            }
        }
        let vocab = counts[0].len().max(counts[1].len()) as f64 + 1.0;
        let correct = test
            .iter()
            .filter(|(r, label)| {
                let score = |c: usize| {
                    (docs[c] / (docs[0] + docs[1])).ln()
                        + features(r)
                            .iter()
                            .map(|t| {
                                ((counts[c].get(t).copied().unwrap_or(0.0) + 1.0)
                                    / (totals[c] + vocab))
                                    .ln()
                            })
                            .sum::<f64>()
                };
                (score(1) > score(0)) == *label
            })
            .count();
        correct as f64 / test.len() as f64
    }

    fn labelled(
        rng: &mut impl Rng,
        n: usize,
        mut challenge: impl FnMut(&mut rand::rngs::StdRng) -> GenerateRequest,
        crng: &mut rand::rngs::StdRng,
    ) -> Vec<(GenerateRequest, bool)> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push((app_job(rng), false));
            v.push((challenge(crng), true));
        }
        v
    }

    #[test]
    fn a_classifier_cannot_tell_challenges_from_app_traffic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut crng = rand::rngs::StdRng::seed_from_u64(12);
        let manifest_id = ManifestId(fractal_protocol::Digest32([3; 32]));
        let mut mix =
            ChallengeMix::with_fallback(manifest_id, JobShape::of(&old_challenge(&mut rng)));
        for _ in 0..RECENT_JOBS {
            mix.observe(&app_job(&mut rng));
        }
        let train = labelled(&mut rng, 1000, |r| mix.draw(r), &mut crng);
        let test = labelled(&mut rng, 1000, |r| mix.draw(r), &mut crng);
        let acc = classifier_accuracy(&train, &test);
        eprintln!("challenges vs app jobs: accuracy {acc:.3}");
        // 2,000 test jobs: chance is 50% +- 1.1% (one standard deviation).
        assert!(
            acc < 0.56,
            "challenges are distinguishable: accuracy {acc:.3}"
        );

        // The same classifier does tell the old fixed-list challenges apart,
        // so the test can fail.
        let train = labelled(&mut rng, 1000, old_challenge, &mut crng);
        let test = labelled(&mut rng, 1000, old_challenge, &mut crng);
        let acc = classifier_accuracy(&train, &test);
        eprintln!("old challenges vs app jobs: accuracy {acc:.3}");
        assert!(acc > 0.95, "old challenges: accuracy {acc:.3}");
    }

    #[test]
    fn without_traffic_challenges_use_the_fallback_shape_and_seed_text() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let manifest_id = ManifestId(fractal_protocol::Digest32([3; 32]));
        let fallback = JobShape::of(&old_challenge(&mut rng));
        let mix = ChallengeMix::with_fallback(manifest_id, fallback.clone());
        let mut with_negative = 0;
        for _ in 0..200 {
            let r = mix.draw(&mut rng);
            assert_eq!(
                (r.size, r.frames, r.steps),
                (fallback.size, fallback.frames, fallback.steps)
            );
            assert_eq!(r.manifest_id, manifest_id);
            assert!(!r.prompt.trim().is_empty());
            with_negative += !r.negative_prompt.is_empty() as usize;
        }
        assert!((50..150).contains(&with_negative), "{with_negative}");
    }

    #[test]
    fn recent_traffic_is_bounded() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut mix = ChallengeMix::with_fallback(
            ManifestId(fractal_protocol::Digest32([3; 32])),
            JobShape::of(&old_challenge(&mut rng)),
        );
        for _ in 0..RECENT_JOBS + 10 {
            mix.observe(&app_job(&mut rng));
        }
        assert_eq!(mix.traffic_seen(), RECENT_JOBS);
    }
}
