//! `quiver-otlp-sink`: an OTLP/gRPC trace collector for benchmarks
//! (quiver-testkit's `OtlpReceiver`). Prints `otlp endpoint=<url>` on
//! stdout, then, every `--report` interval, the number of spans received
//! so far on stderr; runs until killed.

use std::time::Duration;

use clap::Parser;
use quiver_testkit::OtlpReceiver;

#[derive(Debug, Parser)]
#[command(
    name = "quiver-otlp-sink",
    about = "OTLP/gRPC span sink for benchmarks"
)]
struct Args {
    /// How often the span count is printed.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    report: Duration,
}

fn main() {
    let args = Args::parse();
    let sink = OtlpReceiver::counting();
    println!("otlp endpoint={}", sink.endpoint());
    loop {
        std::thread::sleep(args.report);
        eprintln!("spans received: {}", sink.count());
    }
}
