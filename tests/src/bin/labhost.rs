//! `labhost`: the lab's traffic helper. Each subcommand is one side of one scenario, run inside
//! a lab namespace with real sockets (raw sockets and libpcap where forging is needed); it prints
//! one line saying what happened and exits by itself (every wait is bounded).
//!
//! `labhost record-demo DIR` builds a lab of its own and records the bundled demo captures.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

#[derive(Parser)]
#[command(about = "Traffic helper for the rstscope network-namespace lab")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ServeMode {
    /// Read the request, answer, wait for the ACK, then close with SO_LINGER 0 (RST).
    Abort,
    /// Wait, then close without reading what the client sent (RST).
    UnreadClose,
    /// Read to EOF, answer, close (FIN).
    Clean,
    /// Read until EOF, error or `--idle-ms` without data; then close.
    Hold,
}

#[derive(Subcommand)]
enum Cmd {
    /// Listen and handle COUNT connections; prints `listening` once bound.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_enum)]
        mode: ServeMode,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 15)]
        timeout_secs: u64,
        /// How long a connection may stay silent before the server reads no more.
        #[arg(long, default_value_t = 1500)]
        idle_ms: u64,
    },
    /// Connect, optionally send, optionally half-close, read until EOF, error or timeout.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        send: Option<String>,
        #[arg(long)]
        shutdown: bool,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Connect, send, wait (the router drops the ACKs: retransmissions), then abort (SO_LINGER 0).
    Stuck {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        abort_after_ms: u64,
    },
    /// Connect to KEEP and, right after, send a raw SYN to the same host's CANCEL_PORT: the
    /// kernel resets the second connection when its SYN-ACK arrives (no socket owns it).
    RaceSyns {
        #[arg(long)]
        keep: SocketAddr,
        #[arg(long)]
        cancel_port: u16,
    },
    /// On a router: sniff the handshake's last ACK to PORT on CLIENT_IF, then forge a RST to
    /// each end (to the client on CLIENT_IF, to the server via NEXT_HOP_MAC on SERVER_IF).
    ForgeRst {
        #[arg(long)]
        client_if: String,
        #[arg(long)]
        server_if: String,
        #[arg(long)]
        next_hop_mac: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 150)]
        delay_ms: u64,
        #[arg(long, default_value_t = 15)]
        timeout_secs: u64,
    },
    /// N clean connections in parallel (send, half-close, read to EOF).
    ManyClean {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        n: usize,
    },
    /// Build a lab, record a client-side and a server-side capture of a few connections (a clean
    /// one, a genuine app-abort, one reset by the router's nftables) into DIR.
    RecordDemo { dir: PathBuf },
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Cmd::Serve { listen, mode, count, timeout_secs, idle_ms } => {
            serve(listen, mode, count, Duration::from_secs(timeout_secs), Duration::from_millis(idle_ms))
        }
        Cmd::Connect { to, send, shutdown, timeout_ms } => {
            println!("{}", connect(to, send.as_deref(), shutdown, Duration::from_millis(timeout_ms)));
            Ok(())
        }
        Cmd::Stuck { to, abort_after_ms } => stuck(to, Duration::from_millis(abort_after_ms)),
        Cmd::RaceSyns { keep, cancel_port } => race_syns(keep, cancel_port),
        Cmd::ForgeRst { client_if, server_if, next_hop_mac, port, delay_ms, timeout_secs } => forge_rst(
            &client_if,
            &server_if,
            parse_mac(&next_hop_mac)?,
            port,
            Duration::from_millis(delay_ms),
            Duration::from_secs(timeout_secs),
        ),
        Cmd::ManyClean { to, n } => many_clean(to, n),
        Cmd::RecordDemo { dir } => record_demo(&dir),
    }
}

/// `SOCK_RAW` on Linux (socket2 names it only with its "all" feature, which would change the
/// feature set of the collector's dependencies and rebuild them for every test run).
const SOCK_RAW: i32 = 3;

fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn serve(listen: SocketAddr, mode: ServeMode, count: usize, timeout: Duration, idle: Duration) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    listener.set_nonblocking(true)?;
    say("listening");
    let deadline = Instant::now() + timeout;
    let mut handlers = Vec::new();
    while handlers.len() < count && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                handlers.push(std::thread::spawn(move || handle(stream, mode, idle)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e.into()),
        }
    }
    let mut outcomes = Vec::new();
    for h in handlers {
        outcomes.push(h.join().unwrap_or_else(|_| "panicked".into()));
    }
    say(&format!("served {} {}", outcomes.len(), outcomes.join(",")));
    Ok(())
}

fn handle(mut stream: TcpStream, mode: ServeMode, idle: Duration) -> String {
    let _ = stream.set_read_timeout(Some(idle));
    let mut buf = [0u8; 4096];
    match mode {
        ServeMode::Abort => {
            let n = stream.read(&mut buf).unwrap_or(0);
            let _ = stream.write_all(b"bye\n");
            // Let the client's ACK of the answer arrive first: an ACK reaching a socket already
            // gone would draw a second RST (no-connection).
            std::thread::sleep(Duration::from_millis(150));
            let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
            format!("aborted-after-{n}")
        }
        ServeMode::UnreadClose => {
            std::thread::sleep(Duration::from_millis(300));
            drop(stream);
            "closed-unread".into()
        }
        ServeMode::Clean => {
            let mut total = 0;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n,
                    Err(_) => return format!("error-after-{total}"),
                }
            }
            let _ = stream.write_all(b"ok\n");
            format!("clean-{total}")
        }
        ServeMode::Hold => {
            let mut total = 0;
            let outcome = loop {
                match stream.read(&mut buf) {
                    Ok(0) => break "eof",
                    Ok(n) => total += n,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break "idle",
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => break "reset",
                    Err(_) => break "error",
                }
            };
            format!("{outcome}-after-{total}")
        }
    }
}

fn connect(to: SocketAddr, send: Option<&str>, shutdown: bool, timeout: Duration) -> String {
    let mut stream = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => {
            return match e.kind() {
                ErrorKind::ConnectionRefused => "refused".into(),
                ErrorKind::TimedOut | ErrorKind::WouldBlock => "connect-timeout".into(),
                ErrorKind::ConnectionReset => "reset".into(),
                _ => format!("connect-error {e}"),
            }
        }
    };
    if let Some(text) = send {
        if let Err(e) = stream.write_all(text.as_bytes()) {
            return format!("write-error {e}");
        }
    }
    if shutdown {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let _ = stream.set_read_timeout(Some(timeout));
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return format!("eof-after-{total}"),
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return format!("reset-after-{total}"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return format!("timeout-after-{total}")
            }
            Err(e) => return format!("error-after-{total} {e}"),
        }
    }
}

fn stuck(to: SocketAddr, abort_after: Duration) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    stream.write_all(b"hello, is anybody there?\n")?;
    std::thread::sleep(abort_after);
    SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    drop(stream);
    say("aborted");
    Ok(())
}

/// The local address the kernel would use towards `dst`.
fn local_addr_towards(dst: IpAddr) -> Result<IpAddr> {
    let bind: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let udp = UdpSocket::bind(bind)?;
    udp.connect(SocketAddr::new(dst, 9))?;
    Ok(udp.local_addr()?.ip())
}

fn race_syns(keep: SocketAddr, cancel_port: u16) -> Result<()> {
    let src = local_addr_towards(keep.ip())?;
    // A source port outside the kernel's ephemeral range, so no socket of ours can own it.
    let sport = 20000 + (std::process::id() % 10000) as u16;
    let isn = 0x1000_0000u32.wrapping_mul(std::process::id() | 1);
    let syn = tcp_bytes(src, keep.ip(), |b| b.tcp(sport, cancel_port, isn, 64240).syn())?;
    let (domain, dst) = match keep.ip() {
        IpAddr::V4(_) => (Domain::IPV4, SocketAddr::new(keep.ip(), 0)),
        IpAddr::V6(_) => (Domain::IPV6, SocketAddr::new(keep.ip(), 0)),
    };
    let raw = Socket::new(domain, Type::from(SOCK_RAW), Some(Protocol::TCP)).context("raw socket")?;
    let mut kept = TcpStream::connect_timeout(&keep, Duration::from_secs(3))?;
    raw.send_to(&syn, &SockAddr::from(dst)).context("send the racing SYN")?;
    std::thread::sleep(Duration::from_millis(300));
    kept.write_all(b"kept\n")?;
    kept.shutdown(std::net::Shutdown::Write)?;
    kept.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut answer = Vec::new();
    let _ = kept.read_to_end(&mut answer);
    say(&format!("kept {} bytes; cancelled port {cancel_port} from port {sport}", answer.len()));
    Ok(())
}

/// A TCP segment (header, checksum over the pseudo header) without the IP header, for raw
/// sockets that let the kernel add it.
fn tcp_bytes(
    src: IpAddr,
    dst: IpAddr,
    tcp: impl FnOnce(
        etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
) -> Result<Vec<u8>> {
    let (ip, ip_len) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (PacketBuilder::ipv4(s.octets(), d.octets(), 64), 20),
        (IpAddr::V6(s), IpAddr::V6(d)) => (PacketBuilder::ipv6(s.octets(), d.octets(), 64), 40),
        _ => bail!("mixed address families"),
    };
    let builder = tcp(ip);
    let mut out = Vec::new();
    builder.write(&mut out, &[])?;
    Ok(out.split_off(ip_len))
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> =
        text.split(':').map(|h| u8::from_str_radix(h, 16)).collect::<Result<_, _>>().context("MAC address")?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("MAC address {text:?} is not 6 bytes"))
}

fn own_mac(ifname: &str) -> Result<[u8; 6]> {
    parse_mac(std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))?.trim())
}

fn open_live(ifname: &str) -> Result<pcap::Capture<pcap::Active>> {
    Ok(pcap::Capture::from_device(ifname)?.immediate_mode(true).snaplen(256).timeout(50).open()?)
}

/// One packet of the flow, as sniffed.
struct Sniffed {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
}

fn sniff_handshake_ack(cap: &mut pcap::Capture<pcap::Active>, port: u16, deadline: Instant) -> Result<Sniffed> {
    while Instant::now() < deadline {
        let packet = match cap.next_packet() {
            Ok(p) => p,
            Err(pcap::Error::TimeoutExpired) => continue,
            Err(e) => return Err(e.into()),
        };
        let Ok(sliced) = SlicedPacket::from_ethernet(packet.data) else { continue };
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = &sliced.link else { continue };
        let (src, dst) = match &sliced.net {
            Some(NetSlice::Ipv4(v4)) => {
                (IpAddr::V4(v4.header().source_addr()), IpAddr::V4(v4.header().destination_addr()))
            }
            Some(NetSlice::Ipv6(v6)) => {
                (IpAddr::V6(v6.header().source_addr()), IpAddr::V6(v6.header().destination_addr()))
            }
            _ => continue,
        };
        let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else { continue };
        if tcp.destination_port() != port || tcp.syn() || tcp.rst() || tcp.fin() || !tcp.ack() {
            continue;
        }
        if !tcp.payload().is_empty() {
            continue;
        }
        return Ok(Sniffed {
            src_mac: eth.source(),
            dst_mac: eth.destination(),
            src,
            dst,
            sport: tcp.source_port(),
            dport: tcp.destination_port(),
            seq: tcp.sequence_number(),
            ack: tcp.acknowledgment_number(),
        });
    }
    bail!("no handshake ACK to port {port} seen")
}

/// A RST+ACK frame from `from` to `to` (addresses as seen on the wire), IP ID 0, TTL 64.
fn forged_rst(eth: ([u8; 6], [u8; 6]), from: SocketAddr, to: SocketAddr, seq: u32, ack: u32) -> Result<Vec<u8>> {
    let eth = PacketBuilder::ethernet2(eth.0, eth.1);
    let ip = match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => bail!("mixed address families"),
    };
    let (sport, dport) = (from.port(), to.port());
    let builder = ip.tcp(sport, dport, seq, 0).rst().ack(ack);
    let mut out = Vec::new();
    builder.write(&mut out, &[])?;
    Ok(out)
}

fn forge_rst(
    client_if: &str,
    server_if: &str,
    next_hop: [u8; 6],
    port: u16,
    delay: Duration,
    timeout: Duration,
) -> Result<()> {
    let mut client_side = open_live(client_if)?;
    client_side.filter(&format!("tcp dst port {port}"), true)?;
    let mut server_side = open_live(server_if)?;
    let server_side_mac = own_mac(server_if)?;
    say("sniffing");
    let ack = sniff_handshake_ack(&mut client_side, port, Instant::now() + timeout)?;
    std::thread::sleep(delay);
    // To the client, "from" the server: seq = what the client expects next from the server.
    let client = SocketAddr::new(ack.src, ack.sport);
    let server = SocketAddr::new(ack.dst, ack.dport);
    let to_client = forged_rst((ack.dst_mac, ack.src_mac), server, client, ack.ack, ack.seq)?;
    // To the server, "from" the client: seq = the client's next seq.
    let to_server = forged_rst((server_side_mac, next_hop), client, server, ack.seq, ack.ack)?;
    client_side.sendpacket(to_client)?;
    server_side.sendpacket(to_server)?;
    say(&format!("forged {}:{} <-> {}:{}", ack.src, ack.sport, ack.dst, ack.dport));
    Ok(())
}

fn many_clean(to: SocketAddr, n: usize) -> Result<()> {
    let threads: Vec<_> = (0..n)
        .map(|i| std::thread::spawn(move || connect(to, Some(&format!("hello {i}\n")), true, Duration::from_secs(5))))
        .collect();
    let ok = threads.into_iter().filter_map(|t| t.join().ok()).filter(|o| o == "eof-after-3").count();
    say(&format!("clean {ok}/{n}"));
    Ok(())
}

fn record_demo(dir: &Path) -> Result<()> {
    use rstscope_tests::lab::{self, Host, Lab};
    lab::preflight()?;
    std::fs::create_dir_all(dir)?;
    let exe = std::env::current_exe()?;
    let bins = lab::Binaries { agent: PathBuf::new(), collector: PathBuf::new(), cli: PathBuf::new(), labhost: exe };
    let lab = Lab::new(bins)?;
    // The keyword filter the demo's router enforces.
    lab.nft(
        "table inet lab {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n    \
         tcp dport 8080 @ih,0,64 0x474554202f626c6f reject with tcp reset\n  }\n}\n",
    )?;
    let client_pcap = dir.join("client.pcap");
    let server_pcap = dir.join("server.pcap");
    let tcpdump = |host: Host, ifname: &str, file: &Path| {
        lab.spawn(
            host,
            Path::new("tcpdump"),
            &["-i", ifname, "-s", "128", "-U", "-n", "-w", file.to_str().expect("utf-8 path"), "tcp"],
            &format!("tcpdump-{ifname}"),
        )
    };
    let client_dump = tcpdump(Host::Client, "c-m", &client_pcap)?;
    let server_dump = tcpdump(Host::Server, "s-r", &server_pcap)?;
    std::thread::sleep(Duration::from_millis(1500));
    let server = lab::addr::SERVER4;
    // 1. A clean request.
    let mut s = lab.labhost(Host::Server, &["serve", "--listen", &format!("{server}:8000"), "--mode", "clean"])?;
    s.expect_line("listening", Duration::from_secs(5))?;
    let c =
        lab.labhost(Host::Client, &["connect", "--to", &format!("{server}:8000"), "--send", "GET /\n", "--shutdown"])?;
    c.finish(Duration::from_secs(10))?;
    s.finish(Duration::from_secs(10))?;
    // The correlation vouches for a capture only from its first packet on (plus a margin for
    // the clocks): leave a second between the scenes.
    std::thread::sleep(Duration::from_secs(1));
    // 2. A genuine app-abort: the server answers, then closes with SO_LINGER 0.
    let mut s = lab.labhost(Host::Server, &["serve", "--listen", &format!("{server}:8001"), "--mode", "abort"])?;
    s.expect_line("listening", Duration::from_secs(5))?;
    let c = lab.labhost(Host::Client, &["connect", "--to", &format!("{server}:8001"), "--send", "GET /status\n"])?;
    c.finish(Duration::from_secs(10))?;
    s.finish(Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(1));
    // 3. The router's nftables resets the client when it asks for /blocked (injected); the
    //    server never hears of it and keeps waiting (stopped before it gives up).
    let mut s = lab.labhost(
        Host::Server,
        &["serve", "--listen", &format!("{server}:8080"), "--mode", "hold", "--timeout-secs", "30"],
    )?;
    s.expect_line("listening", Duration::from_secs(5))?;
    let c = lab.labhost(Host::Client, &["connect", "--to", &format!("{server}:8080"), "--send", "GET /blocked\n"])?;
    let (_, outcome) = c.finish(Duration::from_secs(10))?;
    // 4. Two seconds later, one more clean request: both captures visibly run on well past the
    //    forged reset, so the server's silence about it counts (its capture covered that time).
    std::thread::sleep(Duration::from_secs(2));
    let mut s2 = lab.labhost(Host::Server, &["serve", "--listen", &format!("{server}:8002"), "--mode", "clean"])?;
    s2.expect_line("listening", Duration::from_secs(5))?;
    let c =
        lab.labhost(Host::Client, &["connect", "--to", &format!("{server}:8002"), "--send", "GET /\n", "--shutdown"])?;
    c.finish(Duration::from_secs(10))?;
    s2.finish(Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(500));
    for dump in [&client_dump, &server_dump] {
        dump.signal("INT");
    }
    client_dump.finish(Duration::from_secs(10))?;
    server_dump.finish(Duration::from_secs(10))?;
    drop(s);
    drop(lab);
    for file in [&client_pcap, &server_pcap] {
        let size = std::fs::metadata(file)?.len();
        println!("wrote {} ({size} bytes)", file.display());
    }
    println!("the blocked request ended with: {}", outcome.join(" "));
    Ok(())
}
