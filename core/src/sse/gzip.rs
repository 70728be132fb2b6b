//! An event stream's gzip coding built from frames compressed once each, for every client.
//!
//! A 2,000-flag frame is ~130 KB of JSON that gzip shrinks ~10×, and a change sends it to every
//! client: compressing each client's stream on its own would cost CPU per client and per change.
//! Instead each frame is deflated once into a [`Segment`]: blocks that reference only the
//! frame's own bytes and end byte-aligned with a sync flush (an empty stored block). Any
//! sequence of segments after [`HEADER`] is then one valid gzip body (RFC 1952), whatever frames
//! a given client got or skipped, and a client's decoder yields each frame as soon as its segment
//! arrives. A body that ends cleanly writes its [`Trailer`] (final block, CRC-32 and length of
//! what that client got); per client that costs one CRC combine per frame, never a pass over the
//! bytes.

use bytes::Bytes;

use crate::encoding::{self, Encoding, GZIP_LEVEL, MIN_COMPRESS_BYTES};

/// The gzip member header every gzip-coded stream starts with: deflate, no name, no mtime,
/// unknown OS.
pub const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// The coding of an event stream whose frames are about `frame_len` bytes, for a client that
/// sent `accept_encoding`: gzip when the client accepts it and the frames are large enough for
/// it to pay (identity otherwise, as before; brotli has no equivalent of a shared segment here).
/// `None`: the size is not known yet (an object with no snapshot yet); gzip then still costs
/// only 5 bytes per small frame (stored, not compressed).
pub fn stream_coding(accept_encoding: Option<&str>, frame_len: Option<usize>) -> Encoding {
    if frame_len.is_some_and(|len| len < MIN_COMPRESS_BYTES) {
        return Encoding::Identity;
    }
    match accept_encoding {
        Some(header) => encoding::negotiate(header, false, true),
        None => Encoding::Identity,
    }
}

/// One frame in the stream's gzip coding, shared by every client that gets the frame.
///
/// Its bytes sit inside a whole gzip member of the frame alone ([`Segment::member`]: header,
/// segment, final block, CRC and length), in one allocation: a WebSocket client that asked for
/// gzip gets that member as one binary message, decodable on its own, at no second copy.
#[derive(Clone, Debug)]
pub struct Segment {
    /// A slice of `member`.
    bytes: Bytes,
    member: Bytes,
    /// CRC-32 of the frame, for the trailers of the bodies that carry it.
    crc: crc32fast::Hasher,
    len: u64,
}

/// The keepalive comment as every gzip-coded stream sends it.
pub fn keepalive() -> &'static Segment {
    static KEEPALIVE: std::sync::OnceLock<Segment> = std::sync::OnceLock::new();
    KEEPALIVE.get_or_init(|| Segment::encode(super::KEEPALIVE))
}

/// The first bytes of a gzip-coded stream whose first frame is `preamble`: the gzip header and
/// the preamble's segment (counted in `trailer`).
pub fn head(preamble: &[u8], trailer: &mut Trailer) -> Bytes {
    let segment = Segment::encode(preamble);
    trailer.add(&segment);
    // The segment already sits after the header in its member's buffer: no copy.
    let member = segment.member();
    member.slice(..HEADER.len() + segment.bytes().len())
}

/// The largest stored block deflate allows.
const MAX_STORED: usize = 0xffff;

/// The level of a segment made for one client (a per-user frame): ~3× faster than
/// [`GZIP_LEVEL`] for ~30 % more bytes (2,000-flag frame, native: 176 µs and 7.4 KB vs 523 µs
/// and 5.7 KB), since that work is done per client and per change.
pub const ONE_CLIENT_LEVEL: u32 = 1;

impl Segment {
    /// `frame` compressed for every client that gets it (stored as-is when it is small:
    /// deflating a few bytes gains nothing).
    pub fn encode(frame: &[u8]) -> Self {
        Self::encode_at(frame, GZIP_LEVEL)
    }

    /// `frame` compressed for one client only (a per-user frame), at [`ONE_CLIENT_LEVEL`].
    pub fn encode_for_one(frame: &[u8]) -> Self {
        Self::encode_at(frame, ONE_CLIENT_LEVEL)
    }

    fn encode_at(frame: &[u8], level: u32) -> Self {
        let mut crc = crc32fast::Hasher::new();
        crc.update(frame);
        let mut out = Vec::with_capacity(HEADER.len() + frame.len() / 4 + 64);
        out.extend_from_slice(&HEADER);
        if frame.len() < MIN_COMPRESS_BYTES || deflate(frame, level, &mut out).is_none() {
            out.truncate(HEADER.len());
            stored(frame, &mut out);
        }
        let end = out.len();
        let mut segment = Self {
            bytes: Bytes::new(),
            member: Bytes::new(),
            crc,
            len: frame.len() as u64,
        };
        let mut trailer = Trailer::default();
        trailer.add(&segment);
        // Exact: the compressor's spare room may be full, and doubling would be kept.
        out.reserve_exact(10);
        out.extend_from_slice(&trailer.finish());
        segment.member = Bytes::from(out);
        segment.bytes = segment.member.slice(HEADER.len()..end);
        segment
    }

    /// The segment's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The frame alone as one whole gzip member (RFC 1952): [`HEADER`], this segment, the
    /// final block, and the frame's CRC-32 and length. Shares the segment's allocation.
    pub fn member(&self) -> &Bytes {
        &self.member
    }

    /// The length of the frame it encodes.
    pub fn frame_len(&self) -> u64 {
        self.len
    }
}

/// Appends `frame` to `out` as stored (uncompressed) deflate blocks, none final.
fn stored(frame: &[u8], out: &mut Vec<u8>) {
    out.reserve(frame.len() + 5 * (frame.len() / MAX_STORED + 1));
    let mut chunks = frame.chunks(MAX_STORED).peekable();
    if chunks.peek().is_none() {
        // An empty frame is an empty stored block: still a valid, byte-aligned segment.
        out.extend_from_slice(&[0, 0, 0, 0xff, 0xff]);
    }
    for chunk in chunks {
        // BFINAL 0, BTYPE 00, padded to the byte; then LEN and its complement, little-endian.
        let len = u16::try_from(chunk.len()).unwrap_or(u16::MAX);
        out.push(0);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Appends `frame` to `out` deflated from a fresh state and sync-flushed; `None` if the
/// compressor failed (`out` then holds a partial segment after what it had).
fn deflate(frame: &[u8], level: u32, out: &mut Vec<u8>) -> Option<()> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut compress = Compress::new(Compression::new(level), false);
    // Bounded: each round either consumes input or fills the spare room it was given, and the
    // room doubles; a compressor that does neither is given up on.
    for _ in 0..64 {
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(1024));
        }
        let consumed = usize::try_from(compress.total_in()).ok()?;
        let before = (compress.total_in(), compress.total_out());
        compress
            .compress_vec(frame.get(consumed..)?, out, FlushCompress::Sync)
            .ok()?;
        let done = usize::try_from(compress.total_in()).ok()? == frame.len();
        // The flush is complete once the compressor stops short of the room it had.
        if done && out.len() < out.capacity() {
            return Some(());
        }
        if (compress.total_in(), compress.total_out()) == before && out.len() < out.capacity() {
            return None;
        }
    }
    None
}

/// What one gzip-coded body has carried so far: the end of a body that closes cleanly.
#[derive(Clone, Debug, Default)]
pub struct Trailer {
    crc: crc32fast::Hasher,
    len: u64,
}

impl Trailer {
    /// Counts `segment` as sent on this body.
    pub fn add(&mut self, segment: &Segment) {
        self.crc.combine(&segment.crc);
        self.len += segment.len;
    }

    /// The bytes that end the body: an empty final block, then the CRC-32 and length (mod 2³²)
    /// of everything the body carried.
    pub fn finish(&self) -> [u8; 10] {
        let mut out = [0u8; 10];
        // BFINAL 1, BTYPE 01 (fixed Huffman), end-of-block code: 10 bits, padded.
        out[0] = 0x03;
        out[1] = 0x00;
        out[2..6].copy_from_slice(&self.crc.clone().finalize().to_le_bytes());
        #[allow(
            clippy::cast_possible_truncation,
            reason = "ISIZE is the length modulo 2^32 (RFC 1952)"
        )]
        let isize = self.len as u32;
        out[6..].copy_from_slice(&isize.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use proptest::prelude::*;

    use super::*;

    fn frame(n: usize, salt: u8) -> Vec<u8> {
        let mut out = b"event: flags\ndata: {".to_vec();
        for i in 0..n {
            out.extend_from_slice(
                format!("\"checkout-experiment-{i:05}-{salt}\":{{\"enabled\":true}},").as_bytes(),
            );
        }
        out.extend_from_slice(b"}\n\n");
        out
    }

    fn body(frames: &[&[u8]], close: bool) -> (Vec<u8>, Vec<u8>) {
        let mut body = HEADER.to_vec();
        let mut plain = Vec::new();
        let mut trailer = Trailer::default();
        for frame in frames {
            let segment = Segment::encode(frame);
            body.extend_from_slice(segment.bytes());
            trailer.add(&segment);
            plain.extend_from_slice(frame);
        }
        if close {
            body.extend_from_slice(&trailer.finish());
        }
        (body, plain)
    }

    fn gunzip(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut out)
            .expect("a valid gzip body");
        out
    }

    #[test]
    fn segments_make_one_valid_gzip_body_with_its_trailer() {
        let big = frame(2000, 1);
        let other = frame(1500, 2);
        let (mut body, mut plain) =
            body(&[b"retry: 2000\n\n", &big, b":\n\n", &other, &big], false);
        // A segment made for one client mixes with the shared ones.
        let mut trailer = Trailer::default();
        for frame in [&b"retry: 2000\n\n"[..], &big, b":\n\n", &other, &big] {
            trailer.add(&Segment::encode(frame));
        }
        let own = Segment::encode_for_one(&other);
        assert!(own.bytes().len() * 5 < other.len());
        body.extend_from_slice(own.bytes());
        trailer.add(&own);
        plain.extend_from_slice(&other);
        body.extend_from_slice(&trailer.finish());
        assert_eq!(gunzip(&body), plain);
        // Shared segments really are compressed: the 2,000-flag frame shrinks ~10×.
        assert!(Segment::encode(&big).bytes().len() * 5 < big.len());
    }

    #[test]
    fn each_frame_decodes_as_soon_as_its_segment_arrives() {
        let big = frame(300, 3);
        let frames: [&[u8]; 3] = [b"retry: 2000\n\n", &big, b":\n\n"];
        let mut decoder = flate2::Decompress::new(false);
        let mut got = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        // The header is not part of the raw deflate stream the decoder reads.
        for frame in frames {
            pending.extend_from_slice(Segment::encode(frame).bytes());
            let mut out = Vec::with_capacity(frame.len() + 64);
            let before = decoder.total_in();
            decoder
                .decompress_vec(&pending, &mut out, flate2::FlushDecompress::Sync)
                .expect("valid deflate");
            let used = usize::try_from(decoder.total_in() - before).expect("fits");
            pending.drain(..used);
            assert_eq!(out, frame, "the whole frame, with no more bytes needed");
            got.extend_from_slice(&out);
        }
        assert!(pending.is_empty());
    }

    #[test]
    fn empty_and_oversized_stored_frames_are_valid() {
        let large_incompressible: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let mut body = HEADER.to_vec();
        stored(b"", &mut body);
        stored(&large_incompressible, &mut body);
        let mut trailer = Trailer::default();
        trailer.add(&Segment::encode(b""));
        trailer.add(&Segment::encode(&large_incompressible));
        body.extend_from_slice(&trailer.finish());
        assert_eq!(gunzip(&body), large_incompressible);
    }

    #[test]
    fn each_segment_is_also_a_whole_member_of_its_frame_alone() {
        let big = frame(2000, 4);
        let incompressible: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        for segment in [
            Segment::encode(&big),
            Segment::encode_for_one(&big),
            Segment::encode(b"retry: 2000\n\n"),
            Segment::encode(b""),
            Segment::encode(&incompressible),
        ] {
            let member = segment.member();
            let plain = gunzip(member);
            assert_eq!(plain.len() as u64, segment.frame_len());
            // The segment is the member's middle: one allocation for both.
            assert_eq!(&member[..HEADER.len()], &HEADER[..]);
            assert_eq!(
                &member[HEADER.len()..member.len() - 10],
                &segment.bytes()[..]
            );
            assert_eq!(
                member[HEADER.len()..].as_ptr(),
                segment.bytes().as_ptr(),
                "no second copy"
            );
        }
        assert_eq!(gunzip(Segment::encode(&big).member()), big);
        assert_eq!(
            gunzip(Segment::encode(&incompressible).member()),
            incompressible
        );
        assert!(Segment::encode(&big).member().len() * 5 < big.len());
    }

    #[test]
    fn the_coding_is_gzip_only_when_accepted_and_worth_it() {
        let big = Some(130_000);
        assert_eq!(
            stream_coding(Some("gzip, deflate, br"), big),
            Encoding::Gzip
        );
        assert_eq!(stream_coding(Some("gzip;q=0, br"), big), Encoding::Identity);
        assert_eq!(stream_coding(Some("br"), big), Encoding::Identity);
        assert_eq!(stream_coding(None, big), Encoding::Identity);
        assert_eq!(stream_coding(Some("gzip"), Some(300)), Encoding::Identity);
        assert_eq!(stream_coding(Some("gzip"), None), Encoding::Gzip);
    }

    proptest! {
        #[test]
        fn any_frames_in_any_order_decode_to_their_concatenation(
            frames in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..3000),
                    (1usize..400, any::<u8>()).prop_map(|(n, salt)| frame(n, salt)),
                ],
                0..6,
            ),
            close in any::<bool>(),
        ) {
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let (body, plain) = body(&refs, close);
            if close {
                prop_assert_eq!(gunzip(&body), plain);
            } else {
                // Without the trailer a streaming decoder still yields every byte.
                let mut decoder = flate2::Decompress::new(false);
                let mut out = Vec::with_capacity(plain.len() + 64);
                decoder
                    .decompress_vec(&body[HEADER.len()..], &mut out, flate2::FlushDecompress::Sync)
                    .expect("valid deflate");
                prop_assert_eq!(out, plain);
            }
        }
    }
}
