//! The coordinator against fake workers: plain tonic clients that register,
//! heart-beat, take assignments, meet at the rendezvous and report.

use rlhf_coordinator::pipeline::{ClusterConfig, Pipeline, StageKind, StageSpec};
use rlhf_coordinator::proto::assignment::Kind;
use rlhf_coordinator::proto::coordinator_client::CoordinatorClient;
use rlhf_coordinator::proto::*;
use rlhf_coordinator::{start, CoordinatorConfig, RunningCoordinator, VERSION};
use rlhf_proto::auth::{channel, AttachToken, TlsFiles, Token};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

type Client = CoordinatorClient<InterceptedService<Channel, AttachToken>>;

const INTERVAL_MS: u64 = 100;
const TIMEOUT_MS: u64 = 600;

fn token() -> Token {
    Token::new("test-token-0123456789abcdef", "test").unwrap()
}

fn pt_stage(name: &str) -> StageSpec {
    StageSpec {
        name: name.into(),
        kind: StageKind::Pt,
        args: vec![
            ("model_name_or_path".into(), "demo/model".into()),
            ("output_dir".into(), format!("out/{name}")),
            ("per_device_train_batch_size".into(), "4".into()),
            ("gradient_accumulation_steps".into(), "2".into()),
        ],
    }
}

fn pipeline(stages: Vec<StageSpec>, min_workers: usize, state_dir: &Path) -> Pipeline {
    Pipeline {
        cluster: ClusterConfig {
            workers: 2,
            min_workers,
            heartbeat_interval_ms: INTERVAL_MS,
            heartbeat_timeout_ms: TIMEOUT_MS,
            state_dir: state_dir.to_path_buf(),
        },
        stages,
        source: "test-pipeline.toml".into(),
    }
}

async fn coordinator(p: Pipeline, state_dir: &Path, http: bool) -> RunningCoordinator {
    start(CoordinatorConfig {
        pipeline: p,
        listen: "127.0.0.1:0".parse().unwrap(),
        http: http.then(|| "127.0.0.1:0".parse().unwrap()),
        token: token(),
        tls: TlsFiles::default(),
        state_dir: state_dir.to_path_buf(),
    })
    .await
    .unwrap()
}

fn client_with(addr: SocketAddr, t: Token) -> Client {
    let ch = channel(
        &addr.to_string(),
        &TlsFiles::default(),
        Duration::from_secs(2),
    )
    .unwrap();
    CoordinatorClient::with_interceptor(ch, AttachToken(t))
}

fn client(addr: SocketAddr) -> Client {
    client_with(addr, token())
}

struct FakeWorker {
    id: String,
    c: Client,
    beat: Option<JoinHandle<()>>,
}

impl FakeWorker {
    async fn join(addr: SocketAddr, peer: &str) -> FakeWorker {
        let mut c = client(addr);
        let r = c
            .register(RegisterRequest {
                host: format!("host-{peer}"),
                device_kind: "cpu".into(),
                device_memory_bytes: 1 << 30,
                peer_address: peer.into(),
                version: VERSION.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.heartbeat_interval_ms, INTERVAL_MS);
        assert_eq!(r.heartbeat_timeout_ms, TIMEOUT_MS);
        let mut hb = c.clone();
        let id = r.worker_id.clone();
        let beat = tokio::spawn(async move {
            loop {
                let _ = hb
                    .heartbeat(HeartbeatRequest {
                        worker_id: id.clone(),
                        generation: 0,
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(INTERVAL_MS)).await;
            }
        });
        FakeWorker {
            id: r.worker_id,
            c,
            beat: Some(beat),
        }
    }

    /// Stop heart-beating (and calling): the coordinator should declare it dead.
    fn go_silent(&mut self) {
        if let Some(b) = self.beat.take() {
            b.abort();
        }
    }

    async fn heartbeat(&mut self) -> HeartbeatReply {
        self.c
            .heartbeat(HeartbeatRequest {
                worker_id: self.id.clone(),
                generation: 0,
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// GetAssignment until something other than Wait comes.
    async fn next(&mut self) -> Kind {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let a = self
                .c
                .get_assignment(AssignmentRequest {
                    worker_id: self.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            match a.kind.unwrap() {
                Kind::Wait(_) => assert!(Instant::now() < deadline, "no assignment within 20 s"),
                k => return k,
            }
        }
    }

    async fn stage(&mut self) -> StageAssignment {
        match self.next().await {
            Kind::Stage(s) => s,
            k => panic!("expected a stage, got {k:?}"),
        }
    }

    async fn shutdown(&mut self) -> Shutdown {
        match self.next().await {
            Kind::Shutdown(s) => s,
            k => panic!("expected shutdown, got {k:?}"),
        }
    }

    async fn rendezvous(
        &mut self,
        generation: u64,
        nccl: &[u8],
    ) -> Result<RendezvousReply, tonic::Status> {
        self.c
            .rendezvous(RendezvousRequest {
                worker_id: self.id.clone(),
                generation,
                nccl_unique_id: nccl.to_vec(),
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn checkpoint(
        &mut self,
        generation: u64,
        step: u64,
        path: &str,
    ) -> Result<bool, tonic::Status> {
        self.c
            .report_checkpoint(CheckpointReport {
                worker_id: self.id.clone(),
                generation,
                step,
                path: path.into(),
            })
            .await
            .map(|r| r.into_inner().committed)
    }

    async fn finish(&mut self, generation: u64, error: &str, retryable: bool, results: &str) {
        self.c
            .finish_stage(StageResult {
                worker_id: self.id.clone(),
                generation,
                error: error.into(),
                retryable,
                results_json: results.into(),
            })
            .await
            .unwrap();
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.go_silent();
    }
}

async fn status(c: &mut Client) -> serde_json::Value {
    let s = c.status(StatusRequest {}).await.unwrap().into_inner().json;
    serde_json::from_str(&s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_are_placed_meet_commit_and_finish() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(vec![pt_stage("pt")], 2, dir.path());
    let argv = p.stage_argv(0).unwrap();
    let coord = coordinator(p, dir.path(), false).await;
    let mut a = FakeWorker::join(coord.addr, "10.0.0.1:7000").await;
    let mut b = FakeWorker::join(coord.addr, "10.0.0.2:7000").await;
    assert_ne!(a.id, b.id);

    let (sa, sb) = tokio::join!(a.stage(), b.stage());
    assert_eq!((sa.rank, sb.rank), (0, 1));
    assert_eq!((sa.world_size, sb.world_size), (2, 2));
    assert_eq!(sa.generation, sb.generation);
    assert!(sa.generation >= 1);
    assert_eq!(sa.stage_name, "pt");
    assert_eq!(sa.stage_kind, "pt");
    assert_eq!(sa.args, argv);
    assert_eq!(sa.global_batch_size, 2 * 4 * 2);
    assert_eq!(sa.resume_checkpoint, "");
    let g = sa.generation;
    assert_eq!(a.heartbeat().await.generation, g);

    // The rendezvous is a barrier: alone, rank 1 waits.
    let early = tokio::time::timeout(Duration::from_millis(300), b.rendezvous(g, b"")).await;
    assert!(
        early.is_err(),
        "the rendezvous answered before every rank came"
    );
    let (ra, rb) = tokio::join!(a.rendezvous(g, b"nccl-id"), b.rendezvous(g, b""));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.peers, vec!["10.0.0.1:7000", "10.0.0.2:7000"]);
    assert_eq!((ra.rank, rb.rank, ra.world_size), (0, 1, 2));
    assert_eq!(
        (ra.left_peer.as_str(), ra.right_peer.as_str()),
        ("10.0.0.2:7000", "10.0.0.2:7000")
    );
    assert_eq!(rb.left_peer, "10.0.0.1:7000");
    assert_eq!(rb.nccl_unique_id, b"nccl-id");
    // A stale generation is refused.
    assert_eq!(
        a.rendezvous(g + 100, b"").await.unwrap_err().code(),
        Code::Aborted
    );

    // Metrics from rank 0 show in the status.
    for step in [1u64, 2, 3] {
        a.c.report_metrics(MetricsReport {
            worker_id: a.id.clone(),
            generation: g,
            step,
            total_steps: 10,
            loss: 3.0 - step as f64 * 0.1,
            learning_rate: 1e-4,
            grad_norm: 1.0,
            tokens_per_sec: 1000.0,
            eval_loss: f64::NAN,
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = status(&mut a.c).await;
    assert_eq!(s["state"], "running");
    assert_eq!(s["stage"]["step"], 3);
    assert_eq!(s["stage"]["total_steps"], 10);
    assert_eq!(s["stage"]["generation"], g);
    assert!(s["stage"]["eta_seconds"].as_f64().unwrap() > 0.0, "{s}");
    assert_eq!(s["workers"].as_array().unwrap().len(), 2);
    assert_eq!(s["workers"][1]["rank"], 1);
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    assert!(metrics.contains("\"eval_loss\":null"), "{metrics}");

    // A checkpoint commits once every rank reported its step.
    assert!(!a.checkpoint(g, 5, "out/pt/checkpoint-5").await.unwrap());
    assert!(status(&mut a.c).await["stage"]["committed_step"].is_null());
    assert!(b.checkpoint(g, 5, "").await.unwrap());
    let s = status(&mut a.c).await;
    assert_eq!(s["stage"]["committed_step"], 5);
    assert_eq!(s["stage"]["committed_checkpoint"], "out/pt/checkpoint-5");
    let journal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("journal.json")).unwrap()).unwrap();
    assert_eq!(journal["committed"]["pt"]["path"], "out/pt/checkpoint-5");
    assert_eq!(
        a.checkpoint(g + 1, 6, "x").await.unwrap_err().code(),
        Code::Aborted
    );

    // Both finish: rank 1 waits for rank 0, then both are told to shut down.
    b.finish(g, "", false, "").await;
    let b_next = tokio::spawn(async move {
        let s = b.shutdown().await;
        (s, b)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.finish(g, "", false, r#"{"train_loss": 2.5}"#).await;
    let sa = a.shutdown().await;
    let (sb, _b) = b_next.await.unwrap();
    assert!(sa.success && sb.success, "{sa:?} {sb:?}");
    let outcome = tokio::time::timeout(Duration::from_secs(5), coord.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(outcome.success);
    assert_eq!(
        outcome.results,
        vec![("pt".to_string(), serde_json::json!({"train_loss": 2.5}))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_is_declared_dead_and_the_survivor_resumes_then_a_replacement_joins() {
    let dir = tempfile::tempdir().unwrap();
    let coord = coordinator(
        pipeline(vec![pt_stage("pt")], 2, dir.path()),
        dir.path(),
        false,
    )
    .await;
    let mut a = FakeWorker::join(coord.addr, "a:1").await;
    let mut b = FakeWorker::join(coord.addr, "b:1").await;
    let (sa, sb) = tokio::join!(a.stage(), b.stage());
    let g1 = sa.generation;
    assert_eq!(sb.generation, g1);
    let (ra, rb) = tokio::join!(a.rendezvous(g1, b""), b.rendezvous(g1, b""));
    ra.unwrap();
    rb.unwrap();
    assert!(!a.checkpoint(g1, 4, "out/pt/checkpoint-4").await.unwrap());
    assert!(b.checkpoint(g1, 4, "").await.unwrap());

    // b dies: the survivor's heartbeat names another generation within the timeout.
    b.go_silent();
    let silent_since = Instant::now();
    loop {
        if a.heartbeat().await.generation != g1 {
            break;
        }
        assert!(
            silent_since.elapsed() < Duration::from_millis(TIMEOUT_MS + 1500),
            "death not detected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let detected = silent_since.elapsed();
    assert!(
        detected >= Duration::from_millis(TIMEOUT_MS / 2),
        "declared dead too early: {detected:?}"
    );
    // Work of the aborted generation is refused.
    assert_eq!(
        a.checkpoint(g1, 8, "x").await.unwrap_err().code(),
        Code::Aborted
    );
    let s = status(&mut a.c).await;
    assert_eq!(s["state"], "recovering", "{s}");
    assert_eq!(s["workers"][0]["alive"], true, "{s}");
    assert_eq!(s["workers"][1]["id"], b.id.as_str(), "{s}");
    assert_eq!(s["workers"][1]["alive"], false, "{s}");
    assert!(s["message"].as_str().unwrap().contains(&b.id), "{s}");

    // The survivor alone gets a new generation, resumed from the committed checkpoint.
    let s2 = a.stage().await;
    assert!(s2.generation > g1);
    assert_eq!((s2.rank, s2.world_size), (0, 1));
    assert_eq!(s2.resume_checkpoint, "out/pt/checkpoint-4");
    assert_eq!(
        s2.global_batch_size,
        2 * 4 * 2,
        "the global batch does not depend on the world"
    );
    let r = a.rendezvous(s2.generation, b"").await.unwrap();
    assert_eq!(
        (r.left_peer.as_str(), r.right_peer.as_str()),
        ("a:1", "a:1")
    );

    // A replacement registers; the next placement (after a retryable failure) includes it.
    let mut c = FakeWorker::join(coord.addr, "c:1").await;
    let c_next = tokio::spawn(async move {
        let s = c.stage().await;
        (s, c)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.finish(s2.generation, "connection to peer reset", true, "")
        .await;
    let s3 = a.stage().await;
    let (s3c, _c) = c_next.await.unwrap();
    assert!(s3.generation > s2.generation);
    assert_eq!(s3.generation, s3c.generation);
    assert_eq!((s3.rank, s3c.rank, s3.world_size), (0, 1, 2));
    assert_eq!(s3c.resume_checkpoint, "out/pt/checkpoint-4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_registering_during_recovery_is_placed_with_the_survivor() {
    let dir = tempfile::tempdir().unwrap();
    let coord = coordinator(
        pipeline(vec![pt_stage("pt")], 2, dir.path()),
        dir.path(),
        false,
    )
    .await;
    let mut a = FakeWorker::join(coord.addr, "a:1").await;
    let mut b = FakeWorker::join(coord.addr, "b:1").await;
    let (sa, _sb) = tokio::join!(a.stage(), b.stage());
    let g1 = sa.generation;
    b.go_silent();
    drop(b);
    while a.heartbeat().await.generation == g1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Quick: within the heartbeat interval the coordinator waits after an abort.
    let mut c = FakeWorker::join(coord.addr, "c:1").await;
    let (s2a, s2c) = tokio::join!(a.stage(), c.stage());
    assert!(s2a.generation > g1);
    assert_eq!(s2a.generation, s2c.generation);
    assert_eq!((s2a.rank, s2c.rank, s2a.world_size), (0, 1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoning_a_generation_re_places_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let coord = coordinator(
        pipeline(vec![pt_stage("pt")], 1, dir.path()),
        dir.path(),
        false,
    )
    .await;
    let mut a = FakeWorker::join(coord.addr, "a:1").await;
    let s1 = a.stage().await;
    // Asking again while placed: the worker left its generation.
    let s2 = a.stage().await;
    assert!(s2.generation > s1.generation);
    assert_eq!(
        a.rendezvous(s1.generation, b"").await.unwrap_err().code(),
        Code::Aborted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retryable_failure_shuts_every_worker_down() {
    let dir = tempfile::tempdir().unwrap();
    let coord = coordinator(
        pipeline(vec![pt_stage("pt"), pt_stage("pt2")], 2, dir.path()),
        dir.path(),
        false,
    )
    .await;
    let mut a = FakeWorker::join(coord.addr, "a:1").await;
    let mut b = FakeWorker::join(coord.addr, "b:1").await;
    let (sa, _) = tokio::join!(a.stage(), b.stage());
    let g = sa.generation;
    b.finish(g, "bad record 17 in data/train.jsonl", false, "")
        .await;
    // The running rank sees its generation end, and then the shutdown.
    assert_eq!(a.heartbeat().await.generation, 0);
    let (da, db) = tokio::join!(a.shutdown(), b.shutdown());
    for d in [&da, &db] {
        assert!(!d.success);
        assert!(
            d.message.contains("pt") && d.message.contains("bad record 17"),
            "{}",
            d.message
        );
    }
    let outcome = tokio::time::timeout(Duration::from_secs(5), coord.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!outcome.success);
    assert_eq!(outcome.message, da.message);

    // The journal remembers: a new coordinator on it is over at once.
    let again = coordinator(
        pipeline(vec![pt_stage("pt"), pt_stage("pt2")], 2, dir.path()),
        dir.path(),
        false,
    )
    .await;
    let outcome2 = tokio::time::timeout(Duration::from_secs(2), again.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome2, outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_from_its_journal() {
    let dir = tempfile::tempdir().unwrap();
    let demo = StageSpec {
        name: "demo".into(),
        kind: StageKind::Demo,
        args: vec![("output_dir".into(), "demo".into())],
    };
    let stages = vec![demo, pt_stage("pt")];
    let coord = coordinator(pipeline(stages.clone(), 1, dir.path()), dir.path(), false).await;
    let mut a = FakeWorker::join(coord.addr, "a:1").await;
    let d = a.stage().await;
    assert_eq!(
        (
            d.stage_name.as_str(),
            d.stage_kind.as_str(),
            d.global_batch_size
        ),
        ("demo", "demo", 0)
    );
    a.finish(d.generation, "", false, r#"{"output_dir": "demo"}"#)
        .await;
    let s = a.stage().await;
    assert_eq!(s.stage_name, "pt");
    assert!(s.generation > d.generation);
    assert!(a
        .checkpoint(s.generation, 7, "out/pt/checkpoint-7")
        .await
        .unwrap());

    // The coordinator goes away; the journal stays.
    coord.shutdown();
    let err = coord.wait().await.unwrap_err();
    assert!(err.to_string().contains("resume"), "{err}");

    // Another pipeline may not use this state dir.
    let other = start(CoordinatorConfig {
        pipeline: pipeline(vec![pt_stage("other")], 1, dir.path()),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: None,
        token: token(),
        tls: TlsFiles::default(),
        state_dir: dir.path().to_path_buf(),
    })
    .await;
    let msg = format!(
        "{:#}",
        other
            .err()
            .expect("a journal of another pipeline was accepted")
    );
    assert!(
        msg.contains("another pipeline") && msg.contains("state-dir"),
        "{msg}"
    );

    let coord = coordinator(pipeline(stages, 1, dir.path()), dir.path(), false).await;
    // The old id means nothing to the new process: register again.
    let mut old = FakeWorker {
        id: a.id.clone(),
        c: client(coord.addr),
        beat: None,
    };
    assert!(!old.heartbeat().await.known);
    let e = old
        .c
        .get_assignment(AssignmentRequest {
            worker_id: a.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut a2 = FakeWorker::join(coord.addr, "a:1").await;
    assert_ne!(
        a2.id, a.id,
        "worker ids are unique across coordinator restarts"
    );
    let s2 = a2.stage().await;
    assert_eq!(s2.stage_name, "pt", "the done stage is skipped");
    assert!(s2.generation > s.generation);
    assert_eq!(s2.resume_checkpoint, "out/pt/checkpoint-7");
    a2.finish(s2.generation, "", false, r#"{"global_step": 10}"#)
        .await;
    assert!(a2.shutdown().await.success);
    let outcome = coord.wait().await.unwrap();
    assert!(outcome.success);
    assert_eq!(
        outcome.results,
        vec![
            (
                "demo".to_string(),
                serde_json::json!({"output_dir": "demo"})
            ),
            ("pt".to_string(), serde_json::json!({"global_step": 10})),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_right_token_or_version_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let coord = coordinator(
        pipeline(vec![pt_stage("pt")], 1, dir.path()),
        dir.path(),
        false,
    )
    .await;
    let ch = channel(
        &coord.addr.to_string(),
        &TlsFiles::default(),
        Duration::from_secs(2),
    )
    .unwrap();
    let mut bare = CoordinatorClient::new(ch);
    let e = bare.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut wrong = client_with(
        coord.addr,
        Token::new("another-token-0123456789", "t").unwrap(),
    );
    let e = wrong
        .register(RegisterRequest {
            version: VERSION.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let mut c = client(coord.addr);
    let e = c
        .register(RegisterRequest {
            host: "h".into(),
            version: "0.0.0-other".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("0.0.0-other") && e.message().contains(VERSION),
        "{}",
        e.message()
    );
}

async fn http_get(addr: SocketAddr, auth: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(a) = auth {
        req += &format!("Authorization: {a}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_status_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let coord = coordinator(
        pipeline(vec![pt_stage("pt")], 2, dir.path()),
        dir.path(),
        true,
    )
    .await;
    let http = coord.http_addr.unwrap();
    let _a = FakeWorker::join(coord.addr, "a:1").await;
    assert_eq!(http_get(http, None).await.0, 401);
    assert_eq!(
        http_get(http, Some("Bearer not-the-token-at-all")).await.0,
        401
    );
    let (code, body) = http_get(http, Some(&format!("Bearer {}", token().as_str()))).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "waiting_for_workers");
    assert_eq!(v["pipeline"], "test-pipeline.toml");
    assert_eq!(v["stage"]["name"], "pt");
    assert_eq!(v["workers"][0]["host"], "host-a:1");
    assert!(v["workers"][0]["rank"].is_null());
    // The gRPC Status carries the same document.
    let g = status(&mut client(coord.addr)).await;
    assert_eq!(g["workers"][0]["id"], v["workers"][0]["id"]);
    assert_eq!(g["state"], v["state"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_size_bound_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let coord = coordinator(
        pipeline(vec![pt_stage("pt")], 1, dir.path()),
        dir.path(),
        false,
    )
    .await;
    // A client that would send anything: the server's bound is what refuses.
    let mut c = client(coord.addr).max_encoding_message_size(64 << 20);
    let e = c
        .register(RegisterRequest {
            host: "h".repeat(rlhf_proto::auth::MAX_CONTROL_MESSAGE + 1),
            version: VERSION.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // Just under the bound is fine.
    c.register(RegisterRequest {
        host: "h".repeat(1000),
        version: VERSION.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

#[test]
fn the_coordinator_listens_on_loopback_unless_told_otherwise() {
    let addr: SocketAddr = rlhf_coordinator::DEFAULT_LISTEN.parse().unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: rlhf_coordinator::CoordinatorArgs,
    }
    let cli = Cli::try_parse_from(["coordinator", "--config", "p.toml"]).unwrap();
    assert!(cli.a.listen.ip().is_loopback(), "{:?}", cli.a.listen);
}
