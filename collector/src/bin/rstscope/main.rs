//! `rstscope`: asks the collector about resets, connections and agents.
//!
//! A pure gRPC client of the `Query` service: it parses flags into a request, prints the answer,
//! and turns transport and status errors into sentences that say what to do. Exit status: 0 on
//! success, 1 when the collector refused the request, 2 for usage errors, 3 when the collector
//! cannot be reached, 4 when it refused the token or certificate.

mod analyze;
mod output;
mod report;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use output::Format;
use rstscope_collector::auth;
use rstscope_proto::v1::{self, query_client::QueryClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// Shows TCP resets seen by rstscope agents, as stored by rstscope-collector.
#[derive(Parser, Debug)]
#[command(
    name = "rstscope",
    version,
    about = "Which TCP resets were genuine, forged on the path, or lost: asks an rstscope-collector, or analyzes captures from several hosts offline.",
    max_term_width = 100
)]
struct Cli {
    #[command(flatten)]
    connection: ConnectArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Collector")]
struct ConnectArgs {
    /// The collector's gRPC address (https:// for TLS).
    #[arg(long, global = true, env = "RSTSCOPE_COLLECTOR", default_value = "http://127.0.0.1:50051")]
    collector: String,

    /// Shared token the collector requires.
    #[arg(long, global = true, env = "RSTSCOPE_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// PEM CA that signed the collector's certificate (TLS).
    #[arg(long, global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,

    /// PEM client certificate, when the collector asks for one (mutual TLS).
    #[arg(long, global = true, requires = "client_key", value_name = "FILE")]
    client_cert: Option<PathBuf>,

    /// PEM key of --client-cert.
    #[arg(long, global = true, requires = "client_cert", value_name = "FILE")]
    client_key: Option<PathBuf>,

    /// Name to check the collector's certificate against (default: the URL's host).
    #[arg(long, global = true, value_name = "NAME")]
    tls_name: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List resets, oldest first; --follow keeps printing new ones.
    Resets(ResetsArgs),
    /// Show everything the agents saw of one connection.
    Connection {
        /// Connection id as printed by `resets` (ip:port-ip:port, IPv6 as [ip]:port).
        id: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// List the agents the collector knows.
    Agents {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Correlate capture files from several vantage points offline, without a collector:
    /// rstscope analyze client=client.pcap server=server.pcap
    Analyze(analyze::AnalyzeArgs),
    /// Show the collector's state.
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
}

#[derive(Args, Debug)]
struct ResetsArgs {
    /// From this time: a duration ago (1h, 30m), RFC 3339, or epoch seconds.
    #[arg(long, help_heading = "Filters", value_name = "TIME")]
    since: Option<String>,

    /// Until this time (exclusive), same forms as --since.
    #[arg(long, help_heading = "Filters", value_name = "TIME")]
    until: Option<String>,

    /// Either endpoint in this address or CIDR (repeatable).
    #[arg(long, help_heading = "Filters", value_name = "CIDR")]
    host: Vec<String>,

    /// Either endpoint on this port (repeatable).
    #[arg(long, help_heading = "Filters", value_name = "N")]
    port: Vec<u16>,

    /// Reported by this agent (repeatable).
    #[arg(long, help_heading = "Filters", value_name = "NAME")]
    agent: Vec<String>,

    /// With this verdict: end-to-end, injected, lost, unverified, pending (repeatable).
    #[arg(long, help_heading = "Filters", value_name = "V")]
    verdict: Vec<String>,

    /// With this cause: refused, app-abort, no-connection, ... (repeatable).
    #[arg(long, help_heading = "Filters", value_name = "C")]
    cause: Vec<String>,

    /// With exactly these TCP flags, e.g. R or RA (repeatable).
    #[arg(long, help_heading = "Filters", value_name = "LETTERS")]
    flags: Vec<String>,

    /// Only the newest N.
    #[arg(long, help_heading = "Filters", value_name = "N")]
    last: Option<u32>,

    /// Keep printing new resets as they are decided (Ctrl-C to stop).
    #[arg(short = 'f', long, help_heading = "Output")]
    follow: bool,

    /// Each agent's stored record instead of one merged report per distinct RST.
    #[arg(long, help_heading = "Output")]
    raw: bool,

    /// Print the evidence under each table row.
    #[arg(short = 'v', long, help_heading = "Output")]
    evidence: bool,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", help_heading = "Output")]
    output: Format,
}

/// Why the command failed, and the exit status that says so.
enum Failure {
    Usage(String),
    Unreachable(String),
    Refused(String),
    Denied(String),
    Output(io::Error),
}

impl Failure {
    fn from_status(status: Status, collector: &str) -> Failure {
        let message = status.message();
        match status.code() {
            Code::Unauthenticated => Failure::Denied(format!("the collector refused the token: {message}")),
            Code::PermissionDenied => Failure::Denied(format!("the collector refused access: {message}")),
            Code::Unavailable => Failure::Unreachable(format!(
                "cannot reach the collector at {collector}: {message}; is rstscope-collector running? (--collector / RSTSCOPE_COLLECTOR)"
            )),
            // A stream (`--follow`) cut by a collector that went away comes back as an h2 error.
            Code::Unknown if message.contains("h2 protocol error") || message.contains("connection") => {
                Failure::Unreachable(format!("lost the connection to the collector at {collector}: {message}"))
            }
            Code::InvalidArgument => Failure::Usage(message.to_string()),
            Code::NotFound => Failure::Refused(message.to_string()),
            code => Failure::Refused(format!("the collector answered {code:?}: {message}")),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

type Client = QueryClient<tonic::service::interceptor::InterceptedService<Channel, auth::AddToken>>;

fn read_file(what: &str, path: &PathBuf) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::Usage(format!("cannot read {what} {}: {e}", path.display())))
}

async fn connect(args: &ConnectArgs) -> Result<Client, Failure> {
    let url = &args.collector;
    if let Some(problem) = rstscope_proto::collector_url_problem(url) {
        return Err(Failure::Usage(format!("--collector {problem}")));
    }
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Failure::Usage(format!("--collector {url:?} is not a URL like http://HOST:PORT: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let https = url.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("https://"));
    if !https && (args.ca_cert.is_some() || args.client_cert.is_some()) {
        return Err(Failure::Usage(format!("--ca-cert and --client-cert need an https:// --collector, not {url}")));
    }
    if https {
        let Some(ca) = &args.ca_cert else {
            return Err(Failure::Usage(
                "an https:// collector needs --ca-cert FILE: the CA that signed its certificate".to_string(),
            ));
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_file("--ca-cert", ca)?));
        if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
            tls = tls.identity(Identity::from_pem(read_file("--client-cert", cert)?, read_file("--client-key", key)?));
        }
        if let Some(name) = &args.tls_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint =
            endpoint.tls_config(tls).map_err(|e| Failure::Usage(format!("TLS settings: {}", error_chain(&e))))?;
    }
    let token = auth::AddToken::new(args.token.as_deref())
        .map_err(|e| Failure::Usage(format!("--token / RSTSCOPE_TOKEN: {e}")))?;
    let channel = endpoint.connect().await.map_err(|e| {
        Failure::Unreachable(format!(
            "cannot reach the collector at {url}: {}; is rstscope-collector running? (--collector / RSTSCOPE_COLLECTOR)",
            error_chain(&e)
        ))
    })?;
    Ok(QueryClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20))
}

fn reset_filter(args: &ResetsArgs) -> Result<v1::ResetFilter, Failure> {
    let now = SystemTime::now();
    let time = |flag: &str, text: &Option<String>| {
        text.as_deref()
            .map(|t| output::parse_time(t, now).map_err(|e| Failure::Usage(format!("{flag}: {e}"))))
            .transpose()
    };
    let (since_ns, until_ns) = (time("--since", &args.since)?, time("--until", &args.until)?);
    if let (Some(since), Some(until)) = (since_ns, until_ns) {
        if until < since {
            return Err(Failure::Usage(format!(
                "--until ({}) is before --since ({})",
                output::ts_human(until),
                output::ts_human(since)
            )));
        }
    }
    // The protocol reads `last: 0` as "no limit": asked for on the command line, it would list
    // everything.
    if args.last == Some(0) {
        return Err(Failure::Usage("--last 0: expected how many of the newest resets to list, at least 1".to_string()));
    }
    Ok(v1::ResetFilter {
        since_ns,
        until_ns,
        hosts: args.host.clone(),
        ports: args.port.iter().map(|&p| u32::from(p)).collect(),
        agents: args.agent.clone(),
        verdicts: args.verdict.clone(),
        causes: args.cause.clone(),
        flags: args.flags.clone(),
        last: args.last.unwrap_or(0),
    })
}

fn print_line(out: &mut impl Write, line: &str) -> Result<(), Failure> {
    writeln!(out, "{line}").map_err(Failure::Output)
}

async fn reports(client: &mut Client, args: &ResetsArgs, collector: &str) -> Result<(), Failure> {
    let filter = reset_filter(args)?;
    let status = |s| Failure::from_status(s, collector);
    let mut stream = if args.follow {
        client.follow_reports(filter).await.map_err(status)?.into_inner()
    } else {
        client.list_reports(filter).await.map_err(status)?.into_inner()
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    if args.output == Format::Table {
        print_line(&mut out, &report::report_header())?;
    }
    let mut printed = 0u64;
    while let Some(r) = stream.message().await.map_err(status)? {
        let line = match args.output {
            Format::Table => report::report_row(&r, args.evidence),
            Format::Json => report::report_json(&r),
            Format::Compact => report::report_compact(&r),
        };
        print_line(&mut out, &line)?;
        printed += 1;
        if args.follow {
            out.flush().map_err(Failure::Output)?;
        }
    }
    out.flush().map_err(Failure::Output)?;
    if printed == 0 && args.output == Format::Table {
        eprintln!("No resets match.");
    }
    Ok(())
}

async fn resets(client: &mut Client, args: &ResetsArgs, collector: &str) -> Result<(), Failure> {
    if !args.raw {
        return reports(client, args, collector).await;
    }
    if !args.verdict.is_empty() {
        return Err(Failure::Usage(
            "--verdict selects merged reports; --raw lists each agent's own records, which have none".to_string(),
        ));
    }
    let filter = reset_filter(args)?;
    let status = |s| Failure::from_status(s, collector);
    let mut stream = if args.follow {
        client.follow_resets(filter).await.map_err(status)?.into_inner()
    } else {
        client.list_resets(filter).await.map_err(status)?.into_inner()
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    if args.output == Format::Table {
        print_line(&mut out, &output::reset_header())?;
    }
    let mut printed = 0u64;
    while let Some(record) = stream.message().await.map_err(status)? {
        let line = match args.output {
            Format::Table => output::reset_row(&record),
            Format::Json => output::reset_json(&record),
            Format::Compact => output::reset_compact(&record),
        };
        print_line(&mut out, &line)?;
        printed += 1;
        if args.follow {
            out.flush().map_err(Failure::Output)?;
        }
    }
    out.flush().map_err(Failure::Output)?;
    if printed == 0 && args.output == Format::Table {
        eprintln!("No resets match.");
    }
    Ok(())
}

async fn connection(client: &mut Client, id: &str, format: Format, collector: &str) -> Result<(), Failure> {
    let reply = client
        .get_connection(v1::ConnectionRequest { connection: id.to_string() })
        .await
        .map_err(|s| Failure::from_status(s, collector))?
        .into_inner();
    let mut out = io::stdout().lock();
    match format {
        Format::Json => {
            for r in &reply.reports {
                print_line(&mut out, &report::report_json(r))?;
            }
            for step in &reply.ladder {
                print_line(&mut out, &report::step_json(step))?;
            }
            for flow in &reply.flows {
                print_line(&mut out, &output::flow_json(flow))?;
            }
            for reset in &reply.resets {
                print_line(&mut out, &output::reset_json(reset))?;
            }
        }
        Format::Table if !reply.ladder.is_empty() => {
            print_line(&mut out, &format!("connection {id}\n"))?;
            print_line(&mut out, &report::ladder_text(&reply.ladder))?;
            print_line(&mut out, &format!("\nresets ({})", reply.reports.len()))?;
            if !reply.reports.is_empty() {
                print_line(&mut out, &report::report_header())?;
            }
            for r in &reply.reports {
                print_line(&mut out, &report::report_row(r, true))?;
            }
        }
        Format::Table | Format::Compact => {
            print_line(&mut out, &format!("connection {id}"))?;
            print_line(&mut out, &format!("\nflows ({})", reply.flows.len()))?;
            for flow in &reply.flows {
                print_line(&mut out, &output::flow_row(flow))?;
            }
            print_line(&mut out, &format!("\nresets ({})", reply.resets.len()))?;
            if format == Format::Table && !reply.resets.is_empty() {
                print_line(&mut out, &output::reset_header())?;
            }
            for reset in &reply.resets {
                let line =
                    if format == Format::Table { output::reset_row(reset) } else { output::reset_compact(reset) };
                print_line(&mut out, &line)?;
            }
        }
    }
    Ok(())
}

async fn agents(client: &mut Client, format: Format, collector: &str) -> Result<(), Failure> {
    let reply = client
        .list_agents(v1::ListAgentsRequest {})
        .await
        .map_err(|s| Failure::from_status(s, collector))?
        .into_inner();
    let mut out = io::stdout().lock();
    if format == Format::Table {
        print_line(&mut out, &output::agent_header())?;
    }
    for agent in &reply.agents {
        let line = if format == Format::Table { output::agent_row(agent) } else { output::agent_json(agent) };
        print_line(&mut out, &line)?;
    }
    Ok(())
}

async fn status(client: &mut Client, format: Format, collector: &str) -> Result<(), Failure> {
    let reply = client.status(v1::StatusRequest {}).await.map_err(|s| Failure::from_status(s, collector))?.into_inner();
    let text =
        if format == Format::Table { output::status_text(&reply, collector) } else { output::status_json(&reply) };
    print_line(&mut io::stdout().lock(), &text)
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Analyze(args) = &cli.command {
        let stdout = io::stdout();
        let mut out = io::BufWriter::new(stdout.lock());
        analyze::analyze(args, &mut out)?;
        return out.flush().map_err(Failure::Output);
    }
    let mut client = connect(&cli.connection).await?;
    let collector = cli.connection.collector.as_str();
    match &cli.command {
        Command::Resets(args) => resets(&mut client, args, collector).await,
        Command::Connection { id, output } => connection(&mut client, id, *output, collector).await,
        Command::Agents { output } => agents(&mut client, *output, collector).await,
        Command::Status { output } => status(&mut client, *output, collector).await,
        Command::Analyze(_) => unreachable!("analyze runs without a collector, above"),
    }
}

/// The command line. The collector's flags are global, so they go before or after any command;
/// `analyze` reads no collector, so it gets hidden copies of them: a subcommand that has an
/// argument of a global's name does not receive the global, and its help does not list it,
/// while scripts that pass them to every command keep working.
fn parse() -> Cli {
    let command = Cli::command();
    let hidden: Vec<clap::Arg> =
        command.get_arguments().filter(|a| a.is_global_set()).map(|a| a.clone().global(false).hide(true)).collect();
    let matches = command.mut_subcommand("analyze", |analyze| analyze.args(hidden)).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

fn main() -> ExitCode {
    let cli = parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rstscope: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = run(cli) => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    let (code, message) = match result {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Failure::Output(error)) if error.kind() == io::ErrorKind::BrokenPipe => return ExitCode::SUCCESS,
        Err(Failure::Output(error)) => (1, format!("cannot write the output: {error}")),
        Err(Failure::Refused(message)) => (1, message),
        Err(Failure::Usage(message)) => (2, message),
        Err(Failure::Unreachable(message)) => (3, message),
        Err(Failure::Denied(message)) => (4, message),
    };
    eprintln!("rstscope: {message}");
    ExitCode::from(code)
}
