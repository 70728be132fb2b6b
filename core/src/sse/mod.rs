//! Server-sent events: an encoder that returns bytes and an incremental WHATWG decoder.

pub mod decode;
pub mod encode;

pub use decode::{DecodeError, Decoder, DecoderLimits, SseEvent};
pub use encode::{EncodeError, Event, KEEPALIVE, comment};
