//! The texts of reports (times, record labels, ids, evidence), built by appending to one
//! `String` instead of through `format!`.
//!
//! Why: the correlator writes several such texts into every report it decides, and at ingest
//! rates `format!` with its padding and hexadecimal machinery, and the intermediate strings of
//! nested formats, cost more than all the deciding. Each function here writes exactly what the
//! `format!` in its doc writes; the tests compare them.

/// Appends `crate::pb::ts_text(ns)`: `[-]seconds.nanoseconds` (9 digits).
pub(crate) fn push_ts(out: &mut String, ns: i64) {
    if ns < 0 {
        out.push('-');
    }
    let abs = ns.unsigned_abs();
    push_u64(out, abs / 1_000_000_000);
    out.push('.');
    let mut frac = abs % 1_000_000_000;
    let mut digits = [b'0'; 9];
    for d in digits.iter_mut().rev() {
        *d = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    out.push_str(std::str::from_utf8(&digits).unwrap_or_default());
}

/// `crate::pb::ts_text(ns)`.
pub(crate) fn ts(ns: i64) -> String {
    let mut out = String::with_capacity(24);
    push_ts(&mut out, ns);
    out
}

/// Appends `format!("{v}")`.
pub(crate) fn push_u64(out: &mut String, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

/// Appends `format!("{v:016x}")`.
pub(crate) fn push_hex16(out: &mut String, v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    for (i, d) in digits.iter_mut().enumerate() {
        *d = HEX[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    out.push_str(std::str::from_utf8(&digits).unwrap_or_default());
}

/// `format!("{v:016x}")`.
pub(crate) fn hex16(v: u64) -> String {
    let mut out = String::with_capacity(16);
    push_hex16(&mut out, v);
    out
}

/// A record's label, `format!("{agent}/{conn_id:016x}")`.
pub(crate) fn record_label(agent: &str, conn_id: u64) -> String {
    let mut out = String::with_capacity(agent.len() + 17);
    out.push_str(agent);
    out.push('/');
    push_hex16(&mut out, conn_id);
    out
}

/// Concatenates `parts` into one string of the right capacity.
pub(crate) fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.push_str(p);
    }
    out
}

/// `format!("{agent} saw it {verb} at {} (TTL {ttl})", crate::pb::ts_text(ts_ns))`.
pub(crate) fn sighting(agent: &str, verb: &str, ts_ns: i64, ttl: u32) -> String {
    let mut out = String::with_capacity(agent.len() + verb.len() + 48);
    out.push_str(agent);
    out.push_str(" saw it ");
    out.push_str(verb);
    out.push_str(" at ");
    push_ts(&mut out, ts_ns);
    out.push_str(" (TTL ");
    push_u64(&mut out, u64::from(ttl));
    out.push(')');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn texts_are_those_of_format() {
        let times = [
            0,
            1,
            -1,
            999_999_999,
            1_000_000_000,
            -1_000_000_001,
            1_700_000_000_123_456_789,
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
        ];
        for ns in times {
            assert_eq!(ts(ns), pb::ts_text(ns), "{ns}");
        }
        for v in [0u64, 1, 9, 10, 255, 65_535, 1 << 32, u64::MAX, 0x0123_4567_89ab_cdef] {
            let mut out = String::new();
            push_u64(&mut out, v);
            assert_eq!(out, format!("{v}"));
            assert_eq!(hex16(v), format!("{v:016x}"));
            assert_eq!(record_label("edge-1", v), format!("edge-1/{v:016x}"));
        }
        assert_eq!(
            sighting("client", "leave", 1_700_000_000_000_000_042, 64),
            format!("client saw it leave at {} (TTL 64)", pb::ts_text(1_700_000_000_000_000_042))
        );
        assert_eq!(concat(&["a", ": ", "b c"]), "a: b c");
    }
}
