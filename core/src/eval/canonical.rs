//! A rule set's canonical JSON, written once while its rules compile: hashed on the way, and
//! kept deflated once it is large, since only persistence ever reads it back.
//!
//! A 2,000-flag rule set is ~0.5 MB of canonical JSON beside ~0.45 MB of compiled rules. Kept
//! as text it was the larger half of every rules snapshot, held twice while a change replaces
//! one (the old snapshot is served while the new one compiles), and the Worker's wasm memory
//! keeps that high-water mark. What reads it is rare: the content hash (taken here, as it is
//! written), the persisted snapshot (once per change, in a later turn) and the Worker relay's
//! snapshot read (once per front isolate and revision). `examples/change_memory.rs` measures it.

use std::borrow::Cow;
use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;
use sha2::{Digest, Sha256};

/// The prefix of a rule set's content hash: it keeps a rule set's hash apart from an evaluated
/// set's (`evaluated:`, in `snapshot.rs`) of the same bytes.
const HASH_PREFIX: &[u8] = b"rules:";

/// JSON up to this size is kept as text: smaller, the compressor's own state (~0.3 MB while it
/// runs) would cost more than it saves, and a small set's persistence stays a plain copy.
const KEEP_PLAIN_UP_TO: usize = 32 * 1024;

/// Deflate level 1: canonical rules JSON repeats its field names and operators, so the fastest
/// level already does most of the work (the bench's 2,000-flag set: 484 KB to 22 KB in 0.3 ms
/// natively; levels 2–6 give 18–19 KB for 3–5 times the time, on the change's path).
const LEVEL: u32 = 1;

/// The canonical JSON of one rule set and its content hash.
#[derive(Clone, Debug)]
pub(crate) struct CanonicalJson {
    stored: Stored,
    /// The JSON's length in bytes (what [`CanonicalJson::write_to`] appends).
    len: usize,
    /// 16 hex digits of SHA-256 over [`HASH_PREFIX`] and the JSON.
    content_hash: String,
}

#[derive(Clone, Debug)]
enum Stored {
    Plain(Box<str>),
    /// A raw deflate stream (no header) of the JSON.
    Deflated(Box<[u8]>),
}

impl CanonicalJson {
    /// `value` as canonical JSON (`serde_json`'s output: maps in key order, so equal content
    /// gives equal bytes). Serializing strings, numbers, booleans and string-keyed maps cannot
    /// fail; were it to, the JSON is `null`, which persists nothing restorable and hashes like
    /// no rule set.
    pub(crate) fn of<T: serde::Serialize + ?Sized>(value: &T) -> Self {
        let mut writer = CanonicalWriter::new();
        match serde_json::to_writer(&mut writer, value) {
            Ok(()) => writer.finish(),
            Err(_) => CanonicalWriter::null(),
        }
    }

    /// The content hash: 16 hex digits of SHA-256 over `rules:` and the JSON.
    pub(crate) fn content_hash(&self) -> &str {
        &self.content_hash
    }

    /// The JSON's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends the JSON to `out`. Inflating what this type deflated cannot fail; were it to,
    /// what was appended is taken back and `null` written instead (see [`CanonicalJson::of`]).
    pub(crate) fn write_to(&self, out: &mut Vec<u8>) {
        match &self.stored {
            Stored::Plain(json) => out.extend_from_slice(json.as_bytes()),
            Stored::Deflated(deflated) => {
                let start = out.len();
                out.reserve(self.len);
                let inflated = DeflateDecoder::new(&deflated[..]).read_to_end(out);
                if !matches!(inflated, Ok(n) if n == self.len) {
                    out.truncate(start);
                    out.extend_from_slice(b"null");
                }
            }
        }
    }

    /// The JSON as text: borrowed when kept as text, inflated otherwise.
    pub(crate) fn text(&self) -> Cow<'_, str> {
        match &self.stored {
            Stored::Plain(json) => Cow::Borrowed(json),
            Stored::Deflated(_) => {
                let mut out = Vec::new();
                self.write_to(&mut out);
                // `serde_json` writes UTF-8 and inflating gives back its bytes.
                Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| "null".to_owned()))
            }
        }
    }

    /// Whether the JSON is kept deflated.
    #[cfg(test)]
    pub(crate) fn is_deflated(&self) -> bool {
        matches!(self.stored, Stored::Deflated(_))
    }
}

/// Writes canonical JSON as it is produced, into a text buffer until that passes
/// [`KEEP_PLAIN_UP_TO`], then through a deflate stream, so a large set's JSON never exists whole
/// as text. Bytes are hashed and deflated a buffer at a time, not per token as `serde_json`
/// writes them.
pub(crate) struct CanonicalWriter {
    hasher: Sha256,
    /// Bytes hashed (and deflated, if deflating) so far.
    len: usize,
    /// Bytes not yet hashed: the whole text while it is small, then the next chunk for the
    /// encoder.
    buffer: Vec<u8>,
    encoder: Option<DeflateEncoder<Vec<u8>>>,
    /// The encoder refused a write (it writes to a `Vec`, so it cannot): the JSON becomes `null`.
    failed: bool,
}

impl CanonicalWriter {
    pub(crate) fn new() -> Self {
        let mut hasher = Sha256::new();
        hasher.update(HASH_PREFIX);
        Self {
            hasher,
            len: 0,
            buffer: Vec::new(),
            encoder: None,
            failed: false,
        }
    }

    /// Appends `bytes` to the JSON.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= KEEP_PLAIN_UP_TO {
            let encoder = self
                .encoder
                .get_or_insert_with(|| DeflateEncoder::new(Vec::new(), Compression::new(LEVEL)));
            if encoder.write_all(&self.buffer).is_err() {
                self.failed = true;
            }
            self.hasher.update(&self.buffer);
            self.len += self.buffer.len();
            self.buffer.clear();
        }
    }

    /// The JSON written, with its hash.
    pub(crate) fn finish(mut self) -> CanonicalJson {
        self.hasher.update(&self.buffer);
        let len = self.len + self.buffer.len();
        let stored = match self.encoder.take() {
            None => match String::from_utf8(std::mem::take(&mut self.buffer)) {
                Ok(text) => Stored::Plain(text.into_boxed_str()),
                Err(_) => return Self::null(),
            },
            Some(mut encoder) => {
                let written = encoder
                    .write_all(&self.buffer)
                    .and_then(|()| encoder.finish());
                match written {
                    Ok(deflated) if !self.failed => Stored::Deflated(deflated.into_boxed_slice()),
                    _ => return Self::null(),
                }
            }
        };
        CanonicalJson {
            stored,
            len,
            content_hash: crate::render::hex_prefix(&self.hasher.finalize()),
        }
    }

    /// `null` as canonical JSON, for a write that failed.
    fn null() -> CanonicalJson {
        let mut writer = Self::new();
        writer.push(b"null");
        writer.finish()
    }
}

impl Write for CanonicalWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.push(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(parts: &[&[u8]]) -> CanonicalJson {
        let mut writer = CanonicalWriter::new();
        for part in parts {
            writer.push(part);
        }
        writer.finish()
    }

    #[test]
    fn small_json_is_kept_as_text_and_large_json_deflated_both_read_back_whole() {
        let small = written(&[b"{\"a\":", b"1}"]);
        assert!(!small.is_deflated());
        assert_eq!(small.text(), "{\"a\":1}");
        assert_eq!(small.len(), 7);

        // Many small writes, as serde_json makes them, across the threshold.
        let entry = b"\"flag-0000\":{\"enabled\":true,\"rollout\":100},";
        let mut parts: Vec<&[u8]> = vec![b"{"];
        parts.extend(std::iter::repeat_n(&entry[..], 2_000));
        parts.push(b"\"z\":0}");
        let large = written(&parts);
        assert!(large.is_deflated());
        let text = parts.concat();
        assert_eq!(large.len(), text.len());
        assert_eq!(large.text().as_bytes(), &text[..]);
        let mut out = b"prefix".to_vec();
        large.write_to(&mut out);
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(&out[6..], &text[..]);
        // It is kept smaller than the text it stands for.
        match &large.stored {
            Stored::Deflated(deflated) => assert!(deflated.len() * 10 < text.len()),
            Stored::Plain(_) => unreachable!("asserted deflated above"),
        }
    }

    #[test]
    fn the_hash_is_over_the_prefix_and_the_whole_json_however_it_is_kept() {
        for size in [
            10,
            KEEP_PLAIN_UP_TO - 1,
            KEEP_PLAIN_UP_TO,
            3 * KEEP_PLAIN_UP_TO + 7,
        ] {
            let text = vec![b'1'; size];
            // Written in uneven pieces.
            let mut writer = CanonicalWriter::new();
            for piece in text.chunks(999) {
                writer.push(piece);
            }
            let canonical = writer.finish();
            assert_eq!(
                canonical.content_hash(),
                crate::render::content_hash_of(&[b"rules:", &text]),
                "{size} bytes"
            );
            assert_eq!(canonical.text().as_bytes(), &text[..], "{size} bytes");
        }
    }

    #[test]
    fn of_serializes_like_serde_json() {
        let value =
            serde_json::json!({"version": "v1", "flags": {"b": {"enabled": true}, "a": {}}});
        let canonical = CanonicalJson::of(&value);
        assert_eq!(canonical.text(), serde_json::to_string(&value).unwrap());
    }
}
