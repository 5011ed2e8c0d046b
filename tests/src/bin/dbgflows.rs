//! temp
use rstscope_agent::capture::{FileSource, PacketSource, Poll};
use rstscope_agent::event::Event;
use rstscope_agent::flow::{Tracker, TrackerConfig};
use rstscope_agent::wire;
fn main() {
    let cfg = rstscope_tests::gen::OpenFlowsConfig { flows: 2000, ..Default::default() };
    rstscope_tests::gen::write_open_flows_file(&cfg, std::path::Path::new("/tmp/dbg/o.pcap")).unwrap();
    let mut src = FileSource::open("/tmp/dbg/o.pcap").unwrap();
    let mut t = Tracker::new(TrackerConfig::default());
    let mut n = 0;
    let mut sink = |ev: Event| { if let Event::Flow(f) = ev { if f.conn_state != "S1" || n < 3 { n += 1; if n < 8 { println!("{} {} {} {} {}", f.orig, f.resp, f.conn_state, f.history, f.end.as_str()); } } } };
    loop { match src.next_packet() { Ok(Poll::Packet(p)) => { if let Ok(s) = wire::parse(p.link_type, p.ts_ns, p.data) { t.on_segment(&s, &mut sink); } } Ok(Poll::End) => break, _ => {} } }
    println!("{:?}", t.stats());
    t.finish_all(&mut sink);
}
