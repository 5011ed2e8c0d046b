//! Reading: the reset filter, the cause and flag vocabularies, and the scans behind
//! [`Store::resets`] and [`Store::connection`].

use std::collections::HashSet;
use std::ops::Bound;

use prost::Message;
use rstscope_proto::{v1, FlowKey};

use super::keys::{ts_bytes, StoreSeq, ValueHeader, FIRST_RECORD_KEY, KIND_FLOW, KIND_OPEN, KIND_RESET};
use super::{Store, StoreError, TREE_NAMES};

/// Selects stored resets. `Default` selects everything, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResetQuery {
    /// From this event time (ns since the epoch), inclusive.
    pub since_ns: Option<i64>,
    /// Until this event time, exclusive.
    pub until_ns: Option<i64>,
    /// Either endpoint inside one of these networks (a host is a /32 or /128).
    pub hosts: Vec<ipnet::IpNet>,
    /// Either endpoint on one of these ports.
    pub ports: Vec<u16>,
    /// Reported by one of these agents (names).
    pub agents: Vec<String>,
    /// With one of these causes, by vocabulary name ([`CAUSE_NAMES`]).
    pub causes: Vec<String>,
    /// With exactly one of these flag sets, as letters (`R`, `RA`; any order).
    pub flags: Vec<String>,
    /// With one of these verdicts (`end-to-end`, `injected`, ...). Only merged reports
    /// ([`Store::reports`]) have verdicts; [`Store::resets`] ignores this, its caller decides
    /// what a raw record's verdict is.
    pub verdicts: Vec<String>,
    /// Only the newest N matches (still returned oldest first).
    pub last: Option<usize>,
    /// At most this many results (with `last`, the newest of them).
    pub limit: Option<usize>,
    /// Only records after this position (exclusive): paging and following.
    pub after: Option<StoreSeq>,
}

/// One stored RST as one agent reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredReset {
    /// The reporting agent's name.
    pub agent: String,
    /// The connection, direction-free.
    pub key: FlowKey,
    /// The event exactly as the agent sent it.
    pub event: v1::RstEvent,
    /// Its position in the store (time order), usable as a cursor.
    pub seq: StoreSeq,
}

/// Everything every agent reported of one connection (4-tuple).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnectionView {
    /// Flow summaries with the reporting agent, ordered by their end time.
    pub flows: Vec<(String, v1::FlowSummary)>,
    /// Resets from every agent, in time order.
    pub resets: Vec<StoredReset>,
    /// Connection openings with the reporting agent, ordered by their start time.
    pub opens: Vec<(String, v1::ConnectionOpen)>,
}

/// Cause vocabulary (shared/docs/reset-causes.md, section 2), indexed by the `v1::Cause` value;
/// `CAUSE_UNSPECIFIED` reads as "unknown".
pub const CAUSE_NAMES: [&str; 11] = [
    "unknown",
    "refused",
    "duplicate-syn-cancel",
    "retransmission-timeout",
    "app-abort",
    "no-connection",
    "port-reuse",
    "after-close",
    "middlebox",
    "lone",
    "unknown",
];

/// The vocabulary name of a `v1::Cause` value ("unknown" for anything out of range).
pub fn cause_name(cause: i32) -> &'static str {
    usize::try_from(cause).ok().and_then(|i| CAUSE_NAMES.get(i)).copied().unwrap_or("unknown")
}

/// TCP flag letters in the order the agent prints them, with their bits.
const FLAG_LETTERS: [(char, u16); 9] = [
    ('S', 0x02),
    ('F', 0x01),
    ('R', 0x04),
    ('P', 0x08),
    ('A', 0x10),
    ('U', 0x20),
    ('E', 0x40),
    ('C', 0x80),
    ('N', 0x100),
];
/// The bits the letters cover; the reserved bits 9..11 never take part in a comparison.
pub(super) const FLAG_MASK: u16 = 0x1ff;

/// Flag bits as the agent prints them (`S F R P A U E C N` order), e.g. 0x14 → "RA".
pub fn flag_letters(flags: u32) -> String {
    FLAG_LETTERS.iter().filter(|(_, bit)| flags & u32::from(*bit) != 0).map(|(c, _)| *c).collect()
}

/// Parses flag letters in any order and case ("ra", "AR") into bits.
pub fn parse_flag_letters(text: &str) -> Result<u16, StoreError> {
    text.chars().try_fold(0u16, |bits, c| {
        let upper = c.to_ascii_uppercase();
        FLAG_LETTERS
            .iter()
            .find(|(letter, _)| *letter == upper)
            .map(|(_, bit)| bits | bit)
            .ok_or_else(|| StoreError::Invalid(format!("unknown TCP flag {c:?} in {text:?} (letters: SFRPAUECN)")))
    })
}

impl ResetQuery {
    /// Whether `reset` passes the filters (time, hosts, ports, agents, causes, flags, `after`);
    /// `last` and `limit` are about result sets and are ignored. For following: apply it to what
    /// [`Store::subscribe_resets`] delivers. Invalid flag texts match nothing (the services
    /// validate them first; [`Store::resets`] reports them).
    pub fn matches(&self, reset: &StoredReset) -> bool {
        let ts = reset.event.ts_ns;
        let (lo, hi) = (reset.key.lo(), reset.key.hi());
        let cause = cause_name(reset.event.cause);
        let flags = (reset.event.flags & u32::from(FLAG_MASK)) as u16;
        self.since_ns.is_none_or(|since| ts >= since)
            && self.until_ns.is_none_or(|until| ts < until)
            && self.after.is_none_or(|after| reset.seq > after)
            && (self.hosts.is_empty() || self.hosts.iter().any(|n| n.contains(&lo.ip()) || n.contains(&hi.ip())))
            && (self.ports.is_empty() || self.ports.iter().any(|&p| p == lo.port() || p == hi.port()))
            && (self.agents.is_empty() || self.agents.contains(&reset.agent))
            && (self.causes.is_empty() || self.causes.iter().any(|c| c.eq_ignore_ascii_case(cause)))
            && (self.flags.is_empty() || self.flags.iter().any(|f| parse_flag_letters(f).is_ok_and(|b| b == flags)))
    }
}

/// A query compiled against the store: names resolved to ids and bits.
pub(super) struct Compiled {
    pub(super) agent_ids: Option<HashSet<u32>>,
    pub(super) causes: Option<HashSet<u8>>,
    pub(super) flags: Option<HashSet<u16>>,
    pub(super) hosts: Vec<ipnet::IpNet>,
    pub(super) ports: Vec<u16>,
}

impl Compiled {
    pub(super) fn new(store: &Store, q: &ResetQuery) -> Result<Compiled, StoreError> {
        let agent_ids = (!q.agents.is_empty()).then(|| {
            let names = store.names();
            q.agents.iter().filter_map(|name| names.id(name)).collect::<HashSet<u32>>()
        });
        let causes = if q.causes.is_empty() {
            None
        } else {
            let mut set = HashSet::new();
            for name in &q.causes {
                let matching: Vec<u8> = (0u8..)
                    .zip(CAUSE_NAMES)
                    .filter(|(_, vocab)| vocab.eq_ignore_ascii_case(name))
                    .map(|(i, _)| i)
                    .collect();
                if matching.is_empty() {
                    return Err(StoreError::Invalid(format!(
                        "unknown cause {name:?} (one of: {})",
                        CAUSE_NAMES[1..].join(", ")
                    )));
                }
                set.extend(matching);
                // Out-of-range cause values read as "unknown" too.
                if name.eq_ignore_ascii_case("unknown") {
                    set.insert(u8::MAX);
                }
            }
            Some(set)
        };
        let flags = if q.flags.is_empty() {
            None
        } else {
            Some(q.flags.iter().map(|f| parse_flag_letters(f)).collect::<Result<HashSet<u16>, _>>()?)
        };
        Ok(Compiled { agent_ids, causes, flags, hosts: q.hosts.clone(), ports: q.ports.clone() })
    }

    fn matches_agent(&self, agent_id: u32) -> bool {
        self.agent_ids.as_ref().is_none_or(|ids| ids.contains(&agent_id))
    }

    fn matches_header(&self, h: &ValueHeader) -> bool {
        let (lo, hi) = (h.key.lo(), h.key.hi());
        (self.hosts.is_empty() || self.hosts.iter().any(|net| net.contains(&lo.ip()) || net.contains(&hi.ip())))
            && (self.ports.is_empty() || self.ports.iter().any(|&p| p == lo.port() || p == hi.port()))
            && self.causes.as_ref().is_none_or(|c| c.contains(&h.cause))
            && self.flags.as_ref().is_none_or(|f| f.contains(&(h.flags & FLAG_MASK)))
    }
}

impl Store {
    /// Stored resets matching `q`, in time order (event time, then agent id, then arrival).
    ///
    /// The time bounds and `after` become the bounds of one range scan over the time-ordered
    /// keys; agent is checked from the key and the other filters from the fixed value header, so
    /// only returned events are decoded. `last` scans backwards and stops after N matches.
    pub fn resets(&self, q: &ResetQuery) -> Result<Vec<StoredReset>, StoreError> {
        let compiled = Compiled::new(self, q)?;
        if compiled.agent_ids.as_ref().is_some_and(HashSet::is_empty) {
            return Ok(Vec::new());
        }
        let cap = match (q.last, q.limit) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(usize::MAX),
        };
        if cap == 0 {
            return Ok(Vec::new());
        }
        // Never below the first record key: the tallies live there.
        let since = ts_bytes(q.since_ns.unwrap_or(0)).max(FIRST_RECORD_KEY);
        let mut start: Bound<Vec<u8>> = Bound::Included(since.to_vec());
        if let Some(after) = q.after {
            let after = after.to_bytes().to_vec();
            let later = match &start {
                Bound::Included(s) => after >= *s,
                _ => true,
            };
            if later {
                start = Bound::Excluded(after);
            }
        }
        let end: Bound<Vec<u8>> = match q.until_ns {
            Some(until) => Bound::Excluded(ts_bytes(until).to_vec()),
            None => Bound::Unbounded,
        };
        if let (Some(since), Some(until)) = (q.since_ns, q.until_ns) {
            if since >= until {
                return Ok(Vec::new());
            }
        }
        let names = self.names();
        let tree = self.tree(KIND_RESET);
        let iter = if q.last.is_some() { tree.range_rev((start, end)) } else { tree.range((start, end)) };
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item?;
            let Some(seq) = StoreSeq::from_bytes(&k) else {
                self.corrupt("resets", &k, "malformed key");
                continue;
            };
            if !compiled.matches_agent(seq.agent_id) {
                continue;
            }
            let Some((header, body)) = ValueHeader::decode(&v) else {
                self.corrupt("resets", &k, "malformed value header");
                continue;
            };
            if !compiled.matches_header(&header) {
                continue;
            }
            let event = match v1::RstEvent::decode(body) {
                Ok(event) => event,
                Err(_) => {
                    self.corrupt("resets", &k, "undecodable RstEvent");
                    continue;
                }
            };
            out.push(StoredReset { agent: names.name(seq.agent_id), key: header.key, event, seq });
            if out.len() >= cap {
                break;
            }
        }
        if q.last.is_some() {
            out.reverse();
        }
        Ok(out)
    }

    /// Everything every agent reported of the connection `key`: its entries in the connection
    /// index (a few seeks per stored hour), then a point read per record.
    pub fn connection(&self, key: &FlowKey) -> Result<ConnectionView, StoreError> {
        let names = self.names();
        let mut view = ConnectionView::default();
        let (mut flows, mut opens) = (Vec::new(), Vec::new());
        for (kind, record_key) in self.inner.conn.lookup(key)? {
            let Some(seq) = StoreSeq::from_bytes(&record_key) else { continue };
            if !matches!(kind, KIND_FLOW | KIND_RESET | KIND_OPEN) {
                self.corrupt("conn_runs", &record_key, "unknown record kind");
                continue;
            }
            // A missing record: a batch interrupted between the index and its records (it is
            // resent), or removed by retention before the index's hour was dropped. Skip it.
            let Some(value) = self.tree(kind).get(&record_key)? else { continue };
            let Some((header, body)) = ValueHeader::decode(&value) else {
                self.corrupt(TREE_NAMES[usize::from(kind)], &record_key, "malformed value header");
                continue;
            };
            let agent = names.name(seq.agent_id);
            match kind {
                KIND_FLOW => match v1::FlowSummary::decode(body) {
                    Ok(flow) => flows.push((seq, agent, flow)),
                    Err(_) => self.corrupt("flows", &record_key, "undecodable FlowSummary"),
                },
                KIND_OPEN => match v1::ConnectionOpen::decode(body) {
                    Ok(open) => opens.push((seq, agent, open)),
                    Err(_) => self.corrupt("opens", &record_key, "undecodable ConnectionOpen"),
                },
                _ => match v1::RstEvent::decode(body) {
                    Ok(event) => view.resets.push(StoredReset { agent, key: header.key, event, seq }),
                    Err(_) => self.corrupt("resets", &record_key, "undecodable RstEvent"),
                },
            }
        }
        flows.sort_by_key(|(seq, _, _)| *seq);
        opens.sort_by_key(|(seq, _, _)| *seq);
        view.resets.sort_by_key(|r| r.seq);
        view.flows = flows.into_iter().map(|(_, agent, flow)| (agent, flow)).collect();
        view.opens = opens.into_iter().map(|(_, agent, open)| (agent, open)).collect();
        Ok(view)
    }
}
