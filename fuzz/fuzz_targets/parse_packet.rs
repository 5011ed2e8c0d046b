//! `wire::parse` on arbitrary frames: the first byte picks a supported link type, the rest is
//! the frame. The contract is "never panics, never loops".
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstscope_agent::wire::{self, LinkType};

const LINK_TYPES: [LinkType; 16] = [
    LinkType::NULL,
    LinkType::ETHERNET,
    LinkType::PPP,
    LinkType::FDDI,
    LinkType::RAW_12,
    LinkType::RAW_14,
    LinkType::PPP_HDLC,
    LinkType::RAW,
    LinkType::C_HDLC,
    LinkType::LOOP,
    LinkType::LINUX_SLL,
    LinkType::IPV4,
    LinkType::IPV6,
    LinkType::NFLOG,
    LinkType::LINUX_SLL2,
    // Not decoded: exercises the Skip::UnsupportedLinkType path.
    LinkType(147),
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, frame)) = data.split_first() else { return };
    let link_type = LINK_TYPES[usize::from(pick) % LINK_TYPES.len()];
    if let Ok(seg) = wire::parse(link_type, 0, frame) {
        // Cheap sanity checks on what came out.
        let _ = seg.seq_len();
        let _ = seg.flags.to_string();
        assert_eq!(seg.ts_ns, 0);
    }
});
