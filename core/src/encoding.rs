//! Content codings of the shared polling bodies: compressed once per revision, chosen per request.
//!
//! A large flag set (2,000 flags are ~130 KB of JSON) is mostly repeated key text, so gzip and
//! brotli shrink it ~10×. The snapshot compresses its anonymous bodies once, when it is built
//! ([`Variants::compress`], behind the `compression` feature: the native server turns it on,
//! the Worker leaves it off and lets Cloudflare's edge compress), and each request only picks
//! the bytes its `Accept-Encoding` allows ([`negotiate`]): no CPU per request.
//!
//! ETags: a strong validator must differ per representation (RFC 9110 §8.8.1), so a compressed
//! answer carries the identity ETag with a suffix (`"<hash>-br"`, `"<hash>-gz"`), and
//! `If-None-Match` matches any variant of the current content ([`etag_matches_any`]): a client
//! that revalidates with what it got gets its 304 whatever it asks for next.

use bytes::Bytes;

/// Bodies shorter than this stay identity: under ~1 KiB the coding's framing and the header
/// cost about what compression saves.
pub const MIN_COMPRESS_BYTES: usize = 1024;

/// gzip level: 6 is zlib's default, the knee of its size/time curve.
pub const GZIP_LEVEL: u32 = 6;
/// brotli quality: 5 is ~as fast as gzip 6 and smaller; 9+ costs ~10× the time for a few %
/// (see BENCHMARKS.md "Compressed bodies").
pub const BROTLI_QUALITY: u32 = 5;
/// brotli window (log2 bytes): 22 (4 MiB) covers any flag set we serve whole.
pub const BROTLI_WINDOW: u32 = 22;

/// A content coding the proxy can send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// No coding.
    Identity,
    /// `gzip`.
    Gzip,
    /// `br` (brotli).
    Brotli,
}

impl Encoding {
    /// The `Content-Encoding` token (`None` for identity, which is never sent).
    pub const fn header(self) -> Option<&'static str> {
        match self {
            Self::Identity => None,
            Self::Gzip => Some("gzip"),
            Self::Brotli => Some("br"),
        }
    }

    /// The suffix this coding adds inside the quoted ETag.
    pub const fn etag_suffix(self) -> &'static str {
        match self {
            Self::Identity => "",
            Self::Gzip => "-gz",
            Self::Brotli => "-br",
        }
    }

    /// `etag` (quoted) for this coding: `"abc"` → `"abc-br"`.
    pub fn etag(self, etag: &str) -> String {
        let suffix = self.etag_suffix();
        if suffix.is_empty() {
            return etag.to_owned();
        }
        match etag.strip_suffix('"') {
            Some(open) => format!("{open}{suffix}\""),
            None => format!("{etag}{suffix}"),
        }
    }
}

/// The encodings of one body besides identity, when it was large enough to compress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Variants {
    gzip: Option<Bytes>,
    br: Option<Bytes>,
}

impl Variants {
    /// No compressed variants (small bodies, or built without the `compression` feature).
    pub const fn none() -> Self {
        Self {
            gzip: None,
            br: None,
        }
    }

    /// gzip and br of `body`, when it is at least [`MIN_COMPRESS_BYTES`] and the `compression`
    /// feature is on; a variant that would not be smaller than `body` is dropped.
    pub fn compress(body: &[u8]) -> Self {
        if body.len() < MIN_COMPRESS_BYTES {
            return Self::none();
        }
        Self::compress_any(body)
    }

    #[cfg(feature = "compression")]
    fn compress_any(body: &[u8]) -> Self {
        let smaller = |bytes: Option<Vec<u8>>| {
            bytes
                .filter(|bytes| bytes.len() < body.len())
                .map(Bytes::from)
        };
        Self {
            gzip: smaller(gzip(body)),
            br: smaller(brotli(body)),
        }
    }

    #[cfg(not(feature = "compression"))]
    fn compress_any(_body: &[u8]) -> Self {
        Self::none()
    }

    /// The bytes of `encoding`, if this body has them (`None` for identity).
    pub fn get(&self, encoding: Encoding) -> Option<&Bytes> {
        match encoding {
            Encoding::Identity => None,
            Encoding::Gzip => self.gzip.as_ref(),
            Encoding::Brotli => self.br.as_ref(),
        }
    }

    /// The encoding `accept_encoding` prefers among those held, and its bytes (`None`:
    /// identity).
    pub fn choose(&self, accept_encoding: Option<&str>) -> Option<(Encoding, &Bytes)> {
        // Without the feature there is never a variant: say so at compile time, so the parser
        // is left out of the Worker's wasm.
        if !cfg!(feature = "compression") {
            return None;
        }
        let header = accept_encoding?;
        if self.gzip.is_none() && self.br.is_none() {
            return None;
        }
        let encoding = negotiate(header, self.br.is_some(), self.gzip.is_some());
        self.get(encoding).map(|bytes| (encoding, bytes))
    }

    /// Bytes held by the compressed variants (for memory accounting).
    pub fn len(&self) -> usize {
        self.gzip.as_ref().map_or(0, Bytes::len) + self.br.as_ref().map_or(0, Bytes::len)
    }

    /// Whether no variant is held.
    pub fn is_empty(&self) -> bool {
        self.gzip.is_none() && self.br.is_none()
    }
}

#[cfg(feature = "compression")]
fn gzip(body: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::new(GZIP_LEVEL),
    );
    encoder.write_all(body).ok()?;
    encoder.finish().ok()
}

#[cfg(feature = "compression")]
fn brotli(body: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut out = Vec::with_capacity(body.len() / 4);
    {
        let mut writer =
            brotli::CompressorWriter::new(&mut out, 4096, BROTLI_QUALITY, BROTLI_WINDOW);
        writer.write_all(body).ok()?;
        writer.flush().ok()?;
    }
    Some(out)
}

/// The coding to send, given an `Accept-Encoding` header and which codings are available.
///
/// RFC 9110 §12.5.3: each coding may carry a `q` weight (0 refuses it, absent is 1), `*` stands
/// for every coding not listed, and identity is acceptable unless refused (`identity;q=0`, or
/// `*;q=0` without identity listed). Among equal weights br is preferred, then gzip, then
/// identity. A header we cannot make sense of gives identity, which every client can read (and
/// when identity is refused too we still send it rather than a 406: clients that say so
/// usually still accept it).
pub fn negotiate(header: &str, br_available: bool, gzip_available: bool) -> Encoding {
    let mut br: Option<u16> = None;
    let mut gzip: Option<u16> = None;
    let mut identity: Option<u16> = None;
    let mut star: Option<u16> = None;
    for item in header.split(',').take(MAX_CODINGS) {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or_default().trim();
        if coding.is_empty() {
            continue;
        }
        let mut q = Some(1000);
        for param in parts {
            if let Some((name, value)) = param.split_once('=')
                && name.trim().eq_ignore_ascii_case("q")
            {
                q = parse_qvalue(value.trim());
            }
        }
        // An unparsable weight makes the item meaningless: ignore it.
        let Some(q) = q else { continue };
        let slot = if coding.eq_ignore_ascii_case("br") {
            &mut br
        } else if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            &mut gzip
        } else if coding.eq_ignore_ascii_case("identity") {
            &mut identity
        } else if coding == "*" {
            &mut star
        } else {
            continue;
        };
        // Listed twice: the higher weight wins (a lenient reading of a malformed header).
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    let br = if br_available { br.or(star) } else { None };
    let gzip = if gzip_available { gzip.or(star) } else { None };
    // Unlisted, identity is acceptable but the least preferred (any listed coding wins).
    let identity = identity.or(star).unwrap_or(1);
    let mut best = (Encoding::Identity, identity);
    for (encoding, q) in [(Encoding::Gzip, gzip), (Encoding::Brotli, br)] {
        if let Some(q) = q
            && q > 0
            && q >= best.1
        {
            best = (encoding, q);
        }
    }
    // Identity refused but so is everything else: identity anyway (see above).
    best.0
}

/// Items of `Accept-Encoding` read at most: real headers have a handful.
const MAX_CODINGS: usize = 32;

/// A `qvalue` (`0`, `0.5`, `1`, `1.000`) in thousandths; `None` if malformed.
fn parse_qvalue(value: &str) -> Option<u16> {
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = 0;
    for (i, digit) in frac.bytes().enumerate() {
        thousandths += u16::from(digit - b'0') * [100, 10, 1][i];
    }
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Whether an `If-None-Match` header matches `etag` (the identity ETag, quoted) in any coding
/// this proxy sends: `"abc"`, `"abc-gz"` and `"abc-br"` (weak or strong, as RFC 9110 §13.1.2
/// compares for `If-None-Match`), or `*`.
pub fn etag_matches_any(header: &str, etag: &str) -> bool {
    let bare = etag.trim_matches('"');
    header.split(',').map(str::trim).any(|tag| {
        if tag == "*" {
            return true;
        }
        let tag = tag.trim_start_matches("W/").trim_matches('"');
        let base = tag
            .strip_suffix(Encoding::Gzip.etag_suffix())
            .or_else(|| tag.strip_suffix(Encoding::Brotli.etag_suffix()))
            .unwrap_or(tag);
        base == bare
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(header: &str) -> Encoding {
        negotiate(header, true, true)
    }

    #[test]
    fn q_values_choose_the_coding() {
        assert_eq!(pick("gzip, deflate, br"), Encoding::Brotli);
        assert_eq!(pick("gzip, deflate, br, zstd"), Encoding::Brotli);
        assert_eq!(pick("gzip"), Encoding::Gzip);
        assert_eq!(pick("br;q=1, gzip;q=0.8"), Encoding::Brotli);
        assert_eq!(pick("br;q=0.5, gzip;q=0.8"), Encoding::Gzip);
        assert_eq!(pick("gzip;q=1.0, br;q=1.000"), Encoding::Brotli);
        assert_eq!(pick("GZIP; Q=0.9"), Encoding::Gzip);
        assert_eq!(pick("x-gzip"), Encoding::Gzip);
        assert_eq!(pick("*"), Encoding::Brotli);
        assert_eq!(pick("*;q=0.5, br;q=0"), Encoding::Gzip);
        assert_eq!(pick("deflate"), Encoding::Identity);
        assert_eq!(pick(""), Encoding::Identity);
        assert_eq!(pick("identity"), Encoding::Identity);
        // Identity preferred over a lower-weighted coding.
        assert_eq!(pick("identity;q=1, gzip;q=0.5"), Encoding::Identity);
    }

    #[test]
    fn refusals_are_honoured() {
        assert_eq!(pick("gzip;q=0"), Encoding::Identity);
        assert_eq!(pick("br;q=0, gzip"), Encoding::Gzip);
        assert_eq!(pick("br;q=0, gzip;q=0"), Encoding::Identity);
        assert_eq!(pick("identity;q=0, gzip;q=0.1"), Encoding::Gzip);
        assert_eq!(pick("*;q=0"), Encoding::Identity);
        assert_eq!(pick("*;q=0, gzip"), Encoding::Gzip);
        // Only what is available.
        assert_eq!(negotiate("br", false, true), Encoding::Identity);
        assert_eq!(negotiate("br, gzip;q=0.1", false, true), Encoding::Gzip);
        assert_eq!(negotiate("*", false, false), Encoding::Identity);
    }

    #[test]
    fn malformed_weights_are_ignored() {
        assert_eq!(pick("br;q=2, gzip"), Encoding::Gzip);
        assert_eq!(pick("br;q=0.1234, gzip;q=0.1"), Encoding::Gzip);
        assert_eq!(pick("br;q=abc"), Encoding::Identity);
        assert_eq!(pick("br;q=, gzip;q=-1"), Encoding::Identity);
        assert_eq!(pick(",,;;,br"), Encoding::Brotli);
        assert_eq!(parse_qvalue("0.001"), Some(1));
        assert_eq!(parse_qvalue("1.001"), None);
        assert_eq!(parse_qvalue("1."), Some(1000));
    }

    #[test]
    fn etags_per_coding_and_matching() {
        assert_eq!(Encoding::Brotli.etag("\"abc\""), "\"abc-br\"");
        assert_eq!(Encoding::Gzip.etag("\"abc\""), "\"abc-gz\"");
        assert_eq!(Encoding::Identity.etag("\"abc\""), "\"abc\"");
        for tag in [
            "\"abc\"",
            "\"abc-br\"",
            "W/\"abc-gz\"",
            "\"x\", \"abc-br\"",
            "*",
        ] {
            assert!(etag_matches_any(tag, "\"abc\""), "{tag}");
        }
        for tag in ["\"abd\"", "\"abc-zz\"", "\"ab\"", "\"abc-br-br\""] {
            assert!(!etag_matches_any(tag, "\"abc\""), "{tag}");
        }
    }

    #[test]
    fn small_bodies_stay_identity() {
        let small = vec![b'a'; MIN_COMPRESS_BYTES - 1];
        assert!(Variants::compress(&small).is_empty());
        assert_eq!(Variants::compress(&small).choose(Some("br")), None);
        assert_eq!(Variants::none().choose(Some("gzip, br")), None);
    }

    #[cfg(feature = "compression")]
    #[test]
    fn variants_decode_to_the_body() {
        use std::io::Read;
        let body: Vec<u8> = (0..2000)
            .flat_map(|i| format!("\"flag-{i}\":{},", i % 3 == 0).into_bytes())
            .collect();
        let variants = Variants::compress(&body);
        let gz = variants.get(Encoding::Gzip).expect("gzip variant");
        let br = variants.get(Encoding::Brotli).expect("br variant");
        assert!(gz.len() * 4 < body.len() && br.len() * 4 < body.len());
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut decoded)
            .expect("gunzip");
        assert_eq!(decoded, body);
        let mut decoded = Vec::new();
        brotli::Decompressor::new(&br[..], 4096)
            .read_to_end(&mut decoded)
            .expect("unbrotli");
        assert_eq!(decoded, body);
        assert_eq!(
            variants.choose(Some("gzip;q=0.9, br;q=0.8")),
            Some((Encoding::Gzip, gz))
        );
        assert_eq!(variants.choose(None), None);
        assert_eq!(variants.choose(Some("identity")), None);
        // At the threshold it compresses.
        assert!(!Variants::compress(&vec![b'a'; MIN_COMPRESS_BYTES]).is_empty());
    }
}
