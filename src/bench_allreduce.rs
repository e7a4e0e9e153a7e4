//! `rlhf bench-allreduce`: the ring all-reduce over real gRPC on loopback
//! against a plain TCP copy of the same bytes, in NCCL's terms (algorithm and
//! bus bandwidth).
//!
//! Ranks are threads of this process, each with its own tokio runtime and
//! collective server, talking over 127.0.0.1 exactly as worker processes do.

use anyhow::{Context, Result};
use clap::Args;
use rlhf_proto::auth::Token;
use rlhf_worker::collective::{
    CollectiveServer, HostAllReduce, RingAllReduce, RingConfig, ServerConfig,
};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
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
    /// Also write the results as JSON here.
    #[arg(long = "out")]
    pub out: Option<PathBuf>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
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
            let mut left = bytes;
            while left > 0 {
                let n = s.read(&mut buf[..left.min(4 << 20)])?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                left -= n;
            }
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

/// Median seconds of one all-reduce of `elems` f32 over `world` ranks: each
/// round starts at a barrier and ends when the slowest rank is done.
fn ring(world: usize, elems: usize, rounds: usize, chunk_bytes: usize) -> Result<f64> {
    let token = Token::generate();
    let runtimes = (0..world)
        .map(|_| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let servers = runtimes
        .iter()
        .map(|rt| CollectiveServer::start_blocking(rt.handle(), ServerConfig::new(token.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let peers: Vec<String> = servers.iter().map(|s| s.local_addr().to_string()).collect();
    let barrier = Arc::new(Barrier::new(world));
    let mut threads = Vec::new();
    for (rank, rt) in runtimes.iter().enumerate() {
        let mut cfg = RingConfig::new(rank, peers.clone(), token.clone(), 1);
        cfg.chunk_bytes = chunk_bytes;
        cfg.io_timeout = Duration::from_secs(60);
        let mut ring = RingAllReduce::new(&servers[rank], rt.handle().clone(), cfg)?;
        let barrier = barrier.clone();
        threads.push(std::thread::spawn(move || -> Result<Vec<f64>> {
            let mut data: Vec<f32> = (0..elems)
                .map(|i| (i % 1000) as f32 + rank as f32)
                .collect();
            let mut times = Vec::new();
            for round in 0..=rounds {
                barrier.wait();
                let t = Instant::now();
                ring.all_reduce_sum_host(&mut data)?;
                if round > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            ring.close()?;
            Ok(times)
        }));
    }
    let mut per_rank = Vec::new();
    for t in threads {
        per_rank.push(t.join().map_err(|_| anyhow::anyhow!("rank panicked"))??);
    }
    // Round time = the slowest rank's.
    let rounds_max: Vec<f64> = (0..rounds)
        .map(|i| per_rank.iter().map(|r| r[i]).fold(0.0, f64::max))
        .collect();
    drop(servers);
    Ok(median(rounds_max))
}

pub fn run(args: &BenchAllreduceArgs) -> Result<()> {
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
            let bytes = (elems * 4) as f64;
            let secs = ring(world, elems, args.rounds, args.chunk_kb << 10)
                .with_context(|| format!("ring all-reduce, world {world}, {mb} MB"))?;
            let algbw = bytes / secs;
            let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
            let tcp_bw = bytes / tcp[&mb];
            let row = serde_json::json!({
                "world": world, "size_mb": mb, "bytes": bytes as u64,
                "allreduce_ms": secs * 1e3,
                "algbw_gbps": algbw / 1e9, "busbw_gbps": busbw / 1e9,
                "tcp_copy_ms": tcp[&mb] * 1e3, "tcp_copy_gbps": tcp_bw / 1e9,
                "busbw_over_tcp": busbw / tcp_bw,
            });
            eprintln!("{row}");
            rows.push(row);
        }
    }
    let report = serde_json::json!({
        "what": "ring all-reduce over gRPC on loopback (ranks = threads, one tokio runtime + collective server each) vs one TCP stream copy",
        "rounds": args.rounds, "chunk_kb": args.chunk_kb,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rows": rows,
    });
    println!("| world | size MB | all-reduce ms | algbw GB/s | busbw GB/s | TCP copy ms | TCP copy GB/s | busbw / TCP |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} | {:.0} % |",
            r["world"],
            r["size_mb"],
            r["allreduce_ms"].as_f64().unwrap_or(0.0),
            r["algbw_gbps"].as_f64().unwrap_or(0.0),
            r["busbw_gbps"].as_f64().unwrap_or(0.0),
            r["tcp_copy_ms"].as_f64().unwrap_or(0.0),
            r["tcp_copy_gbps"].as_f64().unwrap_or(0.0),
            100.0 * r["busbw_over_tcp"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(p) = &args.out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
