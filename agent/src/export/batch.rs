//! Cutting the event stream into batches: at most `max_events` events, and no event waits
//! longer than `max_age` for its batch to fill; a batch marked urgent (it holds a RST event or
//! carries a new watermark, what verdicts wait for) is cut at the exporter thread's next look.
//!
//! Pure (time is a parameter) so the rules are tested without clocks or threads.

use std::time::{Duration, Instant};

use rstscope_proto::v1;

/// Collects events until a batch is full or old enough.
#[derive(Debug)]
pub struct Batcher {
    max_events: usize,
    max_age: Duration,
    events: Vec<v1::Event>,
    /// When the oldest waiting event arrived.
    first_at: Option<Instant>,
    /// Cut at the next poll, whatever its age.
    urgent: bool,
}

impl Batcher {
    /// A batcher cutting at `max_events` events (at least 1) or `max_age`.
    pub fn new(max_events: usize, max_age: Duration) -> Self {
        Batcher { max_events: max_events.max(1), max_age, events: Vec::new(), first_at: None, urgent: false }
    }

    /// Lowers (or raises) the event limit, e.g. to what the collector accepts.
    pub fn set_max_events(&mut self, max_events: usize) {
        self.max_events = max_events.max(1);
    }

    /// Adds `event`, which arrived at `now`; returns a batch if this filled one.
    pub fn push(&mut self, event: v1::Event, now: Instant) -> Option<Vec<v1::Event>> {
        if self.events.is_empty() {
            self.first_at = Some(now);
        }
        self.events.push(event);
        (self.events.len() >= self.max_events).then(|| self.take()).flatten()
    }

    /// Marks the waiting events for the next [`Batcher::poll`], whatever their age.
    pub fn mark_urgent(&mut self) {
        self.urgent = !self.events.is_empty();
    }

    /// The waiting events if the oldest has waited `max_age` by `now`, or they are urgent.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<v1::Event>> {
        let due =
            self.urgent || self.first_at.is_some_and(|first| now.saturating_duration_since(first) >= self.max_age);
        if due {
            self.take()
        } else {
            None
        }
    }

    /// Whatever is waiting, now (end of input, shutdown).
    pub fn take(&mut self) -> Option<Vec<v1::Event>> {
        self.first_at = None;
        self.urgent = false;
        if self.events.is_empty() {
            return None;
        }
        Some(std::mem::replace(&mut self.events, Vec::with_capacity(self.max_events.min(1024))))
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// No event waiting.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ts_ns: i64) -> v1::Event {
        v1::Event {
            kind: Some(v1::event::Kind::Watermark(v1::Watermark {
                ts_ns,
                since_ns: 0,
                ended: false,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn cuts_when_full() {
        let t0 = Instant::now();
        let mut b = Batcher::new(3, Duration::from_millis(200));
        assert!(b.push(event(1), t0).is_none());
        assert!(b.push(event(2), t0).is_none());
        let batch = b.push(event(3), t0).expect("full");
        assert_eq!(batch, vec![event(1), event(2), event(3)]);
        assert!(b.is_empty());
        assert!(b.poll(t0 + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn cuts_when_the_oldest_event_is_old_enough() {
        let t0 = Instant::now();
        let mut b = Batcher::new(1000, Duration::from_millis(200));
        b.push(event(1), t0);
        b.push(event(2), t0 + Duration::from_millis(150));
        assert!(b.poll(t0 + Duration::from_millis(199)).is_none());
        assert_eq!(b.poll(t0 + Duration::from_millis(200)).map(|v| v.len()), Some(2));
        // The clock starts again with the next event, not the previous batch.
        b.push(event(3), t0 + Duration::from_millis(300));
        assert!(b.poll(t0 + Duration::from_millis(450)).is_none());
        assert_eq!(b.poll(t0 + Duration::from_millis(500)).map(|v| v.len()), Some(1));
    }

    #[test]
    fn urgent_events_are_cut_at_the_next_poll() {
        let t0 = Instant::now();
        let mut b = Batcher::new(1000, Duration::from_millis(200));
        b.mark_urgent();
        assert!(b.poll(t0).is_none(), "nothing waiting: nothing to cut");
        b.push(event(1), t0);
        assert!(b.poll(t0).is_none());
        b.mark_urgent();
        assert_eq!(b.poll(t0).map(|v| v.len()), Some(1));
        // The mark goes with the batch it was for.
        b.push(event(2), t0);
        assert!(b.poll(t0 + Duration::from_millis(100)).is_none());
    }

    #[test]
    fn take_flushes_and_limits_can_change() {
        let t0 = Instant::now();
        let mut b = Batcher::new(10, Duration::from_secs(1));
        assert!(b.take().is_none());
        b.push(event(1), t0);
        b.set_max_events(2);
        assert_eq!(b.push(event(2), t0).map(|v| v.len()), Some(2));
        b.push(event(3), t0);
        assert_eq!(b.len(), 1);
        assert_eq!(b.take().map(|v| v.len()), Some(1));
    }
}
