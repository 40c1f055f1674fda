use std::cell::RefCell;
use std::future::poll_fn;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionStats, Endpoint, EndpointConfig, TokioRuntime};
use rustls_pki_types::PrivatePkcs8KeyDer;

use super::*;

const PORT: u16 = 4433;
const ALPN: &[u8] = b"sim-test";
const MAX: usize = DEFAULT_MAX_DATAGRAM;

fn any(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

fn transmit(destination: SocketAddr, contents: &[u8]) -> Transmit<'_> {
    Transmit {
        destination,
        ecn: None,
        contents,
        segment_size: None,
        src_ip: None,
    }
}

/// Receives one batch (up to `bufs.len()` datagrams).
async fn recv_batch(
    socket: &SimUdpSocket,
    bufs: &mut [Vec<u8>],
) -> io::Result<Vec<(Vec<u8>, SocketAddr)>> {
    poll_fn(|cx| {
        let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); slices.len()];
        let n = ready!(socket.poll_recv(cx, &mut slices, &mut meta))?;
        Poll::Ready(Ok(meta[..n]
            .iter()
            .zip(slices.iter())
            .map(|(m, b)| (b[..m.len].to_vec(), m.addr))
            .collect()))
    })
    .await
}

/// Datagrams cross between hosts through the quinn-facing API; oversized and unroutable
/// datagrams are dropped with `Ok`, counted, and never delivered; a transmit with a segment
/// size arrives as separate datagrams, received in one batch.
#[test]
fn datagrams_cross_and_unsendable_ones_are_dropped_as_lost() {
    // Fixed latency: turmoil's default jitter would reorder the segments.
    let mut sim = turmoil::Builder::new()
        .rng_seed(1)
        .min_message_latency(Duration::from_millis(2))
        .max_message_latency(Duration::from_millis(2))
        .build();
    sim.host("b", || async {
        let socket = SimUdpSocket::bind(any(9000)).await?;
        let mut bufs = vec![vec![0u8; 2048]; 4];
        loop {
            for (datagram, from) in recv_batch(&socket, &mut bufs).await? {
                socket.try_send(&transmit(from, &datagram))?;
            }
        }
    });
    let seen = Rc::new(RefCell::new(None));
    let out = Rc::clone(&seen);
    sim.client("a", async move {
        let socket = SimUdpSocket::bind(any(0))
            .await?
            .with_max_datagram_size(100);
        let b = SocketAddr::new(turmoil::lookup("b"), 9000);
        socket.try_send(&transmit(b, &[7u8; 101]))?;
        socket.try_send(&transmit(SocketAddr::from(([10, 9, 9, 9], 1)), b"lost"))?;
        socket.try_send(&transmit(b, b"hello"))?;
        let mut bufs = vec![vec![0u8; 2048]; 4];
        let first = recv_batch(&socket, &mut bufs).await?;
        // Three 3-byte segments in one transmit.
        socket.try_send(&Transmit {
            segment_size: Some(3),
            ..transmit(b, b"onetwothr")
        })?;
        let mut segments = Vec::new();
        while segments.len() < 3 {
            segments.extend(recv_batch(&socket, &mut bufs).await?);
        }
        *out.borrow_mut() = Some((first, segments, socket.stats()));
        Ok(())
    });
    sim.run().expect("simulation");
    let (first, segments, stats) = seen.take().expect("client finished");
    let b = SocketAddr::new(Ipv4Addr::new(192, 168, 0, 1).into(), 9000);
    assert_eq!(first, vec![(b"hello".to_vec(), b)]);
    let segments: Vec<Vec<u8>> = segments.into_iter().map(|(d, _)| d).collect();
    assert_eq!(
        segments,
        vec![b"one".to_vec(), b"two".to_vec(), b"thr".to_vec()]
    );
    assert_eq!(
        stats,
        SimUdpStats {
            sent: 4,
            received: 4,
            dropped_oversize: 1,
            dropped_unroutable: 1,
        }
    );
}

/// A self-signed Ed25519 certificate from a fixed key, and quinn configurations around it
/// with fixed token and reset keys (the defaults draw from the thread RNG).
fn quic_configs() -> (quinn::ServerConfig, quinn::ClientConfig) {
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&[42u8; 32]);
    let key = rcgen::KeyPair::try_from(pkcs8.as_slice()).expect("an Ed25519 PKCS#8 key");
    let cert = rcgen::CertificateParams::new(vec!["server".to_owned()])
        .expect("certificate parameters")
        .self_signed(&key)
        .expect("a self-signed certificate");
    let cert = cert.der().clone();
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .expect("server certificate");
    server.alpn_protocols = vec![ALPN.to_vec()];

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root certificate");
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];

    let token_key = Arc::new(ring::hkdf::Prk::new_less_safe(
        ring::hkdf::HKDF_SHA256,
        &[7u8; 32],
    ));
    let server = quinn::ServerConfig::new(
        Arc::new(QuicServerConfig::try_from(server).expect("QUIC server TLS")),
        token_key,
    );
    let client = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client).expect("QUIC client TLS"),
    ));
    (server, client)
}

fn endpoint_config(seed: u8) -> EndpointConfig {
    let reset_key = Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[seed; 64]));
    let mut config = EndpointConfig::new(reset_key);
    config.rng_seed(Some([seed; 32]));
    config
}

/// A QUIC server that echoes every bidirectional stream.
fn echo_server(sim: &mut turmoil::Sim<'_>, config: quinn::ServerConfig, max_datagram: usize) {
    sim.host("server", move || {
        let config = config.clone();
        async move {
            let socket = Arc::new(
                SimUdpSocket::bind(any(PORT))
                    .await?
                    .with_max_datagram_size(max_datagram),
            );
            let endpoint = Endpoint::new_with_abstract_socket(
                endpoint_config(1),
                Some(config),
                socket,
                Arc::new(TokioRuntime),
            )?;
            while let Some(incoming) = endpoint.accept().await {
                let connection = incoming.await?;
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    let data = recv.read_to_end(1 << 20).await?;
                    send.write_all(&data).await?;
                    send.finish()?;
                }
            }
            Ok(())
        }
    });
}

struct EchoRun {
    echoed: Vec<u8>,
    stats: ConnectionStats,
    socket: SimUdpStats,
    elapsed: Duration,
}

/// A client that connects to the echo server, sends `payload` on one stream and reads it back.
fn echo_client(
    sim: &mut turmoil::Sim<'_>,
    config: quinn::ClientConfig,
    payload: Vec<u8>,
    max_datagram: usize,
) -> Rc<RefCell<Option<EchoRun>>> {
    let result = Rc::new(RefCell::new(None));
    let out = Rc::clone(&result);
    sim.client("client", async move {
        let socket = Arc::new(
            SimUdpSocket::bind(any(0))
                .await?
                .with_max_datagram_size(max_datagram),
        );
        let mut endpoint = Endpoint::new_with_abstract_socket(
            endpoint_config(2),
            None,
            Arc::clone(&socket) as Arc<dyn AsyncUdpSocket>,
            Arc::new(TokioRuntime),
        )?;
        endpoint.set_default_client_config(config);
        let server = SocketAddr::new(turmoil::lookup("server"), PORT);
        let connection = endpoint.connect(server, "server")?.await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&payload).await?;
        send.finish()?;
        let echoed = recv.read_to_end(1 << 20).await?;
        *out.borrow_mut() = Some(EchoRun {
            echoed,
            stats: connection.stats(),
            socket: socket.stats(),
            elapsed: turmoil::elapsed(),
        });
        connection.close(0u32.into(), b"done");
        Ok(())
    });
    result
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Two hosts, each with a quinn endpoint over [`SimUdpSocket`]: the client connects (TLS 1.3,
/// Ed25519), sends 64 KiB on a bidirectional stream, and the server echoes it back intact.
#[test]
fn quic_echo_over_simulated_udp() {
    let (server, client) = quic_configs();
    let mut sim = turmoil::Builder::new()
        .rng_seed(3)
        .min_message_latency(Duration::from_millis(5))
        .max_message_latency(Duration::from_millis(5))
        .build();
    echo_server(&mut sim, server, MAX);
    let data = payload(64 * 1024);
    let run = echo_client(&mut sim, client, data.clone(), MAX);
    sim.run().expect("simulation");
    let run = run.take().expect("client finished");
    assert_eq!(run.echoed, data);
    assert_eq!(run.stats.path.lost_packets, 0);
    assert_eq!(run.socket.dropped_oversize, 0);
    assert!(
        run.elapsed < Duration::from_secs(1),
        "took {:?}",
        run.elapsed
    );
}

/// With turmoil dropping messages at random (and jittering latency, which reorders), the
/// echo still completes intact: quinn detects the losses and retransmits.
#[test]
fn quic_echo_survives_message_loss() {
    let (server, client) = quic_configs();
    let mut sim = turmoil::Builder::new()
        .rng_seed(5)
        .fail_rate(0.05)
        .simulation_duration(Duration::from_secs(120))
        .build();
    echo_server(&mut sim, server, MAX);
    let data = payload(32 * 1024);
    let run = echo_client(&mut sim, client, data.clone(), MAX);
    sim.run().expect("simulation");
    let run = run.take().expect("client finished");
    assert_eq!(run.echoed, data);
    assert!(
        run.stats.path.lost_packets > 0,
        "no loss was simulated: {:?}",
        run.stats.path
    );
}

/// Path MTU discovery stops at the socket's maximum datagram size (here 1300 bytes, below
/// quinn's 1452-byte discovery ceiling): larger probes are dropped like lost packets, and the
/// connection carries on at the smaller MTU.
#[test]
fn mtu_discovery_is_bounded_by_the_maximum_datagram() {
    let (server, client) = quic_configs();
    let mut sim = turmoil::Builder::new()
        .rng_seed(9)
        .min_message_latency(Duration::from_millis(5))
        .max_message_latency(Duration::from_millis(5))
        .build();
    echo_server(&mut sim, server, 1300);
    let data = payload(256 * 1024);
    let run = echo_client(&mut sim, client, data.clone(), 1300);
    sim.run().expect("simulation");
    let run = run.take().expect("client finished");
    assert_eq!(run.echoed, data);
    assert!(run.socket.dropped_oversize > 0, "{:?}", run.socket);
    assert!(
        (1200..=1300).contains(&run.stats.path.current_mtu),
        "{:?}",
        run.stats.path
    );
}

/// Two runs with the same seeds replay exactly, down to the packet counts and the simulated
/// time taken, loss and retransmissions included: nothing in the socket or in quinn's
/// configured randomness escapes the seeds (rustls still draws its handshake randomness from
/// the OS, but that changes bytes, not sizes or timing).
#[test]
fn quic_runs_replay_exactly_with_the_same_seed() {
    let run = |seed: u64| {
        let (server, client) = quic_configs();
        let mut sim = turmoil::Builder::new()
            .rng_seed(seed)
            .fail_rate(0.05)
            .simulation_duration(Duration::from_secs(120))
            .build();
        echo_server(&mut sim, server, MAX);
        let run = echo_client(&mut sim, client, payload(32 * 1024), MAX);
        sim.run().expect("simulation");
        let run = run.take().expect("client finished");
        let path = run.stats.path;
        (
            run.elapsed,
            run.socket,
            path.sent_packets,
            path.lost_packets,
            path.rtt,
            path.cwnd,
        )
    };
    let first = run(21);
    assert_eq!(first, run(21));
    assert_ne!(first, run(22), "a different seed should change the run");
}

/// turmoil's per-socket receive queue holds `udp_capacity` datagrams (64 by default); a burst
/// larger than that, arriving while the receiver is not reading, loses the rest silently.
#[test]
fn a_full_receive_queue_drops_datagrams_silently() {
    let mut sim = turmoil::Builder::new()
        .rng_seed(1)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(1))
        .build();
    sim.host("b", || async {
        let socket = SimUdpSocket::bind(any(9000)).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut bufs = vec![vec![0u8; 64]; 8];
        let mut received = 0u32;
        while let Ok(batch) =
            tokio::time::timeout(Duration::from_millis(50), recv_batch(&socket, &mut bufs)).await
        {
            received += u32::try_from(batch?.len())?;
        }
        let a = SocketAddr::new(turmoil::lookup("a"), 9001);
        socket.try_send(&transmit(a, &received.to_le_bytes()))?;
        Ok(())
    });
    sim.client("a", async {
        let socket = SimUdpSocket::bind(any(9001)).await?;
        let b = SocketAddr::new(turmoil::lookup("b"), 9000);
        for i in 0..100u8 {
            socket.try_send(&transmit(b, &[i]))?;
        }
        let mut bufs = vec![vec![0u8; 64]; 1];
        let reply = recv_batch(&socket, &mut bufs).await?;
        let count = u32::from_le_bytes(reply[0].0[..4].try_into()?);
        assert_eq!(count, 64);
        assert_eq!(socket.stats().sent, 100);
        Ok(())
    });
    sim.run().expect("simulation");
}

/// With duplication on, a datagram arrives twice; off, once; the same seed repeats the same
/// choices.
#[test]
fn duplication_repeats_datagrams() {
    let all = Arc::new(Duplication::new(7));
    all.set_rate(1.0);
    let mut sim = turmoil::Builder::new()
        .rng_seed(1)
        .min_message_latency(Duration::from_millis(2))
        .max_message_latency(Duration::from_millis(2))
        .build();
    sim.host("b", || async {
        let socket = SimUdpSocket::bind(any(9000)).await?;
        let mut bufs = vec![vec![0u8; 2048]; 8];
        let mut got = Vec::new();
        while got.len() < 3 {
            for (datagram, _) in recv_batch(&socket, &mut bufs).await? {
                got.push(datagram);
            }
        }
        assert_eq!(got, vec![b"one".to_vec(), b"one".to_vec(), b"two".to_vec()]);
        Ok(())
    });
    let knob = Arc::clone(&all);
    sim.client("a", async move {
        let socket = SimUdpSocket::bind(any(0))
            .await?
            .with_duplication(Arc::clone(&knob));
        let b = SocketAddr::new(turmoil::lookup("b"), 9000);
        socket.try_send(&transmit(b, b"one"))?;
        knob.set_rate(0.0);
        socket.try_send(&transmit(b, b"two"))?;
        assert_eq!(socket.stats().sent, 3);
        Ok(())
    });
    sim.run().expect("runs");

    let (a, b) = (Duplication::new(3), Duplication::new(3));
    a.set_rate(0.3);
    b.set_rate(0.3);
    let rolls = |d: &Duplication| (0..100).map(|_| d.roll()).collect::<Vec<_>>();
    let first = rolls(&a);
    assert_eq!(first, rolls(&b));
    let hits = first.iter().filter(|r| **r).count();
    assert!((15..=45).contains(&hits), "about 30% repeat: {hits}");
}
