//! Server-sent events: an encoder that returns bytes and an incremental WHATWG decoder.

pub mod decode;
pub mod encode;
#[cfg(feature = "stream-gzip")]
pub mod gzip;

pub use decode::{DecodeError, Decoder, DecoderLimits, SseEvent};
pub use encode::{EncodeError, Event, KEEPALIVE, comment};
