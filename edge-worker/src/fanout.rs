//! Streamed response bodies that hold one shared copy of each frame: a per-reader slot with
//! the newest frame and a wakeup, instead of a queue of per-reader copies.
//!
//! Every snapshot frame an object sends is a whole snapshot, so a reader that has not taken the
//! previous one yet only ever needs the newest one: [`Outlet::offer`] replaces it. Small
//! notifications that do not supersede each other ([`Outlet::push`]) wait in a bounded queue.
//! Frames are JS `Uint8Array`s made once per object and publish ([`JsFrames`]) and handed to
//! every reader's stream by reference, so memory per object is one copy per frame kind,
//! whatever the number of readers, and a slow reader holds at most its newest frame.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use js_sys::Uint8Array;
use wasm_bindgen::{JsCast, JsValue};
use worker::{Headers, Response, ResponseBuilder};

/// A JS copy of `bytes`.
pub(crate) fn js_bytes(bytes: &[u8]) -> Uint8Array {
    let array = Uint8Array::new_with_length(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    array.copy_from(bytes);
    array
}

#[derive(Default)]
struct Slot {
    /// Sent before anything else (the `retry:` preamble or a first snapshot), once.
    head: Option<Uint8Array>,
    /// What the body has not taken yet, in order: at most one superseding frame (`true`, the
    /// newest snapshot) among notifications (`false`).
    pending: VecDeque<(bool, Uint8Array)>,
    /// Notifications dropped because the queue was full (a reader that stopped reading).
    /// A keepalive comment is due (sent only when no frame is pending).
    keepalive: Option<Uint8Array>,
    dropped: u64,
    /// The object ended this body.
    closed: bool,
    /// The runtime dropped the body (the reader went away).
    gone: bool,
    waker: Option<Waker>,
}

/// The object's end of one reader's body.
pub(crate) struct Outlet {
    slot: Rc<RefCell<Slot>>,
}

/// The body's end: yields what the slot holds, when the runtime asks for more.
struct Body {
    slot: Rc<RefCell<Slot>>,
}

impl Outlet {
    /// A reader whose body starts with `head`; returns the outlet and the streamed response.
    pub(crate) fn open(
        head: Option<Uint8Array>,
        headers: Headers,
    ) -> worker::Result<(Self, Response)> {
        let slot = Rc::new(RefCell::new(Slot {
            head,
            ..Slot::default()
        }));
        let body = Body {
            slot: Rc::clone(&slot),
        };
        let stream = wasm_streams::ReadableStream::from_stream(body.map(Ok::<JsValue, JsValue>));
        let raw: web_sys::ReadableStream = stream
            .into_raw()
            .dyn_into()
            .map_err(|_| worker::Error::RustError("not a ReadableStream".into()))?;
        let response = ResponseBuilder::new().with_headers(headers).stream(raw);
        Ok((Self { slot }, response))
    }

    /// Hands the reader `frame` (replacing one it has not taken yet); `false` once it is gone.
    pub(crate) fn offer(&self, frame: &Uint8Array) -> bool {
        let mut slot = self.slot.borrow_mut();
        if slot.gone {
            return false;
        }
        // A snapshot frame not taken yet is superseded: every such frame is a whole snapshot.
        slot.pending.retain(|(superseding, _)| !superseding);
        slot.pending.push_back((true, frame.clone()));
        slot.keepalive = None;
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
        true
    }

    /// Queues a notification that does not supersede others (at most [`MAX_QUEUED`]; the
    /// oldest is dropped and counted beyond that); `false` once the reader is gone.
    pub(crate) fn push(&self, event: &Uint8Array) -> bool {
        let mut slot = self.slot.borrow_mut();
        if slot.gone {
            return false;
        }
        if slot.pending.len() >= MAX_QUEUED
            && let Some(at) = slot
                .pending
                .iter()
                .position(|(superseding, _)| !superseding)
        {
            slot.pending.remove(at);
            slot.dropped += 1;
        }
        slot.pending.push_back((false, event.clone()));
        slot.keepalive = None;
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
        true
    }

    /// Notifications dropped so far because this reader's queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.slot.borrow().dropped
    }

    /// Asks for a keepalive comment unless a frame is already on its way; `false` once gone.
    pub(crate) fn keepalive(&self, comment: &Uint8Array) -> bool {
        let mut slot = self.slot.borrow_mut();
        if slot.gone {
            return false;
        }
        if slot.pending.is_empty() && slot.head.is_none() {
            slot.keepalive = Some(comment.clone());
            if let Some(waker) = slot.waker.take() {
                waker.wake();
            }
        }
        true
    }

    /// Whether the reader went away.
    pub(crate) fn is_gone(&self) -> bool {
        self.slot.borrow().gone
    }
}

impl Drop for Outlet {
    /// Ends the body once what is pending has been sent.
    fn drop(&mut self) {
        let mut slot = self.slot.borrow_mut();
        slot.closed = true;
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
    }
}

impl Stream for Body {
    type Item = JsValue;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<JsValue>> {
        let mut slot = self.slot.borrow_mut();
        if let Some(next) = slot
            .head
            .take()
            .or_else(|| slot.pending.pop_front().map(|(_, frame)| frame))
            .or_else(|| slot.keepalive.take())
        {
            return Poll::Ready(Some(next.into()));
        }
        if slot.closed {
            return Poll::Ready(None);
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let mut slot = self.slot.borrow_mut();
        slot.gone = true;
        slot.head = None;
        slot.pending.clear();
        slot.keepalive = None;
    }
}

/// Notifications a reader may have waiting (beyond that the oldest is dropped and counted).
const MAX_QUEUED: usize = 1024;

/// The JS copies of an object's shared frames: one per distinct frame (by identity of the
/// `Bytes`), dropped when the snapshot they belong to is replaced.
#[derive(Default)]
pub(crate) struct JsFrames {
    frames: Vec<(Bytes, Uint8Array)>,
}

/// Distinct shared frames one snapshot has (flags, init, OFREP) and a little room.
const MAX_SHARED_FRAMES: usize = 4;

impl JsFrames {
    /// The JS copy of `frame`, made on first use.
    pub(crate) fn get(&mut self, frame: &Bytes) -> Uint8Array {
        if let Some((_, js)) = self
            .frames
            .iter()
            .find(|(b, _)| b.as_ptr() == frame.as_ptr() && b.len() == frame.len())
        {
            return js.clone();
        }
        let js = js_bytes(frame);
        if self.frames.len() >= MAX_SHARED_FRAMES {
            self.frames.remove(0);
        }
        self.frames.push((frame.clone(), js.clone()));
        js
    }

    /// Forgets every copy (a new snapshot).
    pub(crate) fn clear(&mut self) {
        self.frames.clear();
    }
}
