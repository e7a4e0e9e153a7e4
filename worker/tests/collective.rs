//! The ring all-reduce over real gRPC on loopback: several ranks as threads,
//! each with its own collective server, as separate worker processes would be.

use rlhf_proto::auth::{AttachToken, Token};
use rlhf_proto::v1::collective_client::CollectiveClient;
use rlhf_proto::v1::RingChunk;
use rlhf_worker::collective::{
    CollectiveError, CollectiveServer, HostAllReduce, RingAllReduce, RingConfig, ServerConfig,
};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
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

fn one_chunk(generation: u64) -> RingChunk {
    RingChunk {
        generation,
        from_rank: 1,
        op: 0,
        step: 0,
        offset: 0,
        total_len: 1,
        data: vec![0u8; 4].into(),
    }
}

#[test]
fn calls_without_the_token_or_with_a_wrong_one_are_unauthenticated() {
    let rt = runtime();
    let token = Token::generate();
    let (srv, _) = servers(&rt, 1, &token);
    let url = format!("http://{}", srv[0].local_addr());
    rt.block_on(async {
        let mut bare = CollectiveClient::connect(url.clone()).await.unwrap();
        let st = bare
            .ring(tokio_stream::iter(vec![one_chunk(1)]))
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::Unauthenticated);
        let ch = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut wrong = CollectiveClient::with_interceptor(ch, AttachToken(Token::generate()));
        let st = wrong
            .ring(tokio_stream::iter(vec![one_chunk(1)]))
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::Unauthenticated);
    });
}

#[test]
fn a_chunk_of_a_stale_generation_is_refused() {
    let rt = runtime();
    let token = Token::generate();
    let (srv, peers) = servers(&rt, 2, &token);
    // Rank 1 runs generation 5; a rank still on generation 4 streams to it.
    let _ring =
        RingAllReduce::new(&srv[1], rt.handle().clone(), config(1, &peers, &token, 5)).unwrap();
    let url = format!("http://{}", srv[1].local_addr());
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = CollectiveClient::with_interceptor(ch, AttachToken(token.clone()));
        let st = c
            .ring(tokio_stream::iter(vec![one_chunk(4)]))
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
        assert!(
            st.message().contains("stale generation 4"),
            "{}",
            st.message()
        );
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
