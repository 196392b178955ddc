//! The real binary under signals: SIGKILL loses no acknowledged message, SIGTERM drains and
//! exits 0 with every socket closed 1001.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use confab_client::ClientError;
use confab_proto::{ClientCommand, ServerEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_sending_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let process = spawn_binary(
        dir.path(),
        &[
            ("CONFAB_MESSAGE_RATE", "100000"),
            ("CONFAB_MESSAGE_BURST", "100000"),
        ],
    );
    // Kill once enough messages have been acknowledged (a count, not a duration).
    let acks_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for i in 0..4 {
        let acks_so_far = std::sync::Arc::clone(&acks_so_far);
        let mut conn = process.user(&format!("sender{i}")).connect().await.unwrap();
        conn.join("durable", None).await.unwrap();
        senders.push(tokio::spawn(async move {
            // Pipeline sends and record every ack until the connection dies.
            let mut acked: HashMap<String, u64> = HashMap::new();
            let mut n = 0u64;
            loop {
                let client_id = format!("s{i}-{n}");
                let sent = conn
                    .send(&ClientCommand::Message {
                        reference: None,
                        room: "durable".into(),
                        content: client_id.clone(),
                        client_id: Some(client_id),
                    })
                    .await;
                if sent.is_err() {
                    break;
                }
                n += 1;
                loop {
                    match conn
                        .next_event_within(Duration::from_millis(if n.is_multiple_of(8) {
                            50
                        } else {
                            0
                        }))
                        .await
                    {
                        Ok(Some(ServerEvent::Ack { client_id, seq, .. })) => {
                            acked.insert(client_id.unwrap(), seq);
                            acks_so_far.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => return acked,
                    }
                }
            }
            acked
        }));
    }
    within(60, async {
        while acks_so_far.load(std::sync::atomic::Ordering::Relaxed) < 400 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    process.signal("KILL");
    let mut acked = HashMap::new();
    for sender in senders {
        acked.extend(within(30, sender).await.unwrap());
    }
    drop(process);
    assert!(
        acked.len() >= 400,
        "the test did send under load ({} acks)",
        acked.len()
    );

    let process = spawn_binary(dir.path(), &[]);
    let reader = process.user("reader");
    let mut stored = HashMap::new();
    let mut after = 0;
    loop {
        let page = reader
            .messages("durable", None, Some(after), Some(500))
            .await
            .unwrap();
        for message in &page.messages {
            assert_eq!(message.seq, after + 1, "seqs are gap-free after the crash");
            after = message.seq;
            stored.insert(message.client_id.clone().unwrap(), message.seq);
        }
        if !page.has_more {
            break;
        }
    }
    for (client_id, seq) in &acked {
        assert_eq!(
            stored.get(client_id),
            Some(seq),
            "acknowledged {client_id} survived with its seq"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sockets_with_1001_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = spawn_binary(dir.path(), &[]);
    let mut conns = Vec::new();
    for i in 0..5 {
        let mut conn = process.user(&format!("u{i}")).connect().await.unwrap();
        conn.join("general", None).await.unwrap();
        conns.push(conn);
    }
    // A client that stops reading must not hold the shutdown up.
    let stuck = process.user("stuck").connect().await.unwrap();
    // A message in flight right before the signal is stored.
    let (_, last_seq) = conns[0]
        .say("general", "last words", Some("last"))
        .await
        .unwrap();
    let started = Instant::now();
    process.signal("TERM");
    for conn in &mut conns {
        let (code, reason) = within(10, conn.closed()).await;
        assert_eq!(code, 1001, "{reason}");
    }
    let status = within(12, async {
        loop {
            if let Some(status) = process.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(status.success(), "exit status {status:?}");
    drop(stuck);
    assert!(started.elapsed() < Duration::from_secs(10));

    let process = spawn_binary(dir.path(), &[]);
    let history = process
        .user("u0")
        .messages("general", None, None, None)
        .await
        .unwrap();
    assert_eq!(
        history.messages.last().map(|m| (m.seq, m.content.as_str())),
        Some((last_seq, "last words"))
    );
    // After a restart clients simply reconnect.
    let mut conn = process.user("u1").connect().await.unwrap();
    let joined = conn.join("general", Some(0)).await.unwrap();
    assert_eq!(joined.messages.len(), 1);
    let refused = conn.request(ClientCommand::Ping { reference: None }).await;
    assert!(!matches!(refused, Err(ClientError::Closed { .. })));
}
