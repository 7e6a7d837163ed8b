//! The grid's models as the gateway sees them: the manifests it knows (its
//! own, and those the chain's model schedule names, fetched by id), the
//! schedule as of the last probe, and which models each prover says it
//! serves. From these: the models an app may ask for (`GET /v1/models`,
//! `model` on create), and the provers a job may go to.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fractal_protocol::manifest::ModelManifest;
use fractal_protocol::schedule::{ModelSchedule, ModelState};
use fractal_protocol::{Hotkey, ManifestId};
use serde::Serialize;

use crate::db::now_s;

/// A model an app can ask for now.
#[derive(Clone, Debug)]
pub struct OfferedModel {
    pub manifest_id: ManifestId,
    pub manifest: Arc<ModelManifest>,
    /// `Active` or `Retiring` (a model is offered only while served).
    pub state: ModelState,
}

impl OfferedModel {
    /// Whether an app's `model` names this one (by name or manifest id).
    pub fn is_named(&self, model: &str) -> bool {
        model == self.manifest.name || model == self.manifest_id.to_string()
    }
}

/// One entry of `GET /v1/models`: OpenAI's model object, and what an app
/// needs to shape a request for it.
#[derive(Debug, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    /// When this gateway first learned of the model (unix seconds): the
    /// chain records blocks, not times.
    pub created: i64,
    pub owned_by: &'static str,
    pub manifest_id: String,
    pub architecture: &'static str,
    pub state: &'static str,
    /// `WIDTHxHEIGHT`, as `size` on create takes them.
    pub sizes: Vec<String>,
    pub default_size: String,
    pub max_frames: u32,
    pub max_steps: u32,
    pub default_steps: u32,
    pub default_frames: u32,
    pub fps: u32,
    pub max_prompt_bytes: u32,
    /// The block from which the schedule serves it, and until which
    /// (`None`: no successor yet, or the schedule pins nothing).
    pub from_block: Option<u64>,
    pub until_block: Option<u64>,
}

/// What the gateway knows of the grid's models.
pub struct Catalog {
    /// The model the gateway was started with: what it offers while the
    /// schedule pins nothing, and the model of jobs accepted before jobs
    /// recorded theirs.
    own: ManifestId,
    manifests: BTreeMap<ManifestId, Known>,
    schedule: ModelSchedule,
    block: u64,
    /// Models each prover said it serves at its last answered probe.
    serving: BTreeMap<Hotkey, Vec<ManifestId>>,
    /// Scheduled manifests the chain could not give us (warned of once).
    unreadable: BTreeSet<ManifestId>,
}

struct Known {
    manifest: Arc<ModelManifest>,
    first_seen_s: i64,
}

impl Catalog {
    pub fn new(own: ManifestId, manifest: ModelManifest) -> Self {
        let mut manifests = BTreeMap::new();
        manifests.insert(
            own,
            Known {
                manifest: Arc::new(manifest),
                first_seen_s: now_s(),
            },
        );
        Catalog {
            own,
            manifests,
            schedule: ModelSchedule::default(),
            block: 0,
            serving: BTreeMap::new(),
            unreadable: BTreeSet::new(),
        }
    }

    pub fn own(&self) -> ManifestId {
        self.own
    }

    /// Takes the chain's schedule at `block`.
    pub fn set_schedule(&mut self, schedule: ModelSchedule, block: u64) {
        self.schedule = schedule;
        self.block = block;
    }

    /// Scheduled manifests this gateway has no document for yet.
    pub fn missing(&self) -> Vec<ManifestId> {
        self.schedule
            .entries
            .iter()
            .map(|e| e.manifest)
            .filter(|id| !self.manifests.contains_key(id))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Notes that `id` could not be read; whether that is news (so worth
    /// a warning: the gateway retries at every probe).
    pub fn unreadable(&mut self, id: ManifestId) -> bool {
        self.unreadable.insert(id)
    }

    /// Adds a manifest document (whose id the caller checked).
    pub fn learn(&mut self, id: ManifestId, manifest: ModelManifest) {
        self.unreadable.remove(&id);
        self.manifests.entry(id).or_insert_with(|| Known {
            manifest: Arc::new(manifest),
            first_seen_s: now_s(),
        });
    }

    pub fn manifest(&self, id: &ManifestId) -> Option<Arc<ModelManifest>> {
        self.manifests.get(id).map(|k| k.manifest.clone())
    }

    /// Where `id` stands in the schedule now; `None` while the schedule
    /// pins nothing (then only the gateway's own model is served) or never
    /// named it.
    pub fn state(&self, id: &ManifestId) -> Option<ModelState> {
        self.schedule.state(id, self.block)
    }

    /// The models an app may ask for, the default (newest active) first:
    /// those the schedule serves now whose manifests are known here, or the
    /// gateway's own while the schedule pins nothing.
    pub fn offered(&self) -> Vec<OfferedModel> {
        if !self.schedule.pins_anything_at(self.block) {
            return vec![OfferedModel {
                manifest_id: self.own,
                manifest: self.manifests[&self.own].manifest.clone(),
                state: ModelState::Active,
            }];
        }
        self.schedule
            .served_at(self.block)
            .into_iter()
            .filter_map(|(id, state)| {
                Some(OfferedModel {
                    manifest_id: id,
                    manifest: self.manifest(&id)?,
                    state,
                })
            })
            .collect()
    }

    /// `GET /v1/models`'s entries.
    pub fn objects(&self) -> Vec<ModelObject> {
        self.offered()
            .into_iter()
            .map(|m| {
                let entry = self
                    .schedule
                    .entries
                    .iter()
                    .find(|e| e.manifest == m.manifest_id);
                let size =
                    |s: &fractal_protocol::manifest::Size| format!("{}x{}", s.width, s.height);
                let (d, l) = (&m.manifest.defaults, &m.manifest.limits);
                ModelObject {
                    id: m.manifest.name.clone(),
                    object: "model",
                    created: self.manifests[&m.manifest_id].first_seen_s,
                    owned_by: "fractal",
                    manifest_id: m.manifest_id.to_string(),
                    architecture: m.manifest.architecture.name(),
                    state: m.state.name(),
                    sizes: l.sizes.iter().map(size).collect(),
                    default_size: size(&d.size),
                    max_frames: l.max_frames,
                    max_steps: l.max_steps,
                    default_steps: d.steps,
                    default_frames: d.frames,
                    fps: d.fps,
                    max_prompt_bytes: l.max_prompt_bytes,
                    from_block: entry.map(|e| e.from_block),
                    until_block: entry.and_then(|e| e.until_block),
                }
            })
            .collect()
    }

    /// Records what a prover said it serves.
    pub fn set_serving(&mut self, prover: Hotkey, models: Vec<ManifestId>) {
        self.serving.insert(prover, models);
    }

    /// Forgets provers that left the metagraph.
    pub fn retain_provers(&mut self, keep: &BTreeSet<Hotkey>) {
        self.serving.retain(|h, _| keep.contains(h));
    }

    pub fn serves(&self, prover: &Hotkey, id: &ManifestId) -> bool {
        self.serving.get(prover).is_some_and(|m| m.contains(id))
    }

    /// The provers that said they serve `id`.
    pub fn provers_serving(&self, id: &ManifestId) -> Vec<Hotkey> {
        self.serving
            .iter()
            .filter(|(_, m)| m.contains(id))
            .map(|(h, _)| *h)
            .collect()
    }

    /// The provers known here, by what they serve.
    pub fn serving(&self) -> &BTreeMap<Hotkey, Vec<ManifestId>> {
        &self.serving
    }

    /// The manifest a job runs under: the one it was accepted for, or the
    /// gateway's own for jobs from before jobs recorded theirs.
    pub fn job_manifest(&self, recorded: &str) -> Result<ManifestId, String> {
        if recorded.is_empty() {
            return Ok(self.own);
        }
        recorded
            .parse()
            .map_err(|e| format!("the job's manifest id {recorded:?} is malformed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractal_protocol::schedule::Upgrade;

    fn tiny(v: fractal_engine::TinyVariant) -> (ManifestId, ModelManifest) {
        let m = fractal_engine::builtin::tiny::manifest(v);
        (m.id(), m)
    }

    #[test]
    fn the_offer_follows_the_schedule_and_needs_the_document() {
        let (a, ma) = tiny(fractal_engine::TinyVariant::Base);
        let (b, mb) = tiny(fractal_engine::TinyVariant::Wide);
        let mut c = Catalog::new(a, ma);
        // Nothing pinned: the gateway's own model.
        let names = |c: &Catalog| -> Vec<(String, &'static str)> {
            c.objects().into_iter().map(|o| (o.id, o.state)).collect()
        };
        assert_eq!(names(&c), vec![("fractal-tiny-v1".to_string(), "active")]);
        let s = ModelSchedule::default()
            .with_upgrade(
                Upgrade {
                    manifest: a,
                    at_block: 1,
                    grace_blocks: 1,
                },
                0,
            )
            .unwrap()
            .with_upgrade(
                Upgrade {
                    manifest: b,
                    at_block: 10,
                    grace_blocks: 5,
                },
                1,
            )
            .unwrap();
        c.set_schedule(s.clone(), 12);
        // B is served but its document is not here yet: not offered.
        assert_eq!(c.missing(), vec![b]);
        assert_eq!(names(&c), vec![("fractal-tiny-v1".to_string(), "retiring")]);
        c.learn(b, mb);
        let o = c.objects();
        assert_eq!(o[0].id, "fractal-tiny-wide-v1");
        assert_eq!(
            (o[0].state, o[0].from_block, o[0].until_block),
            ("active", Some(10), None)
        );
        assert_eq!((o[1].state, o[1].until_block), ("retiring", Some(15)));
        c.set_schedule(s, 15);
        assert_eq!(
            names(&c),
            vec![("fractal-tiny-wide-v1".to_string(), "active")]
        );
        assert_eq!(c.state(&a), Some(ModelState::Retired));
    }
}
