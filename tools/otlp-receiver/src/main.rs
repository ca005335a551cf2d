//! otlp-receiver: an independent OTLP trace receiver for end-to-end tests and benchmarks.
//! It decodes with the opentelemetry-proto definitions, never with our own encoder.
//! See README.md for the flags and the output format.

mod grpc;
mod http;
mod state;

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::state::{write_atomic, Mode, Shared};

const USAGE: &str = "usage: otlp-receiver [--http ADDR] [--grpc ADDR] [--out FILE] [--ready FILE]
       [--stats FILE] [--mode accept|refuse|blackhole|slow|discard] [--control FILE]";

#[derive(Default)]
struct Args {
    http: Option<String>,
    grpc: Option<String>,
    out: Option<PathBuf>,
    ready: Option<PathBuf>,
    stats: Option<PathBuf>,
    control: Option<PathBuf>,
    mode: Option<Mode>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = argv.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--http" => args.http = Some(value),
            "--grpc" => args.grpc = Some(value),
            "--out" => args.out = Some(value.into()),
            "--ready" => args.ready = Some(value.into()),
            "--stats" => args.stats = Some(value.into()),
            "--control" => args.control = Some(value.into()),
            "--mode" => args.mode = Some(Mode::parse(&value).ok_or(format!("bad mode {value:?}"))?),
            _ => return Err(format!("unknown flag {flag:?}")),
        }
    }
    if args.http.is_none() && args.grpc.is_none() {
        return Err("give --http ADDR, --grpc ADDR or both".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("otlp-receiver: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("otlp-receiver: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let out = match &args.out {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("opening {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let shared = Arc::new(Shared::new(args.mode.unwrap_or(Mode::Accept), out, args.stats.clone()));

    let mut ready = Map::new();
    let mut listeners = Vec::new();
    for (name, addr) in [("http", &args.http), ("grpc", &args.grpc)] {
        let Some(addr) = addr else { continue };
        let listener = TcpListener::bind(addr).await.map_err(|e| format!("binding {name} {addr}: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        ready.insert(name.into(), port.into());
        listeners.push((name, listener));
    }

    let mut control = args.control.map(|path| (path, String::new()));
    if let Some((path, last)) = &mut control {
        poll_control(path, last, &shared); // a control file present at start applies at once
    }
    shared.write_stats();
    for (name, listener) in listeners {
        match name {
            "http" => tokio::spawn(http::serve(listener, shared.clone())),
            _ => tokio::spawn(grpc::serve(listener, shared.clone())),
        };
    }
    if let Some(path) = &args.ready {
        write_atomic(path, &Value::Object(ready).to_string())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if let Some((path, mut last)) = control {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                poll_control(&path, &mut last, &shared);
            }
        });
    }
    let stats_shared = shared.clone();
    tokio::spawn(async move {
        loop {
            stats_shared.changed.notified().await;
            stats_shared.write_stats();
            // At most 20 writes a second, however busy (the benchmark).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shared.write_stats();
    // Blackholed connections would keep a graceful shutdown waiting: just go.
    std::process::exit(0)
}

/// Applies the mode named in the control file when its content changes.
fn poll_control(path: &PathBuf, last: &mut String, shared: &Shared) {
    let Ok(content) = std::fs::read_to_string(path) else { return };
    let word = content.trim();
    if word.is_empty() || word == last {
        return;
    }
    match Mode::parse(word) {
        Some(mode) => shared.set_mode(mode),
        None => eprintln!("otlp-receiver: {}: unknown mode {word:?}", path.display()),
    }
    *last = word.to_owned();
}
