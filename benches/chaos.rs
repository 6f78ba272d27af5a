//! Fault injection under load and soak runs against a copilot-lb *process* (issue #10:
//! "Faults under load", "Soak"). `scripts/chaos.sh` and `scripts/soak.sh` wrap it.
//!
//! ```text
//! cargo bench --bench chaos -- chaos [--sessions 1000] [--conns 50] [--think-ms 4000]
//!                                    [--deadline-s 20] [--outage-s 8] [--window-s 5]
//!                                    [--max-down-cpu 0.15] [--out report.json]
//! cargo bench --bench chaos -- soak --minutes 30 --clients 500 [--think-ms 2000]
//!                                   [--warmup-s S] [--out report.json]
//! cargo bench --bench chaos -- fake-cli --port P [--storage DIR] [--name N]
//! cargo bench --bench chaos -- fake-host --storage DIR --names cli-1,cli-2,cli-3
//! ```
//!
//! `chaos` and `soak` exit 1 when an invariant fails (the report says which). The copilot-lb
//! binary is `$COPILOT_LB_BIN`, else the one cargo built with this bench. Without a
//! subcommand (as under `cargo test --all-targets`) it prints the usage and exits 0.
//!
//! `fake-cli` is one fake CLI backend as its own process (kill -9 / SIGSTOP it for real);
//! with `--storage DIR` it shares session storage with the other backends of DIR through the
//! storage host (`fake-host`, or the chaos driver itself), see `benches/chaos/host.rs` for why
//! and what that models.

#[path = "lg/mod.rs"]
mod lg;

#[path = "chaos/mod.rs"]
mod chaos;

use chaos::Args;
use std::path::PathBuf;
use std::time::Duration;

const USAGE: &str = "usage: chaos <chaos|soak|fake-cli|fake-host> [options] (see benches/chaos.rs)";

fn main() {
    let argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(cmd) = argv.first().cloned() else {
        println!("{USAGE}");
        return;
    };
    let args = Args::new(argv[1..].to_vec());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let lb_bin = || chaos::procs::lb_bin(env!("CARGO_BIN_EXE_copilot-lb"));
    let code = match cmd.as_str() {
        "fake-cli" => {
            let Some(port) = args.get("port").and_then(|p| p.parse::<u16>().ok()) else {
                eprintln!("fake-cli: --port P is required");
                std::process::exit(2);
            };
            let name = args.get("name").unwrap_or_else(|| format!("fake-{port}"));
            let storage = args.get("storage").map(PathBuf::from);
            match rt.block_on(chaos::front::run(port, storage, name)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("fake-cli: {e}");
                    1
                }
            }
        }
        "fake-host" => {
            let Some(dir) = args.get("storage").map(PathBuf::from) else {
                eprintln!("fake-host: --storage DIR is required");
                std::process::exit(2);
            };
            let names: Vec<String> = args
                .get("names")
                .unwrap_or_else(|| "cli-1,cli-2,cli-3".into())
                .split(',')
                .map(str::to_string)
                .collect();
            rt.block_on(async {
                match chaos::host::Host::start(&dir, &names).await {
                    Ok(h) => {
                        for (n, f) in &h.fakes {
                            println!("{n} {}", f.addr());
                        }
                        // Serve until stdin closes.
                        let _ = tokio::task::spawn_blocking(|| {
                            let mut s = String::new();
                            while std::io::stdin().read_line(&mut s).unwrap_or(0) > 0 {
                                s.clear();
                            }
                        })
                        .await;
                        0
                    }
                    Err(e) => {
                        eprintln!("fake-host: {e}");
                        1
                    }
                }
            })
        }
        "chaos" => {
            let mut o = chaos::faults::Opts::full(lb_bin());
            o.sessions = args.num("sessions", o.sessions);
            o.conns = args.num("conns", o.conns).max(1);
            o.think = Duration::from_millis(args.num("think-ms", o.think.as_millis() as u64));
            o.deadline = Duration::from_secs(args.num("deadline-s", o.deadline.as_secs()));
            o.outage = Duration::from_secs(args.num("outage-s", o.outage.as_secs()));
            o.window = Duration::from_secs(args.num("window-s", o.window.as_secs()));
            o.max_down_cpu = args.num("max-down-cpu", o.max_down_cpu);
            o.out = args.get("out").map(PathBuf::from);
            eprintln!("chaos: copilot-lb {}", o.lb_bin.display());
            match rt.block_on(chaos::faults::run(o)) {
                Ok(r) => {
                    println!("{}", chaos::faults::render(&r));
                    i32::from(!r.failed.is_empty())
                }
                Err(e) => {
                    eprintln!("chaos: {e}");
                    2
                }
            }
        }
        "soak" => {
            let mut o = chaos::soak::Opts::new(
                args.num("minutes", 30.0),
                args.num("clients", 500usize).max(1),
                lb_bin(),
            );
            o.think = Duration::from_millis(args.num("think-ms", o.think.as_millis() as u64));
            if let Some(w) = args.get("warmup-s").and_then(|w| w.parse().ok()) {
                o.warmup = Duration::from_secs(w);
            }
            o.out = args.get("out").map(PathBuf::from);
            eprintln!("soak: copilot-lb {}", o.lb_bin.display());
            match rt.block_on(chaos::soak::run(o)) {
                Ok(r) => {
                    println!("{}", chaos::soak::render(&r));
                    i32::from(!r.failed.is_empty())
                }
                Err(e) => {
                    eprintln!("soak: {e}");
                    2
                }
            }
        }
        _ => {
            // `cargo test --all-targets` runs benches with libtest-style arguments.
            println!("{USAGE}");
            0
        }
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}
