//! The `confab` subcommands other than `serve`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

fn confab(
    args: &[&str],
    data_dir: &std::path::Path,
    stdin: Option<&str>,
) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("CONFAB_LOG", "warn")
        .env_remove("CONFAB_JWT_SECRET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_add_and_token_work_beside_a_running_server_and_not_on_its_database() {
    let dir = tempfile::tempdir().unwrap();
    // The shell commands and the server share the secret kept in the data directory.
    let (ok, out, err) = confab(&["user", "add", "alice"], dir.path(), Some("s3cret-pass\n"));
    assert!(ok, "{out}{err}");
    assert!(out.contains("created user alice"), "{out}");
    let (ok, _, _) = confab(
        &["user", "add", "alice", "--password", "another1"],
        dir.path(),
        None,
    );
    assert!(!ok, "a taken name fails");
    let (ok, out, _) = confab(
        &["token", "--user-id", "ext-42", "--name", "Ext"],
        dir.path(),
        None,
    );
    assert!(ok);
    let token = out.trim().to_string();

    let mut server = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("CONFAB_JWT_SECRET")
        .env("CONFAB_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut banner,
    )
    .unwrap();
    let base = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    // The server holds its database: a second process is refused at once, and told why.
    let (ok, _, err) = confab(
        &["user", "add", "bob", "--password", "pass-word"],
        dir.path(),
        None,
    );
    assert!(!ok);
    assert!(err.contains("is in use by another process"), "{err}");
    let client = confab_client::Client::new(&base);
    let login = client.login("alice", "s3cret-pass").await.unwrap();
    assert_eq!(login.user.name, "alice");
    let conn = client.with_token(&token).connect().await.unwrap();
    assert_eq!(
        (conn.user.id.as_str(), conn.user.name.as_str()),
        ("ext-42", "Ext")
    );
    server.kill().unwrap();
    let _ = server.wait();
}

#[test]
fn bad_configuration_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("confab.toml");
    std::fs::write(&config, "max_frame_bytes = 0\n").unwrap();
    let (ok, _, err) = confab(
        &["serve", "--config", config.to_str().unwrap()],
        dir.path(),
        None,
    );
    assert!(!ok);
    assert!(err.contains("max_frame_bytes"), "{err}");
    let _ = SECRET;
}
