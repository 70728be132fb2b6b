//! Black-box test support for rollgate-proxy (filled in by the mock-upstream work).
