//! `trace2pcap IN.trace OUT.pcap`: turns a packet ladder written in the trace language
//! (`rstscope_agent::trace`) into a pcap of real Ethernet frames.

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        anyhow::bail!("usage: trace2pcap IN.trace OUT.pcap");
    };
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {input}"))?;
    let segments = rstscope_agent::trace::parse(&text).with_context(|| input.clone())?;
    rstscope_tests::frames::write_pcap(std::path::Path::new(output), &segments)
        .with_context(|| format!("writing {output}"))?;
    eprintln!("{output}: {} packets", segments.len());
    Ok(())
}
