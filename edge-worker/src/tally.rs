//! What a front isolate reports to its environment's relay about the forwards it made (counts
//! per kind and outcome, upstream's refusals, the identifies that ended), in one batch, and the
//! relay's verdict it takes back (until when each kind is held back). Pure: encoded as
//! `application/x-www-form-urlencoded`, unit-tested on the host.

use rollgate_proxy_core::metrics::{SideOutcome, SideRequest};

/// The kinds a front forwards (per-user flag fetches stay in the relay).
pub const KINDS: [SideRequest; 3] = [
    SideRequest::Identify,
    SideRequest::Events,
    SideRequest::Telemetry,
];

/// Most ended identifies one tally holds: beyond, they are dropped (the relay's gate of each
/// ends on its own deadline) and counted.
pub const MAX_DONE: usize = 1024;

fn slot(kind: SideRequest) -> Option<usize> {
    KINDS.iter().position(|k| *k == kind)
}

/// Outcomes of forwards not yet reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Per kind (in [`KINDS`] order) and outcome (in [`SideOutcome::ALL`] order).
    counts: [[u64; 4]; 3],
    /// Upstream's latest non-2xx answer per kind: status and `Retry-After`.
    refusals: [Option<(u16, Option<String>)>; 3],
    /// The relay's identify gates whose forward ended (`0`: none).
    done: Vec<u64>,
    /// Ended identifies dropped past [`MAX_DONE`].
    done_dropped: u64,
}

impl Tally {
    /// Counts one forward of `kind` that ended with `outcome`.
    pub fn count(&mut self, kind: SideRequest, outcome: SideOutcome) {
        if let Some(i) = slot(kind) {
            let j = SideOutcome::ALL
                .iter()
                .position(|o| *o == outcome)
                .unwrap_or(0);
            self.counts[i][j] += 1;
        }
    }

    /// Upstream answered a forward of `kind` with a non-2xx `status`.
    pub fn refused(&mut self, kind: SideRequest, status: u16, retry_after: Option<&str>) {
        if let Some(i) = slot(kind) {
            self.refusals[i] = Some((status, retry_after.map(str::to_owned)));
        }
    }

    /// The forward of the identify behind the relay's gate `token` ended.
    pub fn done(&mut self, token: u64) {
        if token == 0 {
            return;
        }
        if self.done.len() < MAX_DONE {
            self.done.push(token);
        } else {
            self.done_dropped += 1;
        }
    }

    /// Nothing to report.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().flatten().all(|n| *n == 0)
            && self.refusals.iter().all(Option::is_none)
            && self.done.is_empty()
    }

    /// How many forwards of `kind` ended with `outcome`.
    pub fn counted(&self, kind: SideRequest, outcome: SideOutcome) -> u64 {
        let j = SideOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        slot(kind).map_or(0, |i| self.counts[i][j])
    }

    /// The latest refusal of `kind`.
    pub fn refusal(&self, kind: SideRequest) -> Option<(u16, Option<&str>)> {
        slot(kind)
            .and_then(|i| self.refusals[i].as_ref())
            .map(|(status, retry)| (*status, retry.as_deref()))
    }

    /// The identify gates that ended.
    pub fn ended(&self) -> &[u64] {
        &self.done
    }

    /// Ended identifies dropped past [`MAX_DONE`].
    pub fn done_dropped(&self) -> u64 {
        self.done_dropped
    }

    /// Puts back a tally that could not be sent (its counts add up; the newer refusal wins).
    pub fn merge(&mut self, older: Self) {
        for (mine, theirs) in self
            .counts
            .iter_mut()
            .flatten()
            .zip(older.counts.iter().flatten())
        {
            *mine += theirs;
        }
        for (mine, theirs) in self.refusals.iter_mut().zip(older.refusals) {
            if mine.is_none() {
                *mine = theirs;
            }
        }
        self.done_dropped += older.done_dropped;
        for token in older.done {
            self.done(token);
        }
    }

    /// The report's body.
    pub fn encode(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (i, kind) in KINDS.iter().enumerate() {
            for (j, outcome) in SideOutcome::ALL.iter().enumerate() {
                let n = self.counts[i][j];
                if n > 0 {
                    out.append_pair(
                        &format!("{}.{}", kind.label(), outcome.label()),
                        &n.to_string(),
                    );
                }
            }
            if let Some((status, retry_after)) = &self.refusals[i] {
                out.append_pair(&format!("{}.status", kind.label()), &status.to_string());
                if let Some(value) = retry_after {
                    out.append_pair(&format!("{}.retry_after", kind.label()), value);
                }
            }
        }
        for token in &self.done {
            out.append_pair("done", &token.to_string());
        }
        out.finish()
    }

    /// Reads a report's body (unknown or malformed pairs are ignored).
    pub fn decode(body: &str) -> Self {
        let mut tally = Self::default();
        for (name, value) in form_urlencoded::parse(body.as_bytes()) {
            if name == "done" {
                if let Ok(token) = value.parse() {
                    tally.done(token);
                }
                continue;
            }
            let Some((kind, what)) = name.split_once('.') else {
                continue;
            };
            let Some(i) = KINDS.iter().position(|k| k.label() == kind) else {
                continue;
            };
            if what == "status" {
                if let Ok(status) = value.parse() {
                    let retry = tally.refusals[i].take().and_then(|(_, r)| r);
                    tally.refusals[i] = Some((status, retry));
                }
            } else if what == "retry_after" {
                let status = tally.refusals[i].as_ref().map_or(0, |(s, _)| *s);
                tally.refusals[i] = Some((status, Some(value.into_owned())));
            } else if let Some(j) = SideOutcome::ALL.iter().position(|o| o.label() == what) {
                tally.counts[i][j] = value.parse().unwrap_or(0);
            }
        }
        tally
    }
}

/// The relay's answer to a report: per kind, until when (unix ms) forwards are held back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// In [`KINDS`] order; `None`: admitted.
    pub until: [Option<u64>; 3],
}

impl Verdict {
    /// The answer's body.
    pub fn encode(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (kind, until) in KINDS.iter().zip(self.until) {
            if let Some(until) = until {
                out.append_pair(kind.label(), &until.to_string());
            }
        }
        out.finish()
    }

    /// Reads an answer's body.
    pub fn decode(body: &str) -> Self {
        let mut verdict = Self::default();
        for (name, value) in form_urlencoded::parse(body.as_bytes()) {
            if let Some(i) = KINDS.iter().position(|k| k.label() == name) {
                verdict.until[i] = value.parse().ok();
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_round_trips() {
        let mut tally = Tally::default();
        assert!(tally.is_empty());
        tally.count(SideRequest::Events, SideOutcome::Ok);
        tally.count(SideRequest::Events, SideOutcome::Ok);
        tally.count(SideRequest::Identify, SideOutcome::Busy);
        tally.count(SideRequest::UserFlags, SideOutcome::Ok); // not a forward: ignored
        tally.refused(SideRequest::Telemetry, 429, Some("20"));
        tally.refused(SideRequest::Identify, 401, None);
        tally.done(7);
        tally.done(0);
        tally.done(9);
        let decoded = Tally::decode(&tally.encode());
        assert_eq!(decoded, tally);
        assert_eq!(decoded.counted(SideRequest::Events, SideOutcome::Ok), 2);
        assert_eq!(
            decoded.refusal(SideRequest::Telemetry),
            Some((429, Some("20")))
        );
        assert_eq!(decoded.refusal(SideRequest::Identify), Some((401, None)));
        assert_eq!(decoded.ended(), &[7, 9]);
        assert!(Tally::decode("junk&events.ok=x&nope.ok=3&done=z").is_empty());
    }

    #[test]
    fn merging_adds_counts_and_keeps_the_newer_refusal() {
        let mut older = Tally::default();
        older.count(SideRequest::Events, SideOutcome::Error);
        older.refused(SideRequest::Events, 500, None);
        older.done(1);
        let mut newer = Tally::default();
        newer.count(SideRequest::Events, SideOutcome::Error);
        newer.refused(SideRequest::Events, 429, Some("5"));
        newer.merge(older);
        assert_eq!(newer.counted(SideRequest::Events, SideOutcome::Error), 2);
        assert_eq!(newer.refusal(SideRequest::Events), Some((429, Some("5"))));
        assert_eq!(newer.ended(), &[1]);
    }

    #[test]
    fn ended_identifies_are_bounded() {
        let mut tally = Tally::default();
        for token in 1..=(MAX_DONE as u64 + 5) {
            tally.done(token);
        }
        assert_eq!(tally.ended().len(), MAX_DONE);
        assert_eq!(tally.done_dropped(), 5);
    }

    #[test]
    fn a_verdict_round_trips() {
        let verdict = Verdict {
            until: [None, Some(1_700_000_000_000), Some(5)],
        };
        assert_eq!(Verdict::decode(&verdict.encode()), verdict);
        assert_eq!(Verdict::decode(""), Verdict::default());
    }
}
