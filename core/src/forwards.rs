//! The admission of forwarded POSTs (identify, events, telemetry) by an adapter that forwards
//! them away from the upstream machine (the Worker's stateless front): core's per-kind bound,
//! the `Retry-After` holds upstream sent it, and the machine's own verdict when it is told.
//!
//! The native server forwards next to its [`crate::upstream::Upstream`] and asks it directly
//! ([`crate::upstream::Upstream::admit_forward`]). The Worker's front runs in many isolates
//! that share nothing, away from the one object holding the machine: each isolate keeps a
//! [`ForwardGate`], reports outcomes to the machine in batches, and takes back the machine's
//! verdict ([`crate::upstream::Upstream::forward_blocked_until`]) for the next forwards.

use std::time::Duration;

use crate::metrics::{MAX_SIDE_REQUESTS_IN_FLIGHT, SideOutcome, SideRequest};
use crate::time::Timestamp;
use crate::upstream::{MAX_RETRY_AFTER, parse_retry_after};

/// How one forwarded POST ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardResult<'a> {
    /// Upstream answered `status` (with its `Retry-After`, if any).
    Answered {
        /// The status.
        status: u16,
        /// The `Retry-After` header's value.
        retry_after: Option<&'a str>,
    },
    /// No answer within the upstream timeout.
    TimedOut,
    /// The request failed before an answer (connection, TLS, ...).
    Failed,
}

impl ForwardResult<'_> {
    /// Whether upstream accepted it (a 2xx).
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Answered { status, .. } if (200..300).contains(status))
    }

    /// The outcome counted in `rollgate_proxy_upstream_requests_total`: ok, or error
    /// (a refusal, a timeout and a failure alike, as the native server counts them).
    pub fn outcome(&self) -> SideOutcome {
        if self.is_ok() {
            SideOutcome::Ok
        } else {
            SideOutcome::Error
        }
    }
}

/// One isolate's admission of forwarded POSTs, per kind: at most
/// [`MAX_SIDE_REQUESTS_IN_FLIGHT`] in flight, none while held back.
#[derive(Clone, Debug, Default)]
pub struct ForwardGate {
    in_flight: [usize; 4],
    blocked_until: [Option<Timestamp>; 4],
}

impl ForwardGate {
    /// A gate with nothing in flight and nothing held back.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a slot for a forward of `kind`, or says why not: [`SideOutcome::Busy`] when
    /// [`MAX_SIDE_REQUESTS_IN_FLIGHT`] of that kind are in flight (checked first, as the native
    /// server takes its slot before asking the breaker), [`SideOutcome::Rejected`] while a
    /// `Retry-After` or the machine's verdict holds the kind back. Release an admitted forward
    /// with [`ForwardGate::finish`].
    ///
    /// # Errors
    /// The outcome to count for a forward that is not sent (the client's answer is the same).
    pub fn admit(&mut self, now: Timestamp, kind: SideRequest) -> Result<(), SideOutcome> {
        let i = kind.index();
        if self.in_flight[i] >= MAX_SIDE_REQUESTS_IN_FLIGHT {
            return Err(SideOutcome::Busy);
        }
        if self.blocked_until(now, kind).is_some() {
            return Err(SideOutcome::Rejected);
        }
        self.in_flight[i] += 1;
        Ok(())
    }

    /// An admitted forward of `kind` ended with `result`: frees its slot, and a 429/503 with a
    /// `Retry-After` holds the kind back for that long (at most [`MAX_RETRY_AFTER`]), as
    /// [`crate::upstream::Upstream::record_forward_response`] does on the machine. Returns the
    /// outcome to count.
    pub fn finish(
        &mut self,
        now: Timestamp,
        kind: SideRequest,
        result: ForwardResult<'_>,
    ) -> SideOutcome {
        let i = kind.index();
        self.in_flight[i] = self.in_flight[i].saturating_sub(1);
        if let ForwardResult::Answered {
            status: 429 | 503,
            retry_after: Some(value),
        } = result
            && let Some(wait) = parse_retry_after(value, now)
        {
            self.hold(kind, now.saturating_add(wait.min(MAX_RETRY_AFTER)));
        }
        result.outcome()
    }

    /// The machine's verdict for `kind`: held back until `until` (`None`: admitted). A verdict
    /// never shortens a hold this gate saw itself (the verdict may predate that answer).
    pub fn verdict(&mut self, kind: SideRequest, until: Option<Timestamp>) {
        if let Some(until) = until {
            self.hold(kind, until);
        }
    }

    /// When forwards of `kind` may go again, if later than `now`.
    pub fn blocked_until(&self, now: Timestamp, kind: SideRequest) -> Option<Timestamp> {
        self.blocked_until[kind.index()].filter(|&at| at > now)
    }

    /// Forwards of `kind` in flight.
    pub fn in_flight(&self, kind: SideRequest) -> usize {
        self.in_flight[kind.index()]
    }

    fn hold(&mut self, kind: SideRequest, until: Timestamp) {
        let slot = &mut self.blocked_until[kind.index()];
        *slot = Some(slot.map_or(until, |at| at.max(until)));
    }
}

/// How long past the upstream timeout an adapter waits for a forward's outcome report before
/// it gives up on it (e.g. the relay's identify gates): a report goes out right after the
/// forward ends, so this only covers a front that went away.
pub const REPORT_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timestamp = Timestamp::from_millis(1_000_000);

    #[test]
    fn bound_per_kind_then_busy() {
        let mut gate = ForwardGate::new();
        for _ in 0..MAX_SIDE_REQUESTS_IN_FLIGHT {
            assert_eq!(gate.admit(T, SideRequest::Events), Ok(()));
        }
        assert_eq!(gate.admit(T, SideRequest::Events), Err(SideOutcome::Busy));
        // Other kinds have their own slots.
        assert_eq!(gate.admit(T, SideRequest::Identify), Ok(()));
        let ok = ForwardResult::Answered {
            status: 202,
            retry_after: None,
        };
        assert_eq!(gate.finish(T, SideRequest::Events, ok), SideOutcome::Ok);
        assert_eq!(
            gate.in_flight(SideRequest::Events),
            MAX_SIDE_REQUESTS_IN_FLIGHT - 1
        );
        assert_eq!(gate.admit(T, SideRequest::Events), Ok(()));
    }

    #[test]
    fn retry_after_holds_that_kind_only() {
        let mut gate = ForwardGate::new();
        gate.admit(T, SideRequest::Events).unwrap();
        let refused = ForwardResult::Answered {
            status: 429,
            retry_after: Some("20"),
        };
        assert_eq!(
            gate.finish(T, SideRequest::Events, refused),
            SideOutcome::Error
        );
        let later = T.saturating_add(Duration::from_secs(19));
        assert_eq!(
            gate.admit(later, SideRequest::Events),
            Err(SideOutcome::Rejected)
        );
        assert_eq!(gate.admit(later, SideRequest::Identify), Ok(()));
        let after = T.saturating_add(Duration::from_secs(20));
        assert_eq!(gate.admit(after, SideRequest::Events), Ok(()));
        // A 500 holds nothing; neither does a 429 without Retry-After.
        for result in [
            ForwardResult::Answered {
                status: 500,
                retry_after: Some("30"),
            },
            ForwardResult::Answered {
                status: 429,
                retry_after: None,
            },
            ForwardResult::TimedOut,
            ForwardResult::Failed,
        ] {
            assert_eq!(
                gate.finish(after, SideRequest::Events, result),
                SideOutcome::Error
            );
            assert_eq!(gate.blocked_until(after, SideRequest::Events), None);
        }
    }

    #[test]
    fn verdicts_hold_but_never_shorten() {
        let mut gate = ForwardGate::new();
        let until = T.saturating_add(Duration::from_secs(30));
        gate.verdict(SideRequest::Telemetry, Some(until));
        assert_eq!(
            gate.admit(T, SideRequest::Telemetry),
            Err(SideOutcome::Rejected)
        );
        gate.verdict(SideRequest::Telemetry, None);
        gate.verdict(SideRequest::Telemetry, Some(T));
        assert_eq!(gate.blocked_until(T, SideRequest::Telemetry), Some(until));
        assert_eq!(gate.admit(until, SideRequest::Telemetry), Ok(()));
        // A far Retry-After is cut to the cap.
        gate.admit(T, SideRequest::Identify).unwrap();
        let far = ForwardResult::Answered {
            status: 503,
            retry_after: Some("99999999"),
        };
        let _ = gate.finish(T, SideRequest::Identify, far);
        assert_eq!(
            gate.blocked_until(T, SideRequest::Identify),
            Some(T.saturating_add(MAX_RETRY_AFTER))
        );
    }
}
