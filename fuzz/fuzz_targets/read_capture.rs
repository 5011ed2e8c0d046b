//! The pcap/pcapng reader on arbitrary files: it must never panic and must always reach
//! `Poll::End` in a bounded number of calls (every call either consumes bytes or stops).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstscope_agent::capture::{FileSource, PacketSource, Poll};
use rstscope_agent::wire;

fuzz_target!(|data: &[u8]| {
    let Ok(mut src) = FileSource::from_reader("fuzz", Box::new(std::io::Cursor::new(data.to_vec())), None) else {
        return;
    };
    let bound = data.len() + 10;
    let (mut iterations, mut packets, mut errors) = (0usize, 0usize, 0usize);
    loop {
        iterations += 1;
        assert!(iterations <= bound, "reader did not end after {iterations} calls on {} bytes", data.len());
        match src.next_packet() {
            Ok(Poll::Packet(p)) => {
                packets += 1;
                assert!(p.data.len() <= data.len(), "packet longer than the file");
                // Feed the frame on, like the pipeline does.
                let _ = wire::parse(p.link_type, p.ts_ns, p.data);
            }
            Ok(Poll::Idle) => {}
            Ok(Poll::End) => break,
            Err(_) => errors += 1,
        }
    }
    let (consumed, _) = src.progress();
    assert!(consumed <= data.len() as u64, "consumed {consumed} of {} bytes", data.len());
    let _ = (packets, errors);
});
