//! SSE decoding (filled in by the core work)
