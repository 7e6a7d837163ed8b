//! Video files from RGB8 frames: MP4 (H.264 via openh264, built from source,
//! muxed by the pure-Rust `mp4` crate), animated GIF and PNG thumbnails.
//!
//! H.264 from a source build carries no patent licence; GIF and PNG are the
//! licence-free outputs (see README).

use std::io::Cursor;

use openh264::encoder::{Encoder, EncoderConfig, FrameRate, QpRange, RateControlMode};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;

/// Frames to encode: `count` RGB8 frames of `width x height`, row-major.
#[derive(Clone, Copy)]
pub struct Frames<'a> {
    pub rgb: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub count: usize,
    pub fps: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error(
        "frame data is {got} bytes, expected {expected} ({count} frames of {width}x{height} RGB)"
    )]
    Size {
        got: usize,
        expected: usize,
        count: usize,
        width: usize,
        height: usize,
    },
    #[error("H.264 needs even width and height, got {0}x{1}")]
    OddSize(usize, usize),
    #[error("fps must be 1..=120")]
    Fps,
    #[error("H.264 encoder: {0}")]
    H264(String),
    #[error("MP4 muxer: {0}")]
    Mux(String),
    #[error("not a readable H.264 MP4: {0}")]
    Demux(String),
    #[error("GIF encoder: {0}")]
    Gif(String),
    #[error("PNG encoder: {0}")]
    Png(String),
}

impl Frames<'_> {
    fn check(&self) -> Result<(), VideoError> {
        let expected = self.count * self.width * self.height * 3;
        if self.rgb.len() != expected || self.count == 0 || self.width == 0 || self.height == 0 {
            return Err(VideoError::Size {
                got: self.rgb.len(),
                expected,
                count: self.count,
                width: self.width,
                height: self.height,
            });
        }
        if self.fps == 0 || self.fps > 120 {
            return Err(VideoError::Fps);
        }
        Ok(())
    }

    pub fn frame(&self, i: usize) -> &[u8] {
        let n = self.width * self.height * 3;
        &self.rgb[i * n..(i + 1) * n]
    }
}

/// Splits openh264's Annex B output into NAL units (without start codes).
fn nal_units(annex_b: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= annex_b.len() {
        if annex_b[i] == 0 && annex_b[i + 1] == 0 && annex_b[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (k, &s) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(annex_b.len(), |&n| n - 3);
        // A 4-byte start code leaves one zero at the end of the previous unit.
        while end > s && annex_b[end - 1] == 0 && k + 1 < starts.len() {
            end -= 1;
        }
        out.push(&annex_b[s..end]);
    }
    out
}

/// H.264 in an MP4 container that browsers, ffprobe and players open.
/// Deterministic: the same frames give the same bytes (single-threaded encoder,
/// fixed quality, fixed timestamps).
pub fn encode_mp4(f: Frames<'_>) -> Result<Vec<u8>, VideoError> {
    f.check()?;
    if !f.width.is_multiple_of(2) || !f.height.is_multiple_of(2) {
        return Err(VideoError::OddSize(f.width, f.height));
    }
    let config = EncoderConfig::new()
        .max_frame_rate(FrameRate::from_hz(f.fps as f32))
        // No rate control: a fixed quantiser keeps every frame (and the bytes
        // deterministic) without openh264's bitrate warnings.
        .rate_control_mode(RateControlMode::Off)
        .qp(QpRange::new(18, 18))
        .skip_frames(false)
        .num_threads(1);
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| VideoError::H264(e.to_string()))?;
    let (mut sps, mut pps) = (None::<Vec<u8>>, None::<Vec<u8>>);
    let mut samples: Vec<(Vec<u8>, bool)> = Vec::with_capacity(f.count);
    for i in 0..f.count {
        let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(f.frame(i), (f.width, f.height)));
        let bitstream = encoder
            .encode(&yuv)
            .map_err(|e| VideoError::H264(e.to_string()))?;
        let annex_b = bitstream.to_vec();
        let mut sample = Vec::new();
        let mut sync = false;
        for nal in nal_units(&annex_b) {
            match nal.first().map(|b| b & 0x1f) {
                Some(7) => sps = Some(nal.to_vec()),
                Some(8) => pps = Some(nal.to_vec()),
                Some(t) => {
                    sync |= t == 5;
                    sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    sample.extend_from_slice(nal);
                }
                None => {}
            }
        }
        if sample.is_empty() {
            return Err(VideoError::H264(format!(
                "encoder produced no picture for frame {i}"
            )));
        }
        samples.push((sample, sync));
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err(VideoError::H264("no SPS/PPS in the stream".into()));
    };

    let timescale = 1000 * f.fps;
    let cfg = mp4::Mp4Config {
        major_brand: str::parse("isom").expect("brand"),
        minor_version: 512,
        compatible_brands: ["isom", "iso2", "avc1", "mp41"]
            .iter()
            .map(|b| str::parse(b).expect("brand"))
            .collect(),
        timescale: 1000,
    };
    let mut w = mp4::Mp4Writer::write_start(Cursor::new(Vec::new()), &cfg)
        .map_err(|e| VideoError::Mux(e.to_string()))?;
    let track = mp4::TrackConfig {
        track_type: mp4::TrackType::Video,
        timescale,
        language: "und".into(),
        media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
            width: f.width as u16,
            height: f.height as u16,
            seq_param_set: sps,
            pic_param_set: pps,
        }),
    };
    w.add_track(&track)
        .map_err(|e| VideoError::Mux(e.to_string()))?;
    let duration = timescale / f.fps;
    for (i, (bytes, is_sync)) in samples.into_iter().enumerate() {
        let sample = mp4::Mp4Sample {
            start_time: i as u64 * duration as u64,
            duration,
            rendering_offset: 0,
            is_sync,
            bytes: bytes.into(),
        };
        w.write_sample(1, &sample)
            .map_err(|e| VideoError::Mux(e.to_string()))?;
    }
    w.write_end().map_err(|e| VideoError::Mux(e.to_string()))?;
    Ok(w.into_writer().into_inner())
}

/// An endlessly looping animated GIF (each frame quantised to its own palette).
pub fn encode_gif(f: Frames<'_>) -> Result<Vec<u8>, VideoError> {
    f.check()?;
    let (w, h) = (
        u16::try_from(f.width).map_err(|_| VideoError::Gif("too wide".into()))?,
        u16::try_from(f.height).map_err(|_| VideoError::Gif("too tall".into()))?,
    );
    let mut out = Vec::new();
    {
        let mut enc =
            gif::Encoder::new(&mut out, w, h, &[]).map_err(|e| VideoError::Gif(e.to_string()))?;
        enc.set_repeat(gif::Repeat::Infinite)
            .map_err(|e| VideoError::Gif(e.to_string()))?;
        let delay = (100 / f.fps).max(1) as u16;
        for i in 0..f.count {
            let mut frame = gif::Frame::from_rgb_speed(w, h, f.frame(i), 10);
            frame.delay = delay;
            enc.write_frame(&frame)
                .map_err(|e| VideoError::Gif(e.to_string()))?;
        }
    }
    Ok(out)
}

/// One frame as PNG (the thumbnail is the middle frame).
pub fn encode_png(rgb: &[u8], width: usize, height: usize) -> Result<Vec<u8>, VideoError> {
    if rgb.len() != width * height * 3 {
        return Err(VideoError::Size {
            got: rgb.len(),
            expected: width * height * 3,
            count: 1,
            width,
            height,
        });
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .map_err(|e| VideoError::Png(e.to_string()))?;
        w.write_image_data(rgb)
            .map_err(|e| VideoError::Png(e.to_string()))?;
    }
    Ok(out)
}

pub fn thumbnail_png(f: Frames<'_>) -> Result<Vec<u8>, VideoError> {
    f.check()?;
    encode_png(f.frame(f.count / 2), f.width, f.height)
}

/// PSNR of the BT.601 luma planes of two RGB8 images, in dB.
pub fn psnr_luma(a: &[u8], b: &[u8]) -> f64 {
    let luma = |rgb: &[u8]| -> Vec<u8> {
        rgb.chunks_exact(3)
            .map(|p| {
                (0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64).round() as u8
            })
            .collect()
    };
    if a.len() != b.len() || !a.len().is_multiple_of(3) {
        return 0.0;
    }
    psnr_rgb8(&luma(a), &luma(b))
}

/// Which boxes may appear where, and how many bytes of fields precede a
/// container's children. It is the layout [`encode_mp4`] writes, plus
/// harmless optional boxes.
struct BoxLevel {
    allowed: &'static [(&'static [u8; 4], usize, Option<&'static BoxLevel>)],
}

const LEAF: Option<&BoxLevel> = None;
const TOP_LEVEL: &BoxLevel = &BoxLevel {
    allowed: &[
        (b"ftyp", 0, LEAF),
        (b"mdat", 0, LEAF),
        (b"free", 0, LEAF),
        // C2PA content credentials: the gateway's signed copies carry their
        // manifest in a top-level uuid box, which demuxers skip.
        (b"uuid", 0, LEAF),
        (b"moov", 0, Some(&MOOV)),
    ],
};
const MOOV: BoxLevel = BoxLevel {
    allowed: &[(b"mvhd", 0, LEAF), (b"trak", 0, Some(&TRAK))],
};
const TRAK: BoxLevel = BoxLevel {
    allowed: &[(b"tkhd", 0, LEAF), (b"mdia", 0, Some(&MDIA))],
};
const MDIA: BoxLevel = BoxLevel {
    allowed: &[
        (b"mdhd", 0, LEAF),
        (b"hdlr", 0, LEAF),
        (b"minf", 0, Some(&MINF)),
    ],
};
const MINF: BoxLevel = BoxLevel {
    allowed: &[
        (b"vmhd", 0, LEAF),
        (b"dinf", 0, Some(&DINF)),
        (b"stbl", 0, Some(&STBL)),
    ],
};
const DINF: BoxLevel = BoxLevel {
    // dref: version, flags and an entry count before its entries.
    allowed: &[(b"dref", 8, Some(&DREF))],
};
const DREF: BoxLevel = BoxLevel {
    allowed: &[(b"url ", 0, LEAF)],
};
const STBL: BoxLevel = BoxLevel {
    allowed: &[
        // stsd: version, flags and an entry count before its entries.
        (b"stsd", 8, Some(&STSD)),
        (b"stts", 0, LEAF),
        (b"ctts", 0, LEAF),
        (b"stss", 0, LEAF),
        (b"stsc", 0, LEAF),
        (b"stsz", 0, LEAF),
        (b"stco", 0, LEAF),
        (b"co64", 0, LEAF),
    ],
};
const STSD: BoxLevel = BoxLevel {
    // avc1: the 78 bytes of a visual sample entry before its boxes.
    allowed: &[(b"avc1", 78, Some(&AVC1))],
};
const AVC1: BoxLevel = BoxLevel {
    allowed: &[
        (b"avcC", 0, LEAF),
        (b"btrt", 0, LEAF),
        (b"pasp", 0, LEAF),
        (b"colr", 0, LEAF),
    ],
};

/// Walks the box tree in `bytes[start..end]` before the `mp4` crate sees
/// it: every box must be a kind expected at its place, at least a header
/// long and inside its parent. The crate loops forever on a child box of
/// size 0 (it seeks back to the same header), so a malicious prover could
/// otherwise hang whoever checks its video; found by `scripts/fuzz`.
fn check_boxes(bytes: &[u8], start: usize, end: usize, level: &BoxLevel) -> Result<(), VideoError> {
    let bad = |what: String| Err(VideoError::Demux(what));
    let mut at = start;
    while at < end {
        if end - at < 8 {
            return bad(format!("truncated box header at byte {at}"));
        }
        let size = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let kind: [u8; 4] = bytes[at + 4..at + 8].try_into().expect("4 bytes");
        let name = String::from_utf8_lossy(&kind).into_owned();
        // 0 ("to the end") and 1 (64-bit size) are legal MP4 but never
        // written by encode_mp4; refusing them keeps the walk simple.
        if size < 8 || size > end - at {
            return bad(format!(
                "box {name:?} at byte {at} has size {size}, outside its parent"
            ));
        }
        let Some(&(_, fields, children)) = level.allowed.iter().find(|(k, _, _)| **k == kind)
        else {
            return bad(format!("unexpected box {name:?} at byte {at}"));
        };
        if let Some(children) = children {
            if size < 8 + fields {
                return bad(format!("box {name:?} at byte {at} is too short"));
            }
            check_boxes(bytes, at + 8 + fields, at + size, children)?;
        }
        at += size;
    }
    Ok(())
}

/// Decoded RGB8 frames of an MP4 (the first video track), in order.
pub struct DecodedVideo {
    pub width: usize,
    pub height: usize,
    /// `width * height * 3` bytes each.
    pub frames: Vec<Vec<u8>>,
}

/// Demuxes and decodes an H.264 MP4 such as [`encode_mp4`] writes, so a
/// verifier can compare the video a prover returned with its own decode.
/// Bounded: at most `max_frames` frames of at most 4096x4096.
///
/// The input comes from provers, so it may be hostile. The box tree is
/// checked first (see [`check_boxes`]), and a panic inside the `mp4`
/// crate on a malformed table (fuzzing found a division by zero for a
/// chunk of zero samples) is turned into an error instead of taking the
/// caller's task down.
pub fn decode_mp4(bytes: &[u8], max_frames: usize) -> Result<DecodedVideo, VideoError> {
    check_boxes(bytes, 0, bytes.len(), TOP_LEVEL)?;
    std::panic::catch_unwind(|| decode_checked_mp4(bytes, max_frames)).unwrap_or_else(|_| {
        Err(VideoError::Demux(
            "malformed MP4 (the demuxer gave up on it)".into(),
        ))
    })
}

fn decode_checked_mp4(bytes: &[u8], max_frames: usize) -> Result<DecodedVideo, VideoError> {
    use openh264::decoder::Decoder;
    use openh264::formats::YUVSource;
    let demux = |e: mp4::Error| VideoError::Demux(e.to_string());
    let mut reader =
        mp4::Mp4Reader::read_header(Cursor::new(bytes), bytes.len() as u64).map_err(demux)?;
    let (track_id, sps, pps, count) = {
        let mut ids: Vec<u32> = reader.tracks().keys().copied().collect();
        ids.sort_unstable();
        let track = ids
            .iter()
            .map(|id| &reader.tracks()[id])
            .find(|t| matches!(t.track_type(), Ok(mp4::TrackType::Video)))
            .ok_or_else(|| VideoError::Demux("no video track".into()))?;
        let (w, h) = (track.width() as usize, track.height() as usize);
        if w == 0 || h == 0 || w > 4096 || h > 4096 {
            return Err(VideoError::Demux(format!("unsupported size {w}x{h}")));
        }
        (
            track.track_id(),
            track.sequence_parameter_set().map_err(demux)?.to_vec(),
            track.picture_parameter_set().map_err(demux)?.to_vec(),
            track.sample_count(),
        )
    };
    if count as usize > max_frames {
        return Err(VideoError::Demux(format!(
            "{count} frames, more than the {max_frames} allowed"
        )));
    }
    let mut decoder = Decoder::new().map_err(|e| VideoError::H264(e.to_string()))?;
    let mut annex_b = Vec::new();
    for nal in [&sps, &pps] {
        annex_b.extend_from_slice(&[0, 0, 0, 1]);
        annex_b.extend_from_slice(nal);
    }
    let mut out = DecodedVideo {
        width: 0,
        height: 0,
        frames: Vec::new(),
    };
    let push = |yuv: &openh264::decoder::DecodedYUV<'_>, out: &mut DecodedVideo| {
        let (w, h) = yuv.dimensions();
        let mut rgb = vec![0u8; w * h * 3];
        yuv.write_rgb8(&mut rgb);
        out.width = w;
        out.height = h;
        out.frames.push(rgb);
    };
    for sample_id in 1..=count {
        let sample = reader
            .read_sample(track_id, sample_id)
            .map_err(demux)?
            .ok_or_else(|| VideoError::Demux(format!("sample {sample_id} missing")))?;
        // AVCC length-prefixed NAL units to Annex B start codes.
        let mut data = &sample.bytes[..];
        while !data.is_empty() {
            if data.len() < 4 {
                return Err(VideoError::Demux("truncated NAL length".into()));
            }
            let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let nal = data
                .get(4..4 + len)
                .ok_or_else(|| VideoError::Demux("truncated NAL unit".into()))?;
            annex_b.extend_from_slice(&[0, 0, 0, 1]);
            annex_b.extend_from_slice(nal);
            data = &data[4 + len..];
        }
        if let Some(yuv) = decoder
            .decode(&annex_b)
            .map_err(|e| VideoError::H264(e.to_string()))?
        {
            push(&yuv, &mut out);
        }
        annex_b.clear();
    }
    for yuv in decoder
        .flush_remaining()
        .map_err(|e| VideoError::H264(e.to_string()))?
    {
        push(&yuv, &mut out);
    }
    Ok(out)
}

/// Peak signal-to-noise ratio of two RGB8 images in dB (infinite when equal).
pub fn psnr_rgb8(a: &[u8], b: &[u8]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = *x as f64 - *y as f64;
            d * d
        })
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// `[F, 3, H, W]` in `[0, 1]` to RGB8 `F × H × W × 3`, rounded to nearest.
pub fn rgb8(frames: &candle_core::Tensor) -> Result<Vec<u8>, crate::EngineError> {
    let t = (frames.permute((0, 2, 3, 1))? * 255.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(candle_core::DType::U8)?;
    Ok(t.flatten_all()?.to_vec1::<u8>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(count: usize, w: usize, h: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(count * w * h * 3);
        for f in 0..count {
            for y in 0..h {
                for x in 0..w {
                    v.extend_from_slice(&[
                        (x * 255 / w) as u8,
                        (y * 255 / h) as u8,
                        (f * 255 / count) as u8,
                    ]);
                }
            }
        }
        v
    }

    #[test]
    fn mp4_is_deterministic_and_well_formed() {
        let rgb = gradient(6, 64, 48);
        let f = Frames {
            rgb: &rgb,
            width: 64,
            height: 48,
            count: 6,
            fps: 8,
        };
        let a = encode_mp4(f).unwrap();
        let b = encode_mp4(f).unwrap();
        assert_eq!(a, b);
        assert_eq!(&a[4..8], b"ftyp");
        let reader = mp4::Mp4Reader::read_header(Cursor::new(&a), a.len() as u64).unwrap();
        let track = reader.tracks().get(&1).unwrap();
        assert_eq!(track.sample_count(), 6);
        assert_eq!((track.width(), track.height()), (64, 48));
    }

    #[test]
    fn mp4_decodes_back_to_the_frames_it_encoded() {
        let rgb = gradient(5, 64, 48);
        let f = Frames {
            rgb: &rgb,
            width: 64,
            height: 48,
            count: 5,
            fps: 8,
        };
        let mp4 = encode_mp4(f).unwrap();
        let back = decode_mp4(&mp4, 100).unwrap();
        assert_eq!((back.width, back.height, back.frames.len()), (64, 48, 5));
        for (i, frame) in back.frames.iter().enumerate() {
            let psnr = psnr_rgb8(frame, f.frame(i));
            assert!(psnr > 35.0, "frame {i}: {psnr:.1} dB");
        }
        // A different picture is far off.
        assert!(psnr_rgb8(&back.frames[0], f.frame(4)) < 20.0);
        assert!(matches!(decode_mp4(&mp4, 4), Err(VideoError::Demux(_))));
        assert!(decode_mp4(b"not a video at all", 100).is_err());
        assert!(decode_mp4(&mp4[..mp4.len() / 2], 100).is_err());
    }

    /// The byte offset of the first `kind` box header in `mp4`.
    fn box_at(mp4: &[u8], kind: &[u8; 4]) -> usize {
        mp4.windows(4).position(|w| w == kind).unwrap() - 4
    }

    #[test]
    fn malformed_box_trees_are_errors_before_the_demuxer_loops() {
        let rgb = gradient(2, 16, 16);
        let f = Frames {
            rgb: &rgb,
            width: 16,
            height: 16,
            count: 2,
            fps: 8,
        };
        let mp4 = encode_mp4(f).unwrap();
        // A child box of size 0 inside trak made the mp4 crate loop forever.
        let mut zero = mp4.clone();
        let tkhd = box_at(&zero, b"tkhd");
        zero[tkhd..tkhd + 4].copy_from_slice(&0u32.to_be_bytes());
        let err = decode_mp4(&zero, 16).err().unwrap().to_string();
        assert!(err.contains("\"tkhd\"") && err.contains("size 0"), "{err}");
        // A child larger than its parent, and a box of a kind we never write.
        let mut big = mp4.clone();
        let mvhd = box_at(&big, b"mvhd");
        big[mvhd..mvhd + 4].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(decode_mp4(&big, 16).is_err());
        let mut odd = mp4.clone();
        let stss = box_at(&odd, b"stss");
        odd[stss + 4..stss + 8].copy_from_slice(b"udta");
        let err = decode_mp4(&odd, 16).err().unwrap().to_string();
        assert!(err.contains("unexpected box \"udta\""), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(64))]
        /// Verifiers and the gateway decode MP4s that provers send: corrupt
        /// ones must be errors, never panics or runaway allocations.
        #[test]
        fn corrupted_mp4s_are_errors_not_panics(
            edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 1..16),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let rgb = gradient(3, 32, 32);
            let f = Frames { rgb: &rgb, width: 32, height: 32, count: 3, fps: 8 };
            let mut mp4 = encode_mp4(f).unwrap();
            for (at, byte) in edits {
                let i = at.index(mp4.len());
                mp4[i] = byte;
            }
            let _ = decode_mp4(&mp4, 16);
            let _ = decode_mp4(&mp4[..cut.index(mp4.len())], 16);
        }
    }

    #[test]
    fn gif_and_png_are_well_formed() {
        let rgb = gradient(3, 16, 8);
        let f = Frames {
            rgb: &rgb,
            width: 16,
            height: 8,
            count: 3,
            fps: 4,
        };
        let g = encode_gif(f).unwrap();
        let mut dec = gif::DecodeOptions::new().read_info(&g[..]).unwrap();
        let mut n = 0;
        while dec.read_next_frame().unwrap().is_some() {
            n += 1;
        }
        assert_eq!((n, dec.width(), dec.height()), (3, 16, 8));
        let p = thumbnail_png(f).unwrap();
        let info = png::Decoder::new(&p[..])
            .read_info()
            .unwrap()
            .info()
            .clone();
        assert_eq!((info.width, info.height), (16, 8));
    }

    #[test]
    fn bad_frames_are_errors() {
        let rgb = gradient(2, 15, 8);
        assert!(matches!(
            encode_mp4(Frames {
                rgb: &rgb,
                width: 15,
                height: 8,
                count: 2,
                fps: 8
            }),
            Err(VideoError::OddSize(..))
        ));
        assert!(matches!(
            encode_gif(Frames {
                rgb: &rgb[1..],
                width: 15,
                height: 8,
                count: 2,
                fps: 8
            }),
            Err(VideoError::Size { .. })
        ));
        assert!(matches!(
            encode_gif(Frames {
                rgb: &rgb,
                width: 15,
                height: 8,
                count: 2,
                fps: 0
            }),
            Err(VideoError::Fps)
        ));
    }
}
