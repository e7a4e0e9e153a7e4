//! `rlhf bench-allreduce`: the ring all-reduce over real TCP on loopback
//! against two plain-TCP baselines, in NCCL's terms (algorithm and bus
//! bandwidth).
//!
//! Every rank is a separate process (this binary re-executed with hidden
//! `--internal-*` arguments), as worker processes are in a real run, so the
//! ranks compete for the CPUs the way they would in production. The parent
//! reads each child's address from its stdout, hands every child the peer
//! list on its stdin, and then drives the rounds: it writes `go` to every
//! child and waits for each child's time before the next round (a barrier).
//!
//! Baselines:
//! - *TCP copy*: one sender thread → one receiver thread over one loopback
//!   TCP connection, N bytes. What one link does with two busy CPUs.
//! - *raw TCP ring*: W processes, each streams 2(W−1)/W · N bytes (what a ring
//!   all-reduce rank sends) to its right neighbour over plain TCP while
//!   receiving as much from its left one, no reduction, no framing. The floor
//!   any ring has on this machine.

use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_proto::auth::{Token, TOKEN_ENV};
use rlhf_worker::collective::{
    CollectiveServer, HostAllReduce, RingAllReduce, RingConfig, ServerConfig,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchAllreduceArgs {
    /// Payload sizes in MB (10^6 bytes of f32).
    #[arg(long = "sizes-mb", value_delimiter = ',', default_values_t = [1usize, 4, 16, 64, 256])]
    pub sizes_mb: Vec<usize>,
    /// World sizes to run.
    #[arg(long = "workers", value_delimiter = ',', default_values_t = [2usize, 4])]
    pub workers: Vec<usize>,
    /// Timed rounds per size (after one warm-up); the median is reported.
    #[arg(long = "rounds", default_value_t = 5)]
    pub rounds: usize,
    /// Chunk size of the ring in KiB.
    #[arg(long = "chunk-kb", default_value_t = 1024)]
    pub chunk_kb: usize,
    /// Tokio worker threads of each rank process (1 measured best on 2 vCPUs:
    /// W ranks × (runtime threads + the calling thread) share the cores).
    #[arg(long = "threads", default_value_t = 1)]
    pub threads: usize,
    /// Also write the results as JSON here.
    #[arg(long = "out")]
    pub out: Option<PathBuf>,
    /// Internal: run as one rank process ("ring" or "tcp-ring").
    #[arg(long = "internal-kind", hide = true)]
    pub internal_kind: Option<String>,
    #[arg(long = "internal-rank", hide = true, default_value_t = 0)]
    pub internal_rank: usize,
    #[arg(long = "internal-world", hide = true, default_value_t = 0)]
    pub internal_world: usize,
    /// Internal: f32 elements per all-reduce.
    #[arg(long = "internal-elems", hide = true, default_value_t = 0)]
    pub internal_elems: usize,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Bytes one rank of a ring all-reduce of `bytes` sends (and receives).
fn ring_bytes_per_rank(bytes: usize, world: usize) -> usize {
    2 * (world - 1) * bytes / world
}

/// Median seconds to move `bytes` through one loopback TCP connection.
fn tcp_copy(bytes: usize, rounds: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; 4 << 20];
        for _ in 0..=rounds {
            read_exactly(&mut s, &mut buf, bytes)?;
            s.write_all(&[1])?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let data = vec![7u8; bytes];
    let mut times = Vec::new();
    for round in 0..=rounds {
        let t = Instant::now();
        s.write_all(&data)?;
        s.read_exact(&mut [0u8])?;
        if round > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(median(times))
}

/// Read and discard `n` bytes.
fn read_exactly(s: &mut TcpStream, buf: &mut [u8], mut n: usize) -> std::io::Result<()> {
    while n > 0 {
        let k = buf.len().min(n);
        let got = s.read(&mut buf[..k])?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        n -= got;
    }
    Ok(())
}

struct RankProc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl RankProc {
    fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        if self.stdout.read_line(&mut l)? == 0 {
            bail!("rank process exited early");
        }
        Ok(l.trim().to_string())
    }

    fn say(&mut self, s: &str) -> Result<()> {
        writeln!(self.stdin, "{s}")?;
        Ok(self.stdin.flush()?)
    }
}

/// Run `world` rank processes of `kind` on `elems` f32 and return the median
/// over rounds of the slowest rank's seconds.
fn run_ranks(args: &BenchAllreduceArgs, kind: &str, world: usize, elems: usize) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let token = Token::generate();
    let mut procs = Vec::new();
    for rank in 0..world {
        let mut child = Command::new(&exe)
            .arg("bench-allreduce")
            .args(["--internal-kind", kind])
            .args(["--internal-rank", &rank.to_string()])
            .args(["--internal-world", &world.to_string()])
            .args(["--internal-elems", &elems.to_string()])
            .args(["--chunk-kb", &args.chunk_kb.to_string()])
            .args(["--threads", &args.threads.to_string()])
            .env(TOKEN_ENV, token.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a rank process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("child stdout")?);
        procs.push(RankProc {
            child,
            stdin,
            stdout,
        });
    }
    let result = (|| -> Result<f64> {
        let mut peers = Vec::new();
        for p in procs.iter_mut() {
            let l = p.line()?;
            peers.push(
                l.strip_prefix("addr ")
                    .context("expected `addr`")?
                    .to_string(),
            );
        }
        let list = peers.join(",");
        for p in procs.iter_mut() {
            p.say(&format!("peers {list}"))?;
        }
        let mut rounds_max = Vec::new();
        for round in 0..=args.rounds {
            for p in procs.iter_mut() {
                p.say("go")?;
            }
            let mut worst = 0f64;
            for p in procs.iter_mut() {
                let l = p.line()?;
                let t: f64 = l
                    .strip_prefix("t ")
                    .with_context(|| format!("expected `t`, got {l:?}"))?
                    .parse()?;
                worst = worst.max(t);
            }
            if round > 0 {
                rounds_max.push(worst);
            }
        }
        for p in procs.iter_mut() {
            p.say("end")?;
        }
        // Two phases: a rank that closed its connection must stay up until
        // its left neighbour has closed the connection into it too.
        for p in procs.iter_mut() {
            let l = p.line()?;
            anyhow::ensure!(l == "closed", "rank ended with {l:?}");
        }
        for p in procs.iter_mut() {
            p.say("exit")?;
        }
        Ok(median(rounds_max))
    })();
    for mut p in procs {
        if result.is_err() {
            let _ = p.child.kill();
        }
        let _ = p.child.wait();
    }
    result
}

/// One rank process: talk to the parent over stdin/stdout.
fn rank_main(args: &BenchAllreduceArgs, kind: &str) -> Result<()> {
    let (rank, world, elems) = (args.internal_rank, args.internal_world, args.internal_elems);
    let stdin = std::io::stdin();
    let mut input = stdin.lock().lines();
    let mut next = move || -> Result<String> {
        Ok(input
            .next()
            .context("parent went away")??
            .trim()
            .to_string())
    };
    let mut out = std::io::stdout();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    match kind {
        "ring" => {
            let token = Token::load(None)?;
            let server =
                CollectiveServer::start_blocking(rt.handle(), ServerConfig::new(token.clone()))?;
            writeln!(out, "addr {}", server.local_addr())?;
            out.flush()?;
            let peers = parse_peers(&next()?, world)?;
            let mut cfg = RingConfig::new(rank, peers, token, 1);
            cfg.chunk_bytes = args.chunk_kb << 10;
            cfg.io_timeout = Duration::from_secs(60);
            let mut ring = RingAllReduce::new(&server, rt.handle().clone(), cfg)?;
            let mut data: Vec<f32> = (0..elems)
                .map(|i| (i % 1000) as f32 + rank as f32)
                .collect();
            loop {
                match next()?.as_str() {
                    "go" => {
                        let t = Instant::now();
                        ring.all_reduce_sum_host(&mut data)?;
                        writeln!(out, "t {}", t.elapsed().as_secs_f64())?;
                        out.flush()?;
                    }
                    "end" => break,
                    l => bail!("unexpected {l:?}"),
                }
            }
            ring.close()?;
            // Serve the left neighbour's connection until every rank has closed.
            writeln!(out, "closed")?;
            out.flush()?;
            anyhow::ensure!(next()? == "exit", "expected `exit`");
            drop(server);
        }
        "tcp-ring" => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            writeln!(out, "addr {}", listener.local_addr()?)?;
            out.flush()?;
            let peers = parse_peers(&next()?, world)?;
            let right = peers[(rank + 1) % world].clone();
            let connect = std::thread::spawn(move || TcpStream::connect(right));
            let (mut from_left, _) = listener.accept()?;
            let mut to_right = connect
                .join()
                .map_err(|_| anyhow::anyhow!("connect panicked"))??;
            to_right.set_nodelay(true)?;
            from_left.set_nodelay(true)?;
            let n = ring_bytes_per_rank(elems * 4, world);
            let data = vec![7u8; n];
            let mut buf = vec![0u8; 4 << 20];
            loop {
                match next()?.as_str() {
                    "go" => {
                        let t = Instant::now();
                        std::thread::scope(|s| -> Result<()> {
                            let sender = s.spawn(|| {
                                for c in data.chunks(4 << 20) {
                                    to_right.write_all(c)?;
                                }
                                std::io::Result::Ok(())
                            });
                            read_exactly(&mut from_left, &mut buf, n)?;
                            sender
                                .join()
                                .map_err(|_| anyhow::anyhow!("sender panicked"))??;
                            Ok(())
                        })?;
                        writeln!(out, "t {}", t.elapsed().as_secs_f64())?;
                        out.flush()?;
                    }
                    "end" => break,
                    l => bail!("unexpected {l:?}"),
                }
            }
            writeln!(out, "closed")?;
            out.flush()?;
            anyhow::ensure!(next()? == "exit", "expected `exit`");
        }
        k => bail!("unknown --internal-kind {k}"),
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.0} %", 100.0 * x)
}

pub fn run(args: &BenchAllreduceArgs) -> Result<()> {
    if let Some(kind) = &args.internal_kind {
        return rank_main(args, kind);
    }
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let mut rows = Vec::new();
    let mut tcp = std::collections::BTreeMap::new();
    for &mb in &args.sizes_mb {
        let bytes = (mb * 1_000_000 / 4) * 4;
        tcp.insert(
            mb,
            tcp_copy(bytes, args.rounds).context("TCP copy baseline")?,
        );
    }
    for &world in &args.workers {
        anyhow::ensure!(world >= 2, "--workers needs world sizes of at least 2");
        for &mb in &args.sizes_mb {
            let elems = mb * 1_000_000 / 4;
            let bytes = elems * 4;
            let secs = run_ranks(args, "ring", world, elems)
                .with_context(|| format!("ring all-reduce, world {world}, {mb} MB"))?;
            let raw = run_ranks(args, "tcp-ring", world, elems)
                .with_context(|| format!("raw TCP ring, world {world}, {mb} MB"))?;
            let algbw = bytes as f64 / secs;
            let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
            let tcp_bw = bytes as f64 / tcp[&mb];
            // The raw ring moves what a ring all-reduce moves: its busbw is
            // bytes per rank over time.
            let raw_busbw = ring_bytes_per_rank(bytes, world) as f64 / raw;
            let row = serde_json::json!({
                "world": world, "size_mb": mb, "bytes": bytes as u64,
                "allreduce_ms": secs * 1e3,
                "algbw_gbps": algbw / 1e9, "busbw_gbps": busbw / 1e9,
                "tcp_copy_ms": tcp[&mb] * 1e3, "tcp_copy_gbps": tcp_bw / 1e9,
                "raw_tcp_ring_ms": raw * 1e3, "raw_tcp_ring_busbw_gbps": raw_busbw / 1e9,
                "busbw_over_tcp": busbw / tcp_bw,
                "busbw_over_raw_ring": busbw / raw_busbw,
            });
            eprintln!("{row}");
            rows.push(row);
        }
    }
    let report = serde_json::json!({
        "what": "ring all-reduce (plain TCP per ring link, 40-byte frame headers) on loopback (one process per rank, each with its own tokio runtime + collective server) vs one TCP stream copy and vs a raw TCP ring (W processes each streaming 2(W-1)/W*N bytes to the right neighbour)",
        "rounds": args.rounds, "chunk_kb": args.chunk_kb, "threads_per_rank": args.threads,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rows": rows,
    });
    println!("| world | size MB | all-reduce ms | busbw GB/s | TCP copy GB/s | raw TCP ring busbw GB/s | busbw / TCP copy | busbw / raw ring |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {} |",
            r["world"],
            r["size_mb"],
            f(r, "allreduce_ms"),
            f(r, "busbw_gbps"),
            f(r, "tcp_copy_gbps"),
            f(r, "raw_tcp_ring_busbw_gbps"),
            pct(f(r, "busbw_over_tcp")),
            pct(f(r, "busbw_over_raw_ring")),
        );
    }
    if let Some(p) = &args.out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The `peers a,b,c` line the parent sends every rank: one address per rank.
fn parse_peers(line: &str, world: usize) -> Result<Vec<String>> {
    let peers: Vec<String> = line
        .strip_prefix("peers ")
        .context("expected `peers`")?
        .split(',')
        .map(String::from)
        .collect();
    anyhow::ensure!(peers.len() == world, "peer list of the wrong length");
    Ok(peers)
}
