//! Streamed response bodies that hold one shared copy of each frame: a per-reader slot with
//! the newest frame, instead of a queue of per-reader copies.
//!
//! Every snapshot frame an object sends is a whole snapshot, so a reader that has not taken the
//! previous one yet only ever needs the newest one: [`Outlet::offer`] replaces it. Small
//! notifications that do not supersede each other ([`Outlet::push`]) wait in a bounded queue.
//! Frames are JS `Uint8Array`s made once per object and publish ([`JsFrames`]) and handed to
//! every reader's stream by reference, so memory per object is one copy per frame kind,
//! whatever the number of readers, and a slow reader holds at most its newest frame.
//!
//! A gzip-coded body (core's [`gzip`] segments: each frame compressed once per object, for all
//! its readers) carries each chunk's [`Segment`] beside its bytes, and counts it into the body's
//! [`Trailer`] only when the body really takes it (a superseded frame never reaches the client).
//!
//! Each body is a JS `ReadableStream` with no queue of its own (high-water mark 0) whose
//! source is the slot: the runtime's `pull` (it wants a chunk) is answered from the slot at
//! once or as soon as the object offers one, and its `cancel` (the reader went away) marks the
//! slot gone. The two callbacks are made once per body, so handing a publish to 2,000 readers
//! allocates nothing in wasm.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use js_sys::Uint8Array;
use rollgate_proxy_core::snapshot::Snapshot;
use rollgate_proxy_core::sse::gzip::{self, Segment, Trailer};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{QueuingStrategy, ReadableStreamDefaultController, UnderlyingSource};
use worker::{EncodeBody, Headers, Response, ResponseBuilder};

/// What a body sends: the bytes, and in a gzip-coded body the segment they are (for its
/// trailer).
#[derive(Clone)]
pub(crate) struct Chunk {
    pub(crate) js: Uint8Array,
    pub(crate) segment: Option<Segment>,
}

impl Chunk {
    /// An identity-coded chunk.
    pub(crate) fn plain(js: Uint8Array) -> Self {
        Self { js, segment: None }
    }

    /// A gzip-coded chunk: `segment`'s bytes (copied to JS), carried with it for the trailer.
    pub(crate) fn coded(segment: Segment) -> Self {
        Self {
            js: js_bytes(segment.bytes()),
            segment: Some(segment),
        }
    }

    /// `frame` as one body of the given coding sends it, made for this body alone.
    pub(crate) fn own(frame: &[u8], gzip: bool) -> Self {
        if gzip {
            Self::coded(Segment::encode_for_one(frame))
        } else {
            Self::plain(js_bytes(frame))
        }
    }
}

/// Clients an object hands a publish's frame to before it yields to the runtime (see the
/// shard's `rollout`): 25 measured best among 25, 100 and unpaced, for both codings.
pub(crate) const PUBLISH_BATCH: usize = 25;

/// Lets the runtime run its I/O (the chunks handed so far are written out) before going on.
pub(crate) async fn yield_to_runtime() {
    worker::Delay::from(std::time::Duration::ZERO).await;
}

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
    pending: VecDeque<(bool, Chunk)>,
    /// A keepalive comment is due (sent only when no frame is pending).
    keepalive: Option<Chunk>,
    /// A gzip-coded body: what it has carried, for the trailer a clean end writes.
    trailer: Option<Trailer>,
    /// Notifications dropped because the queue was full (a reader that stopped reading).
    dropped: u64,
    /// The object ended this body.
    closed: bool,
    /// The runtime cancelled the body (the reader went away).
    gone: bool,
    /// The body's controller, from its first `pull`.
    controller: Option<ReadableStreamDefaultController>,
    /// The runtime asked for a chunk (`pull`) that has not been given yet.
    wanted: bool,
    /// The stream's callbacks into this slot, held while the body is read and released when
    /// it ends (they hold the slot: a cycle this breaks).
    callbacks: Option<Callbacks>,
}

/// The JS functions the body's stream calls: made once per body, so handing out a chunk
/// allocates nothing in wasm (a stream adapter that made a future and a promise per `pull`
/// allocated per client and change, and those allocations, live until the next change,
/// scattered the fan-out over the wasm memory, which never shrinks).
struct Callbacks {
    _pull: Closure<dyn FnMut(ReadableStreamDefaultController)>,
    _cancel: Closure<dyn FnMut(JsValue)>,
}

impl Slot {
    /// What the body sends next: the head, then pending chunks in order, then a keepalive
    /// (a gzip-coded chunk counted into the trailer as it is handed out).
    fn next_chunk(&mut self) -> Option<JsValue> {
        if let Some(head) = self.head.take() {
            return Some(head.into());
        }
        let next = self
            .pending
            .pop_front()
            .map(|(_, chunk)| chunk)
            .or_else(|| self.keepalive.take())?;
        if let (Some(trailer), Some(segment)) = (self.trailer.as_mut(), &next.segment) {
            trailer.add(segment);
        }
        Some(next.js.into())
    }
}

/// What [`deliver`] does once the slot is no longer borrowed (the controller's methods may
/// call `pull` again at once).
enum Delivery {
    Chunk(JsValue),
    End(Option<Uint8Array>, Option<Callbacks>),
}

/// Hands the body its next chunk if it asked for one and one is there; ends it once the
/// object closed it and everything was taken (a gzip body with its trailer first).
fn deliver(slot: &Rc<RefCell<Slot>>) {
    let (controller, delivery) = {
        let mut slot = slot.borrow_mut();
        if !slot.wanted || slot.gone {
            return;
        }
        let Some(controller) = slot.controller.clone() else {
            return;
        };
        if let Some(chunk) = slot.next_chunk() {
            slot.wanted = false;
            (controller, Delivery::Chunk(chunk))
        } else if slot.closed {
            slot.wanted = false;
            let trailer = slot.trailer.take().map(|t| js_bytes(&t.finish()));
            (controller, Delivery::End(trailer, slot.callbacks.take()))
        } else {
            return;
        }
    };
    match delivery {
        Delivery::Chunk(chunk) => {
            if controller.enqueue_with_chunk(&chunk).is_err() {
                // The stream is closed or errored: the reader is gone.
                abandon(slot);
            }
        }
        Delivery::End(trailer, callbacks) => {
            if let Some(trailer) = trailer {
                let _ = controller.enqueue_with_chunk(&trailer);
            }
            let _ = controller.close();
            // The body asked for this chunk, so its queue is empty and the stream is closed
            // now: neither callback is called again. One of them may be running (`pull`):
            // wasm-bindgen frees a closure dropped during its own call when the call returns.
            drop(callbacks);
        }
    }
}

/// The reader went away: drops what was waiting and the stream's callbacks.
fn abandon(slot: &Rc<RefCell<Slot>>) {
    let callbacks = {
        let mut slot = slot.borrow_mut();
        slot.gone = true;
        slot.wanted = false;
        slot.head = None;
        slot.pending.clear();
        slot.keepalive = None;
        slot.controller = None;
        slot.callbacks.take()
    };
    drop(callbacks);
}

/// The object's end of one reader's body.
pub(crate) struct Outlet {
    slot: Rc<RefCell<Slot>>,
}

impl Outlet {
    /// A reader whose body starts with `head`; returns the outlet and the streamed response.
    pub(crate) fn open(
        head: Option<Uint8Array>,
        headers: Headers,
    ) -> worker::Result<(Self, Response)> {
        Self::open_with(head, None, headers)
    }

    /// An event-stream body that starts with `preamble`, gzip-coded when `gzip` (core's
    /// header and the preamble's segment first; the bytes are sent as they are, with
    /// `encodeBody: manual`): then every chunk offered must be of that coding.
    pub(crate) fn open_coded(
        preamble: &[u8],
        headers: Headers,
        gzip: bool,
    ) -> worker::Result<(Self, Response)> {
        if gzip {
            let mut trailer = Trailer::default();
            let head = js_bytes(&gzip::head(preamble, &mut trailer));
            Self::open_with(Some(head), Some(trailer), headers)
        } else {
            Self::open_with(Some(js_bytes(preamble)), None, headers)
        }
    }

    fn open_with(
        head: Option<Uint8Array>,
        trailer: Option<Trailer>,
        headers: Headers,
    ) -> worker::Result<(Self, Response)> {
        let gzip = trailer.is_some();
        let slot = Rc::new(RefCell::new(Slot {
            head,
            trailer,
            ..Slot::default()
        }));
        let pull = {
            let slot = Rc::clone(&slot);
            Closure::<dyn FnMut(ReadableStreamDefaultController)>::new(
                move |controller: ReadableStreamDefaultController| {
                    {
                        let mut slot = slot.borrow_mut();
                        slot.controller.get_or_insert(controller);
                        slot.wanted = true;
                    }
                    deliver(&slot);
                },
            )
        };
        let cancel = {
            let slot = Rc::clone(&slot);
            Closure::<dyn FnMut(JsValue)>::new(move |_reason: JsValue| abandon(&slot))
        };
        let source = UnderlyingSource::new();
        source.set_pull(pull.as_ref().unchecked_ref());
        source.set_cancel(cancel.as_ref().unchecked_ref());
        // No queue in the stream: the slot holds what waits, newest frame only, and a chunk
        // is handed out when the runtime reads (as `pull` says).
        let strategy = QueuingStrategy::new();
        strategy.set_high_water_mark(0.0);
        let raw =
            web_sys::ReadableStream::new_with_underlying_source_and_strategy(&source, &strategy)
                .map_err(|error| worker::Error::RustError(format!("body stream: {error:?}")))?;
        slot.borrow_mut().callbacks = Some(Callbacks {
            _pull: pull,
            _cancel: cancel,
        });
        let builder = ResponseBuilder::new().with_headers(headers);
        let builder = if gzip {
            // Already coded: the runtime must not compress (or decode) it again.
            builder.with_encode_body(EncodeBody::Manual)
        } else {
            builder
        };
        Ok((Self { slot }, builder.stream(raw)))
    }

    /// Hands the reader `frame` (replacing one it has not taken yet); `false` once it is gone.
    pub(crate) fn offer(&self, frame: &Uint8Array) -> bool {
        self.offer_chunk(&Chunk::plain(frame.clone()))
    }

    /// [`Outlet::offer`] for a chunk of the body's coding.
    pub(crate) fn offer_chunk(&self, chunk: &Chunk) -> bool {
        {
            let mut slot = self.slot.borrow_mut();
            if slot.gone {
                return false;
            }
            // A snapshot frame not taken yet is superseded: every such frame is a whole
            // snapshot.
            slot.pending.retain(|(superseding, _)| !superseding);
            slot.pending.push_back((true, chunk.clone()));
            slot.keepalive = None;
        }
        deliver(&self.slot);
        true
    }

    /// Queues a notification that does not supersede others (at most [`MAX_QUEUED`]; the
    /// oldest is dropped and counted beyond that); `false` once the reader is gone.
    pub(crate) fn push(&self, event: &Uint8Array) -> bool {
        {
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
            slot.pending.push_back((false, Chunk::plain(event.clone())));
            slot.keepalive = None;
        }
        deliver(&self.slot);
        true
    }

    /// Notifications dropped so far because this reader's queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.slot.borrow().dropped
    }

    /// Asks for a keepalive comment unless a frame is already on its way; `false` once gone.
    pub(crate) fn keepalive(&self, comment: &Uint8Array) -> bool {
        self.keepalive_chunk(&Chunk::plain(comment.clone()))
    }

    /// [`Outlet::keepalive`] with a comment of the body's coding.
    pub(crate) fn keepalive_chunk(&self, comment: &Chunk) -> bool {
        {
            let mut slot = self.slot.borrow_mut();
            if slot.gone {
                return false;
            }
            if !(slot.pending.is_empty() && slot.head.is_none()) {
                return true;
            }
            slot.keepalive = Some(comment.clone());
        }
        deliver(&self.slot);
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
        self.slot.borrow_mut().closed = true;
        deliver(&self.slot);
    }
}

/// Notifications a reader may have waiting (beyond that the oldest is dropped and counted).
const MAX_QUEUED: usize = 1024;

/// The JS copies of an object's shared frames: one per distinct frame (by identity of the
/// `Bytes`) and coding, dropped when the snapshot they belong to is replaced.
#[derive(Default)]
pub(crate) struct JsFrames {
    frames: Vec<(Bytes, bool, Chunk)>,
}

/// Distinct shared frames one snapshot has (flags, init, OFREP), in both codings, and a little
/// room.
const MAX_SHARED_FRAMES: usize = 8;

impl JsFrames {
    /// `frame`, one of `snapshot`'s, in a body's coding (gzip: the snapshot's segment,
    /// compressed once for every body), copied to JS on first use.
    pub(crate) fn get_chunk(&mut self, snapshot: &Snapshot, frame: &Bytes, gzip: bool) -> Chunk {
        if let Some((_, _, chunk)) = self.frames.iter().find(|(b, coded, _)| {
            *coded == gzip && b.as_ptr() == frame.as_ptr() && b.len() == frame.len()
        }) {
            return chunk.clone();
        }
        let chunk = if gzip {
            Chunk::coded(snapshot.gzip_segment(frame).into_owned())
        } else {
            Chunk::plain(js_bytes(frame))
        };
        if self.frames.len() >= MAX_SHARED_FRAMES {
            self.frames.remove(0);
        }
        self.frames.push((frame.clone(), gzip, chunk.clone()));
        chunk
    }

    /// Forgets every copy (a new snapshot).
    pub(crate) fn clear(&mut self) {
        self.frames.clear();
    }
}
