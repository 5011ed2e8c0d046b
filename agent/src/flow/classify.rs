//! Why was this RST sent, and does it look forged? Pure functions over a connection and a packet.
//!
//! [`build`] runs when a RST arrives, before the tracker applies it, so it sees the connection as
//! the RST found it. It decides the local cause hypothesis (vocabulary of
//! `shared/docs/reset-causes.md`, section 2) and records the single-vantage injection signs of
//! section 3 as named evidence. Some signs only show after the RST (data from the "resetting"
//! sender still arriving, a burst of RSTs, a challenge ACK); [`observe_after`] adds those while the
//! event waits out the settle window in its connection. Rule of the house: prefer a missed
//! injection to a false accusation, and say `unknown` rather than guess.
//!
//! `ip-id-zero` is a sign only for RSTs sent by a live socket (`app-abort`,
//! `retransmission-timeout`, `duplicate-syn-cancel`, `unknown`): such a socket numbers its
//! packets, so an IP ID of 0 among non-zero ones points at another sender. A stack that answers a
//! segment it holds no socket for (`refused`, `no-connection`, `port-reuse`, the TIME-WAIT
//! answers of `after-close`) replies statelessly, and Linux sends those replies with DF set and
//! IP ID 0 (its per-namespace control socket has no ID counter for the peer). There a 0 is what
//! the genuine RST looks like, so the sign is not raised; the raw `ip_id_delta` is still
//! reported. Other stacks number such replies like any packet, so nothing is lost for them.
//! The same holds for a bare RST (no ACK) taking the ack of the peer's FIN as its seq, whatever
//! the local cause: RFC 793's stateless answer, from a stack whose socket went away for a reason
//! this vantage may not see (a RST forged towards the other end, a crash). The price: an on-path
//! forger answering a FIN in that shape loses this one sign (house rule: a missed injection
//! before a false accusation); the other signs and the other vantage points still count.
//! (DF would not tell the two apart: nftables' `reject with tcp reset` also sends DF and ID 0.)

use super::conn::{seen, Conn, SeqNumber, Side};
use crate::event::{Answered, Cause, Evidence, Phase, Role, RstEvent, SeqRelation};
use crate::wire::{Checksum, Segment, TcpFlags};

/// TTL difference from earlier packets of the same sender that counts as suspicious.
const TTL_SLACK: i16 = 2;
/// IP ID distance from the sender's last ID that counts as far outside its range.
const IP_ID_FAR: i32 = 4096;
/// Window in which RSTs from the same sender form a burst, or a seq jump, or both directions.
const BURST_WINDOW_NS: i64 = 2_000_000_000;
/// Both endpoints reset "at nearly the same time".
const BOTH_DIRECTIONS_NS: i64 = 1_000_000_000;
/// Two SYNs from one client this close together race each other (SMB-style).
pub(crate) const SYN_RACE_NS: i64 = 50_000_000;
/// The losing race is cancelled within about one round trip of its SYN-ACK.
const CANCEL_WITHIN_NS: i64 = 1_000_000_000;
/// A listener that accepted a connection this recently and now refuses is overloaded.
const LISTENER_RECENT_NS: i64 = 60_000_000_000;
/// A sender silent this long may have lost its state (NAT or firewall timeouts start here).
const SILENT_NS: i64 = 30_000_000_000;

/// Evidence names that support a cause (as opposed to injection signs).
const CAUSE_EVIDENCE: &[&str] = &[
    "no-other-packet",
    "answers-syn",
    "listener-overloaded",
    "stale-ack",
    "tuple-reused",
    "racing-syn",
    "cancelled-after-syn-ack",
    "fin-both-directions",
    "retransmissions-before",
    "answers-segment",
    "in-sequence",
    "after-peer-data",
];

/// What the tracker knows beyond this one connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct Context {
    /// Another SYN from the same client to the same server host on a different port, this close
    /// (ns) to this connection's SYN.
    pub racing_syn_gap_ns: Option<i64>,
    /// Time since the server endpoint last answered a SYN with SYN-ACK (ns).
    pub listener_last_accept_ago_ns: Option<i64>,
}

fn seq_len(flags: u8, len: u32) -> u32 {
    len.wrapping_add(u32::from(flags & (TcpFlags::SYN as u8) != 0))
        .wrapping_add(u32::from(flags & (TcpFlags::FIN as u8) != 0))
}

/// Receive window of `receiver` in bytes, scaled when both SYNs negotiated scaling.
fn window_of(receiver: &Side, sender: &Side) -> u32 {
    // Scaling is in force only when both SYNs were seen carrying the option.
    let scale = match (receiver.wscale(), sender.wscale()) {
        (Some(r), Some(_)) => r,
        _ => 0,
    };
    u32::from(receiver.window) << scale
}

fn seq_relation(seg: &Segment, sender: &Side, receiver: &Side) -> SeqRelation {
    // A receiver still in SYN-SENT accepts a RST only if it acknowledges its SYN (RFC 9293 3.10.7.3).
    if receiver.has(seen::SYN) && !receiver.has(seen::ACK) && !sender.has(seen::ANY) {
        return if seg.flags.ack() && Some(seg.ack) == receiver.isn.map(|isn| isn.wrapping_add(1)) {
            SeqRelation::Exact
        } else {
            SeqRelation::OutOfWindow
        };
    }
    let seq = SeqNumber(seg.seq);
    // RCV.NXT lies between what the receiver acknowledged and what the sender has sent.
    let acked = receiver.has(seen::ACK).then_some(SeqNumber(receiver.last_ack));
    let sent = sender.has(seen::ANY).then_some(sender.next_seq);
    if acked == Some(seq) || sent == Some(seq) {
        return SeqRelation::Exact;
    }
    let Some(left) = acked.or(sent) else {
        return SeqRelation::Unknown;
    };
    let window = window_of(receiver, sender).max(1);
    let offset = seq.delta(left);
    if offset >= 0 && (offset as u32) < window {
        SeqRelation::InWindow
    } else {
        SeqRelation::OutOfWindow
    }
}

/// Builds the event for RST `seg` sent in direction `dir` of `conn` (state before the RST).
pub fn build(conn: &Conn, dir: usize, seg: &Segment, ctx: &Context) -> RstEvent {
    let sender = conn.side(dir);
    let peer = conn.side(1 - dir);
    let phase = conn.phase();
    let role = conn.role_of(dir);
    let mut evidence = Vec::new();

    let answers = peer.has(seen::ANY).then(|| Answered {
        ts_ns: peer.last_ts,
        flags: conn.flags_of_last(1 - dir),
        seq: peer.last_seq,
        ack: peer.last_ack,
        payload_len: peer.last_len,
    });
    let answers = answers.filter(|a| {
        let acks_it = seg.flags.ack() && seg.ack == a.seq.wrapping_add(seq_len(a.flags.byte(), a.payload_len));
        let takes_its_ack = a.flags.ack() && seg.seq == a.ack;
        acks_it || takes_its_ack
    });

    let ttl_delta = sender.has(seen::ANY).then(|| i16::from(seg.ttl) - i16::from(sender.ttl_last));
    let ip_id_delta = match (seg.ip_id, sender.has(seen::IP_ID)) {
        (Some(id), true) => Some(i32::from(id.wrapping_sub(sender.ip_id_last) as i16)),
        _ => None,
    };
    let relation = seq_relation(seg, &sender, &peer);

    // --- Cause: the first rule whose wire signature matches. ---
    let stale_ack_answered = peer.has(seen::ANY)
        && !peer.has(seen::SYN)
        && peer.has(seen::ACK)
        && sender.has(seen::SYN)
        && sender.isn.is_some_and(|isn| peer.last_ack != isn.wrapping_add(1))
        && seg.seq == peer.last_ack;
    let cause = if phase == Phase::None {
        evidence.push(Evidence::new("no-other-packet", "first packet seen of this connection"));
        Cause::Lone
    } else if role == Role::Responder
        && phase == Phase::SynSent
        && seg.flags.ack()
        && Some(seg.ack) == peer.isn.map(|isn| isn.wrapping_add(1))
    {
        evidence.push(Evidence::new("answers-syn", format!("RST+ACK with ack = ISN+1 ({}) and no SYN-ACK", seg.ack)));
        if let Some(ago) = ctx.listener_last_accept_ago_ns.filter(|ago| *ago < LISTENER_RECENT_NS) {
            evidence.push(Evidence::new(
                "listener-overloaded",
                format!("the same port accepted a connection {} ago", fmt_ns(ago)),
            ));
        }
        Cause::Refused
    } else if role == Role::Originator && matches!(phase, Phase::SynSent | Phase::Midstream) && stale_ack_answered {
        evidence.push(Evidence::new(
            "stale-ack",
            format!("the responder answered the SYN with an ACK for {} instead of a SYN-ACK", peer.last_ack),
        ));
        if conn.port_reuse() {
            evidence.push(Evidence::new("tuple-reused", "this SYN reused the 4-tuple of a recently closed connection"));
        }
        Cause::PortReuse
    } else if let (Role::Originator, Phase::SynReceived, Some(gap)) = (role, phase, ctx.racing_syn_gap_ns) {
        let since_synack = seg.ts_ns - peer.last_ts;
        if since_synack <= CANCEL_WITHIN_NS {
            evidence.push(Evidence::new(
                "racing-syn",
                format!("another SYN from this client to the same host {} apart", fmt_ns(gap)),
            ));
            evidence.push(Evidence::new(
                "cancelled-after-syn-ack",
                format!("RST {} after the SYN-ACK", fmt_ns(since_synack)),
            ));
            Cause::DuplicateSynCancel
        } else {
            Cause::Unknown
        }
    } else if phase == Phase::Closing {
        evidence.push(Evidence::new("fin-both-directions", "both sides had sent FIN"));
        Cause::AfterClose
    } else if sender.rexmit_run() >= 2 && relation_near_sender(seg, &sender) {
        evidence.push(Evidence::new(
            "retransmissions-before",
            format!(
                "{} retransmissions of unacknowledged data by the sender, last {} before the RST",
                sender.rexmit_run(),
                fmt_ns(seg.ts_ns - sender.last_ts)
            ),
        ));
        Cause::RetransmissionTimeout
    } else if answers.is_some_and(|a| a.flags.ack() && seg.seq == a.ack)
        && (phase == Phase::Reset
            || sender.has(seen::RESET_IN)
            || !sender.has(seen::ANY)
            || seg.ts_ns - sender.last_ts > SILENT_NS)
    {
        let mut why = if sender.has(seen::RST) {
            "the sender had already reset the connection".to_string()
        } else if sender.has(seen::RESET_IN) {
            // The peer may have kept talking after its RST (a forged RST kills only the
            // receiver's socket), which moves the phase on; the sender's socket stays gone.
            format!(
                "the sender received a RST from the peer and has sent nothing since (its last packet {} before), \
                 so its socket is gone{}",
                fmt_ns(seg.ts_ns - sender.last_ts),
                if phase == Phase::Reset { "" } else { "; the peer kept sending after that RST" }
            )
        } else if phase == Phase::Reset {
            "the connection had already been reset".to_string()
        } else if !sender.has(seen::ANY) {
            "the sender had not sent anything on this connection record".to_string()
        } else {
            format!("the sender was silent for {}", fmt_ns(seg.ts_ns - sender.last_ts))
        };
        if sender.has(seen::ANY) && seg.seq != sender.next_seq.0 {
            why += &format!(
                " (its next seq was {}: {} bytes of sequence space it sent were never acknowledged)",
                sender.next_seq.0,
                sender.next_seq.delta(SeqNumber(seg.seq))
            );
        }
        evidence
            .push(Evidence::new("answers-segment", format!("seq = the answered segment's ack ({}); {why}", seg.seq)));
        Cause::NoConnection
    } else if matches!(phase, Phase::Established | Phase::HalfClosed | Phase::Midstream)
        && sender.has(seen::ANY)
        && sender.rexmit_run() == 0
        && seg.seq == sender.next_seq.0
    {
        evidence.push(Evidence::new("in-sequence", format!("seq {} is the sender's next sequence number", seg.seq)));
        if peer.has(seen::ANY) && peer.last_len > 0 {
            evidence.push(Evidence::new(
                "after-peer-data",
                format!("{} after {} bytes from the peer", fmt_ns(seg.ts_ns - peer.last_ts), peer.last_len),
            ));
        }
        Cause::AppAbort
    } else {
        Cause::Unknown
    };

    // --- Single-vantage injection signs. ---
    if sender.has(seen::ANY) {
        let lo = i16::from(sender.ttl_min) - TTL_SLACK;
        let hi = i16::from(sender.ttl_max) + TTL_SLACK;
        if !(lo..=hi).contains(&i16::from(seg.ttl)) {
            evidence.push(Evidence::new(
                "ttl-mismatch",
                format!("RST TTL {} outside the sender's earlier {}..{}", seg.ttl, sender.ttl_min, sender.ttl_max),
            ));
        }
    }
    // Stateless answers carry IP ID 0 on Linux (module docs): no `ip-id-zero` for them. That
    // includes a bare RST (no ACK) taking the ack of the peer's FIN as its seq: the answer of
    // a stack whose socket is gone for a reason this vantage may not have seen (a RST forged
    // towards the other end, a crash); a live socket closing on the peer's FIN sends RST+ACK.
    let answers_fin_statelessly =
        !seg.flags.ack() && answers.is_some_and(|a| a.flags.fin() && a.flags.ack() && seg.seq == a.ack);
    let stateless_answer = answers_fin_statelessly
        || matches!(cause, Cause::Refused | Cause::NoConnection | Cause::PortReuse | Cause::AfterClose);
    if let (Some(id), true) = (seg.ip_id, sender.has(seen::IP_ID)) {
        if id == 0 && stateless_answer {
            // Not a sign: see the module docs.
        } else if id == 0 && sender.ip_id_last != 0 {
            evidence.push(Evidence::new(
                "ip-id-zero",
                format!("IP ID 0 where the sender's last was {}", sender.ip_id_last),
            ));
        } else if ip_id_delta.is_some_and(|d| d.unsigned_abs() > IP_ID_FAR as u32) && sender.ip_id_last != 0 {
            evidence.push(Evidence::new(
                "ip-id-outlier",
                format!("IP ID {id} far from the sender's last {}", sender.ip_id_last),
            ));
        }
    }
    if role == Role::Responder {
        match phase {
            Phase::SynReceived | Phase::Established
                if !peer.has(seen::DATA) && !sender.has(seen::DATA) && phase == Phase::Established =>
            {
                evidence.push(Evidence::new("stage-after-handshake", "RST right after the handshake, before any data"))
            }
            Phase::Established
                if peer.has(seen::DATA) && peer.bytes == u64::from(peer.last_len) && !sender.has(seen::DATA) =>
            {
                evidence.push(Evidence::new(
                    "stage-after-first-data",
                    "RST right after the originator's first data segment",
                ))
            }
            _ => {}
        }
    }
    if seg.flags.0 & TcpFlags::RESERVED != 0 {
        evidence.push(Evidence::new(
            "reserved-bits",
            format!(
                "reserved TCP header bits set ({:#05x}); no real stack sets them",
                seg.flags.0 & TcpFlags::RESERVED
            ),
        ));
    }
    if relation == SeqRelation::OutOfWindow {
        evidence.push(Evidence::new(
            "out-of-window",
            "the receiver cannot accept this RST: its sequence or acknowledgment number is outside what it expects",
        ));
    }
    if relation == SeqRelation::InWindow {
        evidence.push(Evidence::new("ineffective", "seq inside the window but not the expected one: the receiver should answer with a challenge ACK (RFC 5961)"));
    }
    if !seg.ip_header_ok {
        evidence
            .push(Evidence::new("bad-ip-checksum", "IPv4 header checksum is wrong: no receiver accepts this packet"));
    }
    if seg.checksum == Checksum::Bad {
        evidence.push(Evidence::new("bad-checksum", "TCP checksum is wrong: no socket accepts this segment"));
    }
    if seg.payload_len > 0 {
        evidence.push(Evidence::new("payload", format!("RST carries {} bytes of payload", seg.payload_len)));
    }

    RstEvent {
        ts_ns: seg.ts_ns,
        src: seg.src,
        dst: seg.dst,
        conn_id: crate::event::ConnId::new(&conn.key, conn.start_ns),
        sender: role,
        flags: seg.flags,
        payload_len: seg.payload_len,
        seq: seg.seq,
        ack: seg.ack,
        window: seg.window,
        ttl: seg.ttl,
        ip_id: seg.ip_id,
        checksum: seg.checksum,
        phase,
        history: conn.zeek.history().as_str().to_owned(),
        counts: conn.counts(),
        peer_retransmissions: u32::from(peer.rexmit_run()),
        sender_retransmissions: u32::from(sender.rexmit_run()),
        since_peer_last_ns: peer.has(seen::ANY).then(|| seg.ts_ns - peer.last_ts),
        seq_relation: relation,
        ttl_delta,
        ip_id_delta,
        answers,
        cause,
        evidence,
    }
}

/// Whether the receiver of the RST `event` describes would accept it and drop its connection:
/// its seq is the expected one (or cannot be checked) and no checksum makes it undeliverable.
pub(crate) fn acceptable(event: &RstEvent) -> bool {
    matches!(event.seq_relation, SeqRelation::Exact | SeqRelation::Unknown)
        && event.checksum != Checksum::Bad
        && !event.evidence.iter().any(|e| e.name == "bad-ip-checksum")
}

/// The RST's seq is where the retransmitting sender stood.
fn relation_near_sender(seg: &Segment, sender: &Side) -> bool {
    let seq = SeqNumber(seg.seq);
    let from = SeqNumber(sender.last_seq);
    seq.delta(from) >= 0 && !seq.after(sender.next_seq)
}

fn add_once(event: &mut RstEvent, name: &'static str, detail: String) {
    if !event.evidence.iter().any(|e| e.name == name) {
        event.evidence.push(Evidence::new(name, detail));
    }
}

/// Adds the evidence that packets after a RST reveal to the RSTs still waiting in `pending`.
/// `seg` was sent in direction `dir` (`conn` is the state before `seg` is applied); when `seg` is
/// itself a RST, `new` is its freshly built event, which joins burst and both-directions findings.
pub fn observe_after(pending: &mut [RstEvent], new: Option<&mut RstEvent>, conn: &Conn, dir: usize, seg: &Segment) {
    let role = conn.role_of(dir);
    let sender = conn.side(dir);
    if let Some(new) = new {
        let same: Vec<usize> = (0..pending.len())
            .filter(|&i| pending[i].sender == role && seg.ts_ns - pending[i].ts_ns <= BURST_WINDOW_NS)
            .collect();
        if let Some(&first) = same.first() {
            let is_copy = |e: &RstEvent| e.seq == seg.seq && e.ack == seg.ack && e.flags == seg.flags;
            if let Some(original) = same.iter().map(|&i| &pending[i]).find(|e| is_copy(e)) {
                // The same RST again: it has the same reason as the first one.
                new.cause = original.cause;
                new.evidence.retain(|e| !CAUSE_EVIDENCE.contains(&e.name));
                new.evidence.extend(original.evidence.iter().filter(|e| CAUSE_EVIDENCE.contains(&e.name)).cloned());
                new.evidence
                    .push(Evidence::new("repeated-rst", "same seq, ack and flags as an earlier RST from this sender"));
            }
            let identical = same.iter().filter(|&&i| is_copy(&pending[i])).count();
            let first_seq = SeqNumber(pending[first].seq);
            let step = SeqNumber(seg.seq).delta(first_seq);
            let window_steps = same.iter().all(|&i| {
                let d = SeqNumber(pending[i].seq).delta(first_seq);
                d >= 0 && d % 1460 == 0
            }) && step > 0
                && step % 1460 == 0;
            let last = &pending[*same.last().unwrap_or(&first)];
            let window_plus_one = seg.window == last.window.wrapping_add(1) && seg.flags.ack();
            let pattern = if identical >= 2 {
                Some(format!("{} identical RSTs within {}", identical + 1, fmt_ns(BURST_WINDOW_NS)))
            } else if window_steps {
                Some(format!("RST seqs step by multiples of 1460 from {}", first_seq.0))
            } else if window_plus_one {
                Some("RST+ACK windows increase by one each time".to_string())
            } else {
                None
            };
            if let Some(detail) = pattern {
                for &i in &same {
                    add_once(&mut pending[i], "rst-burst", detail.clone());
                }
                add_once(new, "rst-burst", detail);
            }
            if sender.has(seen::ANY) && SeqNumber(seg.seq).delta(sender.next_seq) > 1 {
                let detail = format!(
                    "RSTs within {} jump to seq {} beyond anything the sender sent",
                    fmt_ns(BURST_WINDOW_NS),
                    seg.seq
                );
                for &i in &same {
                    add_once(&mut pending[i], "seq-jump", detail.clone());
                }
                add_once(new, "seq-jump", detail);
            }
        }
        for ev in
            pending.iter_mut().filter(|e| e.sender != role && seg.ts_ns.abs_diff(e.ts_ns) <= BOTH_DIRECTIONS_NS as u64)
        {
            let gap = fmt_ns(seg.ts_ns - ev.ts_ns);
            add_once(ev, "both-directions", format!("the other endpoint also sent a RST {gap} later"));
            add_once(new, "both-directions", format!("the other endpoint sent a RST {gap} earlier"));
        }
        return;
    }
    for ev in pending.iter_mut() {
        if ev.sender == role && (seg.payload_len > 0 || seg.flags.ack()) {
            add_once(
                ev,
                "race-after-rst",
                format!("the resetting sender kept sending {} after its RST", fmt_ns(seg.ts_ns - ev.ts_ns)),
            );
            if (i16::from(seg.ttl) - i16::from(ev.ttl)).unsigned_abs() > TTL_SLACK as u16
                && !ev.evidence.iter().any(|e| e.name == "ttl-mismatch")
            {
                add_once(
                    ev,
                    "ttl-mismatch",
                    format!("RST TTL {} but the sender's later packets have TTL {}", ev.ttl, seg.ttl),
                );
            }
        }
        if ev.sender != role && ev.seq_relation == SeqRelation::InWindow && seg.flags.ack() && seg.payload_len == 0 {
            add_once(
                ev,
                "challenge-ack",
                format!("the receiver answered with ACK {} {} later", seg.ack, fmt_ns(seg.ts_ns - ev.ts_ns)),
            );
        }
    }
}

/// Final touches when a RST leaves the settle window: a "lone" RST that was followed by other
/// packets was not lone.
pub fn finalize(event: &mut RstEvent, conn: &Conn) {
    if event.cause == Cause::Lone {
        let non_rst: u32 =
            (0..2).map(|d| conn.halves[d].pkts - u32::from(conn.counters(d).rsts).min(conn.halves[d].pkts)).sum();
        if non_rst > 0 {
            event.cause = Cause::Unknown;
            event.evidence.retain(|e| e.name != "no-other-packet");
            event.evidence.push(Evidence::new(
                "later-packets",
                "the capture starts with this RST; later packets of the connection follow",
            ));
        }
    }
}

/// `1.5ms`, `2.000s`: durations for evidence details.
///
/// Written with integer arithmetic: exact float formatting (`{:.1}`) was most of the cost of a
/// RST event. The text is exactly what formatting `ns` scaled to the unit as an `f64` gives
/// ([`fmt_ns_float`]); the one case where that differs from rounding the integer half away from
/// zero, an exact tie, goes through the float path (as do times too large for the argument
/// below). The digits are written by hand too: `format!` was still most of what remained.
pub(crate) fn fmt_ns(ns: i64) -> String {
    let abs = ns.unsigned_abs();
    let mut text = String::with_capacity(16);
    if ns < 0 {
        text.push('-');
    }
    let (step_ns, digits, unit) = match abs {
        0..1_000 => {
            push_digits(&mut text, abs, 1);
            text.push_str("ns");
            return text;
        }
        1_000..1_000_000 => (100, 1, "us"),
        1_000_000..1_000_000_000 => (100_000, 1, "ms"),
        _ => (1_000_000, 3, "s"),
    };
    // Away from a tie the exact quotient is at least 1 ns from the rounding boundary, and below
    // 2^50 ns the f64 quotient is within 2^-53 of it relative (under 0.2 ns): both round alike.
    let (steps, rem) = (abs / step_ns, abs % step_ns);
    if 2 * rem == step_ns || abs >= 1 << 50 {
        return fmt_ns_float(ns);
    }
    let steps = steps + u64::from(2 * rem > step_ns);
    let scale = 10u64.pow(digits);
    push_digits(&mut text, steps / scale, 1);
    text.push('.');
    push_digits(&mut text, steps % scale, digits);
    text.push_str(unit);
    text
}

/// Appends `n` in decimal, zero-padded to at least `width` digits.
fn push_digits(text: &mut String, mut n: u64, width: u32) {
    let mut buf = [b'0'; 20];
    let mut start = buf.len();
    while n > 0 || buf.len() - start < width as usize {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    text.extend(buf[start..].iter().map(|&d| char::from(d)));
}

/// [`fmt_ns`] by float formatting, the definition of its text.
fn fmt_ns_float(ns: i64) -> String {
    let abs = ns.unsigned_abs();
    if abs < 1_000 {
        format!("{ns}ns")
    } else if abs < 1_000_000 {
        format!("{:.1}us", ns as f64 / 1e3)
    } else if abs < 1_000_000_000 {
        format!("{:.1}ms", ns as f64 / 1e6)
    } else {
        format!("{:.3}s", ns as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The integer formatting gives exactly the float formatting's text: every value near the
    /// unit changes and the rounding boundaries (ties included), and random values of every size.
    #[test]
    fn durations_read_exactly_as_float_formatting_gives_them() {
        let mut values: Vec<i64> = vec![0, 1, 999, i64::MIN, i64::MAX, i64::MIN + 1, 1 << 50, (1 << 50) - 1, 1 << 53];
        for base in [1_000i64, 1_000_000, 1_000_000_000, 1 << 50] {
            for step in [1i64, 50, 100, 500, 50_000, 100_000, 500_000, 1_000_000] {
                for k in 0..200i64 {
                    for delta in -3..=3 {
                        values.push(base + k * step + delta);
                    }
                }
            }
            for delta in -2_000..2_000 {
                values.push(base + delta);
                values.push(base * 1_000 - 1 + delta);
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Every magnitude from nanoseconds to centuries.
            values.push((x >> (x % 60)) as i64);
        }
        let more: Vec<i64> = values.iter().map(|v| v.wrapping_neg()).collect();
        values.extend(more);
        for ns in values {
            assert_eq!(fmt_ns(ns), fmt_ns_float(ns), "{ns}");
        }
        assert_eq!((fmt_ns(1_550), fmt_ns(-2_000_000_000)), ("1.6us".to_string(), "-2.000s".to_string()));
    }
}
