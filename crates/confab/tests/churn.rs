//! Many clients joining, dropping and resuming while messages flow: every client ends up with
//! every message exactly once and in order, and every acknowledged message is in the history.

mod common;

use std::time::{Duration, Instant};

use common::*;
use confab_proto::ServerEvent;

/// Keeps a client's view of the room: the seqs it has seen, in order.
struct View {
    seen: Vec<u64>,
}

impl View {
    /// Every message must be the next one: no gap, no repeat, across reconnects too.
    fn take(&mut self, seq: u64) {
        let last = self.last();
        assert_eq!(seq, last + 1, "after {last} came {seq}");
        self.seen.push(seq);
    }

    fn last(&self) -> u64 {
        self.seen.last().copied().unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_drop_and_resume_miss_nothing() {
    let server = std::sync::Arc::new(
        TestServer::start_with(|c| {
            c.message_rate = 1_000;
            c.message_burst = 1_000;
            // Every catch-up fits in one page, so catch-up and live stream never overlap.
            c.max_history_page = 10_000;
        })
        .await,
    );
    // Readers churn until the senders are done: counts, not timings, decide what is checked.
    let senders_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    const PER_SENDER: u64 = 250;

    let mut senders = Vec::new();
    for i in 0..2 {
        let server = std::sync::Arc::clone(&server);
        senders.push(tokio::spawn(async move {
            let mut conn = server.connect(&format!("sender{i}")).await;
            conn.join("churn", None).await.unwrap();
            for n in 0..PER_SENDER {
                conn.say("churn", &format!("{i}-{n}"), None).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }

    let mut readers = Vec::new();
    for i in 0..12u64 {
        let server = std::sync::Arc::clone(&server);
        let senders_done = std::sync::Arc::clone(&senders_done);
        readers.push(tokio::spawn(async move {
            let mut view = View { seen: Vec::new() };
            let mut round = 0u64;
            while !senders_done.load(std::sync::atomic::Ordering::Relaxed) {
                let mut conn = server.connect(&format!("reader{i}")).await;
                for message in conn.catch_up("churn", view.last()).await.unwrap() {
                    view.take(message.seq);
                }
                // Read live for a while, then vanish without a goodbye (or leave politely).
                let until =
                    Instant::now() + Duration::from_millis(50 + (i * 37 + round * 91) % 300);
                while Instant::now() < until {
                    let event = conn.next_event_within(Duration::from_millis(20)).await;
                    if let Some(ServerEvent::Message(m)) = event.unwrap() {
                        view.take(m.seq);
                    }
                }
                if round.is_multiple_of(3) {
                    conn.leave("churn").await.unwrap();
                }
                conn.abort();
                round += 1;
            }
            view
        }));
    }

    for sender in senders {
        sender.await.unwrap();
    }
    senders_done.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = 2 * PER_SENDER;
    for reader in readers {
        let mut view = reader.await.unwrap();
        // A final resume brings every reader to the end, with nothing missing or repeated.
        let mut conn = server.connect("late-check").await;
        for message in conn.catch_up("churn", view.last()).await.unwrap() {
            view.take(message.seq);
        }
        assert_eq!(view.seen, (1..=total).collect::<Vec<_>>());
    }
}
