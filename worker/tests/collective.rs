//! The ring all-reduce over real TCP on loopback: several ranks as threads,
//! each with its own collective server, as separate worker processes would be.

use prost::Message;
use rlhf_proto::auth::{TlsFiles, Token, MAX_CHUNK_MESSAGE};
use rlhf_proto::v1::{ring_status, RingHello, RingStatus};
use rlhf_worker::collective::{
    CollectiveError, CollectiveServer, HostAllReduce, RingAllReduce, RingConfig, ServerConfig,
};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn servers(rt: &Runtime, n: usize, token: &Token) -> (Vec<CollectiveServer>, Vec<String>) {
    let s: Vec<_> = (0..n)
        .map(|_| {
            CollectiveServer::start_blocking(rt.handle(), ServerConfig::new(token.clone())).unwrap()
        })
        .collect();
    let addrs = s.iter().map(|s| s.local_addr().to_string()).collect();
    (s, addrs)
}

fn config(rank: usize, peers: &[String], token: &Token, generation: u64) -> RingConfig {
    let mut c = RingConfig::new(rank, peers.to_vec(), token.clone(), generation);
    c.io_timeout = Duration::from_secs(20);
    // Small chunks: many per segment, so the pipelining and odd tails run.
    c.chunk_bytes = 4096;
    c
}

/// Every rank all-reduces each buffer of `inputs[rank]` in turn on one ring.
fn run_ring(
    rt: &Runtime,
    servers: &[CollectiveServer],
    peers: &[String],
    token: &Token,
    generation: u64,
    inputs: Vec<Vec<Vec<f32>>>,
) -> Vec<Vec<Vec<f32>>> {
    let rings: Vec<_> = (0..servers.len())
        .map(|r| {
            RingAllReduce::new(
                &servers[r],
                rt.handle().clone(),
                config(r, peers, token, generation),
            )
            .unwrap()
        })
        .collect();
    let threads: Vec<_> = rings
        .into_iter()
        .zip(inputs)
        .map(|(mut ring, mut bufs)| {
            std::thread::spawn(move || {
                for b in bufs.iter_mut() {
                    ring.all_reduce_sum_host(b).unwrap();
                }
                ring.close().unwrap();
                bufs
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        })
        .collect()
}

const LENS: [usize; 9] = [0, 1, 2, 3, 5, 1023, 1025, 4099, 100_003];

#[test]
fn ring_sums_equal_the_naive_sum_bitwise_on_every_rank_and_run() {
    let rt = runtime();
    let token = Token::generate();
    for world in [2, 3, 4] {
        let (srv, peers) = servers(&rt, world, &token);
        // Integers: any addition order gives the exact sum.
        let ints: Vec<Vec<Vec<f32>>> = (0..world)
            .map(|r| {
                LENS.iter()
                    .map(|&n| (0..n).map(|i| ((i * 7 + r * 13) % 101) as f32).collect())
                    .collect()
            })
            .collect();
        let out = run_ring(&rt, &srv, &peers, &token, 1, ints.clone());
        for (k, &n) in LENS.iter().enumerate() {
            let want: Vec<f32> = (0..n)
                .map(|i| (0..world).map(|r| ints[r][k][i]).sum())
                .collect();
            for (r, o) in out.iter().enumerate() {
                assert_eq!(o[k], want, "world {world} rank {r} len {n}");
            }
        }
        // Random floats: close to the naive sum, bitwise the same on every rank
        // and in a second run (a new generation on the same servers).
        let floats: Vec<Vec<Vec<f32>>> = (0..world)
            .map(|r| {
                LENS.iter()
                    .map(|&n| lcg((r * 1000 + n) as u64, n))
                    .collect()
            })
            .collect();
        let a = run_ring(&rt, &srv, &peers, &token, 2, floats.clone());
        let b = run_ring(&rt, &srv, &peers, &token, 3, floats.clone());
        for (k, &n) in LENS.iter().enumerate() {
            for i in 0..n {
                let naive: f32 = (0..world).map(|r| floats[r][k][i]).sum();
                assert!(
                    (a[0][k][i] - naive).abs() <= 1e-5 * (1.0 + naive.abs()),
                    "world {world} len {n} [{i}]"
                );
            }
            let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for r in 0..world {
                assert_eq!(
                    bits(&a[r][k]),
                    bits(&a[0][k]),
                    "rank {r} differs, world {world} len {n}"
                );
                assert_eq!(
                    bits(&b[r][k]),
                    bits(&a[0][k]),
                    "second run differs, world {world} len {n}"
                );
            }
        }
    }
}

#[test]
fn world_one_is_a_no_op_without_network() {
    let rt = runtime();
    let token = Token::generate();
    let (srv, peers) = servers(&rt, 1, &token);
    let mut ring =
        RingAllReduce::new(&srv[0], rt.handle().clone(), config(0, &peers, &token, 1)).unwrap();
    let mut x = vec![1.0, 2.0, 3.0];
    ring.all_reduce_sum_host(&mut x).unwrap();
    assert_eq!(x, [1.0, 2.0, 3.0]);
}

/// Dial `addr` and run the ring handshake by hand (a length-prefixed
/// `RingHello`); the listener's answer, or None if it closed the connection.
async fn handshake(addr: &str, hello: &RingHello) -> (Option<RingStatus>, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = hello.encode_to_vec();
    s.write_all(&(body.len() as u32).to_le_bytes())
        .await
        .unwrap();
    s.write_all(&body).await.unwrap();
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).await.is_err() {
        return (None, s);
    }
    let len = u32::from_le_bytes(len) as usize;
    // Not a status frame (a TLS listener may answer with an alert).
    if len > 4096 {
        return (None, s);
    }
    let mut b = vec![0u8; len];
    if s.read_exact(&mut b).await.is_err() {
        return (None, s);
    }
    (RingStatus::decode(b.as_slice()).ok(), s)
}

fn hello(token: &str, generation: u64, from_rank: u32) -> RingHello {
    RingHello {
        token: token.into(),
        generation,
        from_rank,
        world_size: 2,
    }
}

fn ring_error(ring: &mut RingAllReduce, n: usize) -> CollectiveError {
    let err = ring.all_reduce_sum_host(&mut vec![1.0; n]).unwrap_err();
    err.downcast_ref::<CollectiveError>()
        .expect("a CollectiveError")
        .clone()
}

#[test]
fn handshakes_without_the_token_or_with_a_wrong_one_are_unauthenticated() {
    let rt = runtime();
    let token = Token::generate();
    let (srv, peers) = servers(&rt, 2, &token);
    // Rank 1 runs generation 1, so only the token can be wrong.
    let _r1 =
        RingAllReduce::new(&srv[1], rt.handle().clone(), config(1, &peers, &token, 1)).unwrap();
    rt.block_on(async {
        for (bad, what) in [
            (String::new(), "no token"),
            (Token::generate().as_str().to_string(), "wrong token"),
        ] {
            let (st, _) = handshake(&peers[1], &hello(&bad, 1, 0)).await;
            let st = st.expect("a status frame");
            assert_eq!(st.code(), ring_status::Code::Unauthenticated, "{st:?}");
            assert!(st.message.contains(what), "{}", st.message);
        }
        let (st, _) = handshake(&peers[1], &hello(&token.as_str()[1..], 1, 0)).await;
        assert_eq!(st.unwrap().code(), ring_status::Code::Unauthenticated);
    });
    // A ring with the wrong token learns why its neighbour refused it.
    let mut cfg = config(0, &peers, &Token::generate(), 2);
    cfg.io_timeout = Duration::from_secs(5);
    let mut r0 = RingAllReduce::new(&srv[0], rt.handle().clone(), cfg).unwrap();
    let t = Instant::now();
    let e = ring_error(&mut r0, 1000);
    assert!(
        matches!(e, CollectiveError::Unauthenticated { .. }),
        "{e:?}"
    );
    assert!(!e.is_retryable());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_stale_generation_is_refused() {
    let rt = runtime();
    let token = Token::generate();
    let (srv, peers) = servers(&rt, 2, &token);
    // Rank 1 runs generation 5; a rank still on generation 4 dials it.
    let _r1 =
        RingAllReduce::new(&srv[1], rt.handle().clone(), config(1, &peers, &token, 5)).unwrap();
    rt.block_on(async {
        let (st, _) = handshake(&peers[1], &hello(token.as_str(), 4, 0)).await;
        let st = st.expect("a status frame");
        assert_eq!(st.code(), ring_status::Code::GenerationRefused, "{st:?}");
        assert!(st.message.contains("stale generation 4"), "{}", st.message);
        // The right generation from the wrong rank is refused too.
        let (st, _) = handshake(&peers[1], &hello(token.as_str(), 5, 1)).await;
        assert_eq!(st.unwrap().code(), ring_status::Code::BadRequest);
    });
    let mut r0 =
        RingAllReduce::new(&srv[0], rt.handle().clone(), config(0, &peers, &token, 4)).unwrap();
    let e = ring_error(&mut r0, 1000);
    assert!(
        matches!(e, CollectiveError::GenerationRefused { generation: 4, .. }),
        "{e:?}"
    );
    assert!(e.is_retryable());
}

#[test]
fn a_header_announcing_too_big_a_chunk_is_a_protocol_error() {
    let rt = runtime();
    let token = Token::generate();
    let (srv, peers) = servers(&rt, 2, &token);
    let mut r1 =
        RingAllReduce::new(&srv[1], rt.handle().clone(), config(1, &peers, &token, 1)).unwrap();
    let _conn = rt.block_on(async {
        let (st, mut s) = handshake(&peers[1], &hello(token.as_str(), 1, 0)).await;
        assert_eq!(st.unwrap().code(), ring_status::Code::Ok);
        let mut h = [0u8; 40];
        h[24..32].copy_from_slice(&1000u64.to_le_bytes());
        h[32..36].copy_from_slice(&(MAX_CHUNK_MESSAGE as u32 + 1).to_le_bytes());
        s.write_all(&h).await.unwrap();
        s
    });
    let e = ring_error(&mut r1, 1000);
    assert!(matches!(e, CollectiveError::Protocol { .. }), "{e:?}");
    assert!(!e.is_retryable());
}

/// Test-only certificates (tests/fixtures/tls/README.md).
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tls")
        .join(name)
}

fn mutual_tls(ca: &str) -> TlsFiles {
    TlsFiles {
        cert: Some(fixture("node.pem")),
        key: Some(fixture("node.key")),
        ca: Some(fixture(ca)),
        domain: None,
    }
}

#[test]
fn with_tls_the_ring_sums_and_other_cas_are_refused() {
    let rt = runtime();
    let token = Token::generate();
    let world = 3;
    let srv: Vec<_> = (0..world)
        .map(|_| {
            let mut c = ServerConfig::new(token.clone());
            c.tls = mutual_tls("ca.pem");
            CollectiveServer::start_blocking(rt.handle(), c).unwrap()
        })
        .collect();
    let peers: Vec<String> = srv.iter().map(|s| s.local_addr().to_string()).collect();
    let rings: Vec<_> = (0..world)
        .map(|r| {
            let mut c = config(r, &peers, &token, 1);
            c.tls = mutual_tls("ca.pem");
            RingAllReduce::new(&srv[r], rt.handle().clone(), c).unwrap()
        })
        .collect();
    let threads: Vec<_> = rings
        .into_iter()
        .enumerate()
        .map(|(r, mut ring)| {
            std::thread::spawn(move || {
                let mut x: Vec<f32> = (0..10_007).map(|i| (i % 97 + r) as f32).collect();
                ring.all_reduce_sum_host(&mut x).unwrap();
                ring.close().unwrap();
                x
            })
        })
        .collect();
    for t in threads {
        let x = t.join().unwrap();
        for (i, v) in x.iter().enumerate() {
            assert_eq!(*v, (3 * (i % 97) + 3) as f32, "[{i}]");
        }
    }
    // A rank that trusts another CA does not accept its neighbour's certificate.
    let mut c = config(0, &peers, &token, 2);
    c.tls = mutual_tls("other-ca.pem");
    c.io_timeout = Duration::from_secs(5);
    let mut r0 = RingAllReduce::new(&srv[0], rt.handle().clone(), c).unwrap();
    let e = ring_error(&mut r0, 1000);
    assert!(
        matches!(&e, CollectiveError::PeerLost { detail, .. } if detail.contains("TLS")),
        "{e:?}"
    );
    // A plain-TCP handshake to a TLS port gets no answer.
    rt.block_on(async {
        let (st, _) = handshake(&peers[1], &hello(token.as_str(), 2, 0)).await;
        assert!(st.is_none(), "{st:?}");
    });
}

#[test]
fn a_dead_right_neighbour_is_a_prompt_peer_lost_error() {
    let rt = runtime();
    let token = Token::generate();
    let (srv, mut peers) = servers(&rt, 1, &token);
    // A port nobody listens on any more.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    peers.push(dead.local_addr().unwrap().to_string());
    drop(dead);
    let mut cfg = config(0, &peers, &token, 1);
    cfg.io_timeout = Duration::from_secs(3);
    let mut ring = RingAllReduce::new(&srv[0], rt.handle().clone(), cfg).unwrap();
    let t = Instant::now();
    let err = ring
        .all_reduce_sum_host(&mut vec![1.0; 10_000])
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    let e = err
        .downcast_ref::<CollectiveError>()
        .expect("a CollectiveError");
    assert!(matches!(e, CollectiveError::PeerLost { .. }), "{e:?}");
    assert!(e.is_retryable());
    // The ring is spent: the next call says so at once.
    let again = ring.all_reduce_sum_host(&mut [1.0]).unwrap_err();
    assert!(matches!(
        again.downcast_ref::<CollectiveError>(),
        Some(CollectiveError::Poisoned(_))
    ));
}

#[test]
fn a_silent_left_neighbour_times_out() {
    let rt = runtime();
    let token = Token::generate();
    // Rank 1's server is up but it never builds its ring: nothing comes back.
    let (srv, peers) = servers(&rt, 2, &token);
    let mut cfg = config(0, &peers, &token, 1);
    cfg.io_timeout = Duration::from_millis(800);
    let mut ring = RingAllReduce::new(&srv[0], rt.handle().clone(), cfg).unwrap();
    let t = Instant::now();
    let err = ring.all_reduce_sum_host(&mut vec![1.0; 1000]).unwrap_err();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2000),
        "took {took:?}"
    );
    assert!(
        matches!(
            err.downcast_ref::<CollectiveError>(),
            Some(CollectiveError::Timeout { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn the_abort_flag_unblocks_a_waiting_rank_promptly() {
    let rt = runtime();
    let token = Token::generate();
    let (srv, peers) = servers(&rt, 2, &token);
    let mut cfg = config(0, &peers, &token, 1);
    cfg.io_timeout = Duration::from_secs(60);
    let abort = cfg.abort.clone();
    let mut ring = RingAllReduce::new(&srv[0], rt.handle().clone(), cfg).unwrap();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        abort.store(true, Ordering::Relaxed);
        Instant::now()
    });
    let err = ring.all_reduce_sum_host(&mut vec![1.0; 1000]).unwrap_err();
    let late = setter.join().unwrap().elapsed();
    assert!(
        late < Duration::from_millis(150),
        "returned {late:?} after the abort"
    );
    assert!(
        matches!(
            err.downcast_ref::<CollectiveError>(),
            Some(CollectiveError::Aborted)
        ),
        "{err:?}"
    );
}

#[test]
fn a_neighbour_that_dies_mid_generation_fails_the_survivor() {
    let rt = runtime();
    let token = Token::generate();
    let (mut srv, peers) = servers(&rt, 2, &token);
    let mut cfg0 = config(0, &peers, &token, 1);
    cfg0.io_timeout = Duration::from_secs(5);
    let mut r0 = RingAllReduce::new(&srv[0], rt.handle().clone(), cfg0).unwrap();
    let mut r1 =
        RingAllReduce::new(&srv[1], rt.handle().clone(), config(1, &peers, &token, 1)).unwrap();
    let t1 = std::thread::spawn(move || {
        r1.all_reduce_sum_host(&mut vec![1.0; 5000]).unwrap();
        r1 // dies (dropped with its server) after one op
    });
    r0.all_reduce_sum_host(&mut vec![1.0; 5000]).unwrap();
    drop(t1.join().unwrap());
    srv.pop().unwrap().shutdown();
    let t = Instant::now();
    let err = r0.all_reduce_sum_host(&mut vec![1.0; 5000]).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let e = err
        .downcast_ref::<CollectiveError>()
        .expect("a CollectiveError");
    assert!(e.is_retryable(), "{e:?}");
}

#[test]
fn between_all_reduces_the_end_of_the_generation_is_acknowledged_without_the_ring() {
    // The all-gather reads from the socket on the ring's own thread; between
    // all-reduces the connection goes back to the server, which acknowledges
    // the left neighbour's end frame while this rank's ring is idle.
    let rt = runtime();
    let token = Token::generate();
    let (servers, peers) = servers(&rt, 3, &token);
    let rings: Vec<_> = (0..3)
        .map(|r| {
            RingAllReduce::new(
                &servers[r],
                rt.handle().clone(),
                config(r, &peers, &token, 1),
            )
            .unwrap()
        })
        .collect();
    let threads: Vec<_> = rings
        .into_iter()
        .enumerate()
        .map(|(rank, mut ring)| {
            std::thread::spawn(move || {
                // Big (many direct all-gather chunks), tiny (may all come
                // through the server before it lends the connection), big.
                let mut out = Vec::new();
                for (i, n) in [100_003usize, 3, 1, 50_001, 2].into_iter().enumerate() {
                    let mut b = lcg((rank * 10 + i) as u64, n);
                    ring.all_reduce_sum_host(&mut b).unwrap();
                    out.push(b);
                }
                // Rank 1 stays busy before closing; rank 0's close needs its ack.
                if rank == 1 {
                    std::thread::sleep(Duration::from_millis(1500));
                }
                let t = Instant::now();
                ring.close().unwrap();
                (out, t.elapsed())
            })
        })
        .collect();
    let res: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, n) in [100_003usize, 3, 1, 50_001, 2].into_iter().enumerate() {
        let xs: Vec<Vec<f32>> = (0..3).map(|r| lcg((r * 10 + i) as u64, n)).collect();
        let want: Vec<f32> = (0..n).map(|j| xs[0][j] + xs[1][j] + xs[2][j]).collect();
        for (r, (out, _)) in res.iter().enumerate() {
            // The order of the additions depends on the segment; the bits are
            // the same on every rank (checked exactly), the value close to the naive sum.
            assert_eq!(
                out[i].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                res[0].0[i].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "rank {r}, buffer {i}"
            );
            for (a, b) in out[i].iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "rank {r}: {a} vs {b}"
                );
            }
        }
    }
    assert!(
        res[0].1 < Duration::from_millis(1000),
        "rank 0's close waited {:?} for idle rank 1",
        res[0].1
    );
}
