//! The model schedule on subtensor: one field of the subnet owner hotkey's
//! `Commitments` entry for the subnet, the pallet real subnets use to
//! publish small data (model hashes, endpoints) on chain.
//!
//! What the pallet allows (spec 461): `set_commitment(netuid, info)` by a
//! hotkey registered on the subnet; `info` holds at most `MaxFields` = 3
//! fields, each a `Data` variant (`Raw0` … `Raw128` bytes, or a hash);
//! committed bytes per account are capped per tempo (`MaxSpace`, 3100 by
//! default; `SpaceLimitExceeded` beyond); deposits are 0. The entry is read
//! from `CommitmentOf(netuid, account)` as a `Registration` (deposit, block,
//! info). A whole manifest (kilobytes of JSON) does not fit: on subtensor
//! the chain holds the schedule only, and manifest documents come from the
//! nodes that serve them (`GET /v1/manifests/{id}`), checked against their
//! ids by the reader.
//!
//! Our field is `Raw{4 + 48·n}`: the tag `FRS1`, then the schedule's last
//! `n` ≤ [`MAX_ENTRIES`] entries, each the manifest id (32 bytes), the
//! first block and the last-plus-one block it is served at (u64 little
//! endian, `u64::MAX` for "no successor yet"). Two entries cover every
//! moment of an upgrade (one moves at a time: the retiring and the active
//! model, or the active and a pending one); older entries are retired and
//! need no reader. The owner's other fields are kept as they are.

use fractal_protocol::schedule::{ModelSchedule, ScheduledModel};
use fractal_protocol::{Digest32, ManifestId};
use subxt::dynamic::Value;
use subxt::ext::scale_value::{Composite, ValueDef};

use crate::ChainError;

/// The tag that marks our field among the owner's commitment fields.
pub const TAG: &[u8; 4] = b"FRS1";
/// Schedule entries a field holds (4 + 2 · 48 = 100 of `Raw128`'s bytes).
pub const MAX_ENTRIES: usize = 2;
/// Fields one commitment may hold (`Commitments::MaxFields`).
pub const MAX_FIELDS: usize = 3;
const ENTRY_BYTES: usize = 48;

/// Our field's bytes for `schedule` (its last [`MAX_ENTRIES`] entries).
pub fn encode_schedule(schedule: &ModelSchedule) -> Vec<u8> {
    let skip = schedule.entries.len().saturating_sub(MAX_ENTRIES);
    let mut out = TAG.to_vec();
    for e in &schedule.entries[skip..] {
        out.extend_from_slice(&e.manifest.0 .0);
        out.extend_from_slice(&e.from_block.to_le_bytes());
        out.extend_from_slice(&e.until_block.unwrap_or(u64::MAX).to_le_bytes());
    }
    out
}

/// The schedule in our field's bytes; `None` when the bytes are not ours
/// (another use of the owner's commitment).
pub fn decode_schedule(bytes: &[u8]) -> Result<Option<ModelSchedule>, ChainError> {
    let Some(body) = bytes.strip_prefix(TAG) else {
        return Ok(None);
    };
    let malformed =
        |why: String| ChainError::Invalid(format!("the owner's schedule commitment: {why}"));
    if body.len() % ENTRY_BYTES != 0 || body.len() / ENTRY_BYTES > MAX_ENTRIES {
        return Err(malformed(format!("{} bytes after the tag", body.len())));
    }
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let entries = body
        .chunks(ENTRY_BYTES)
        .map(|c| ScheduledModel {
            manifest: ManifestId(Digest32(c[..32].try_into().expect("32 bytes"))),
            from_block: u64_at(&c[32..40]),
            until_block: Some(u64_at(&c[40..48])).filter(|&u| u != u64::MAX),
        })
        .collect();
    let schedule = ModelSchedule { entries };
    schedule.validate().map_err(|e| malformed(e.to_string()))?;
    Ok(Some(schedule))
}

/// `Data::Raw{n}` holding `bytes` (at most 128).
fn raw_field(bytes: &[u8]) -> Value {
    Value::variant(
        format!("Raw{}", bytes.len()),
        Composite::unnamed([Value::from_bytes(bytes)]),
    )
}

/// The raw bytes of a `Data::Raw{n}` field; `None` for any other variant.
fn raw_bytes(field: &Value) -> Option<Vec<u8>> {
    let ValueDef::Variant(v) = &field.value else {
        return None;
    };
    v.name.strip_prefix("Raw")?.parse::<u8>().ok()?;
    let inner = v.values.values().next()?;
    let ValueDef::Composite(bytes) = &inner.value else {
        return None;
    };
    bytes
        .values()
        .map(|b| b.as_u128().and_then(|x| u8::try_from(x).ok()))
        .collect()
}

/// The fields of a `CommitmentOf` entry (a `Registration`).
pub fn registration_fields(registration: &Value) -> Result<Vec<Value>, ChainError> {
    let bad = || {
        ChainError::Transport(
            "decoding CommitmentOf: not a Registration { info: { fields } }".into(),
        )
    };
    let info = field_named(registration, "info").ok_or_else(bad)?;
    let mut fields = field_named(info, "fields").ok_or_else(bad)?;
    // A `BoundedVec` is a newtype around the `Vec`: look through it.
    while let ValueDef::Composite(Composite::Unnamed(inner)) = &fields.value {
        match inner.as_slice() {
            [only] if matches!(only.value, ValueDef::Composite(_)) => fields = only,
            items => return Ok(items.to_vec()),
        }
    }
    Err(bad())
}

fn field_named<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match &v.value {
        ValueDef::Composite(Composite::Named(fields)) => {
            fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
        }
        _ => None,
    }
}

/// The schedule among a commitment's fields (none: the owner never
/// scheduled anything, so nothing is pinned).
pub fn schedule_in(fields: &[Value]) -> Result<ModelSchedule, ChainError> {
    for f in fields {
        if let Some(s) = raw_bytes(f)
            .map(|b| decode_schedule(&b))
            .transpose()?
            .flatten()
        {
            return Ok(s);
        }
    }
    Ok(ModelSchedule::default())
}

/// The commitment fields to set for `schedule`: the owner's other fields
/// as they are, ours replaced (or added, when there is room).
pub fn fields_with(existing: &[Value], schedule: &ModelSchedule) -> Result<Vec<Value>, ChainError> {
    let ours = |f: &Value| raw_bytes(f).is_some_and(|b| b.starts_with(TAG));
    let mut fields: Vec<Value> = existing.iter().filter(|f| !ours(f)).cloned().collect();
    if fields.len() >= MAX_FIELDS {
        return Err(ChainError::Invalid(format!(
            "the subnet owner's commitment already holds {MAX_FIELDS} other fields: no room for the model schedule"
        )));
    }
    fields.push(raw_field(&encode_schedule(schedule)));
    Ok(fields)
}

/// `Commitments::set_commitment(netuid, { fields })`.
pub fn set_commitment(netuid: u16, fields: Vec<Value>) -> subxt::tx::DynamicPayload<Vec<Value>> {
    subxt::dynamic::transaction(
        "Commitments",
        "set_commitment",
        vec![
            Value::u128(netuid as u128),
            Value::named_composite([("fields", Value::unnamed_composite(fields))]),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractal_protocol::Upgrade;

    fn id(b: u8) -> ManifestId {
        ManifestId(Digest32([b; 32]))
    }

    #[test]
    fn the_last_two_entries_round_trip_in_100_bytes() {
        let s = ModelSchedule::default()
            .with_upgrade(
                Upgrade {
                    manifest: id(1),
                    at_block: 10,
                    grace_blocks: 5,
                },
                0,
            )
            .unwrap()
            .with_upgrade(
                Upgrade {
                    manifest: id(2),
                    at_block: 20,
                    grace_blocks: 5,
                },
                11,
            )
            .unwrap()
            .with_upgrade(
                Upgrade {
                    manifest: id(3),
                    at_block: 40,
                    grace_blocks: 9,
                },
                30,
            )
            .unwrap();
        let bytes = encode_schedule(&s);
        assert_eq!(bytes.len(), 100);
        let back = decode_schedule(&bytes).unwrap().unwrap();
        assert_eq!(back.entries, s.entries[1..]);
        // What readers need at any block from the previous switch on.
        for block in [25, 40, 45, 49, 60] {
            assert_eq!(back.served_at(block), s.served_at(block), "block {block}");
        }
        assert_eq!(decode_schedule(b"other data").unwrap(), None);
        assert!(decode_schedule(&bytes[..60]).is_err(), "truncated");
        assert!(decode_schedule(TAG).unwrap().unwrap().entries.is_empty());
    }

    #[test]
    fn other_fields_of_the_owner_are_kept() {
        let s = ModelSchedule::default()
            .with_upgrade(
                Upgrade {
                    manifest: id(1),
                    at_block: 10,
                    grace_blocks: 5,
                },
                0,
            )
            .unwrap();
        let theirs = raw_field(b"their model hash");
        let old_ours = raw_field(&encode_schedule(&ModelSchedule::default()));
        let fields = fields_with(&[theirs.clone(), old_ours], &s).unwrap();
        assert_eq!(fields.len(), 2);
        assert_eq!(fields[0], theirs);
        assert_eq!(schedule_in(&fields).unwrap(), s);
        let full = vec![theirs.clone(), theirs.clone(), theirs];
        assert!(fields_with(&full, &s).is_err());
    }
}
