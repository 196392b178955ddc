//! The two events every chat message produces, `message` and `ack`, written as JSON by hand.
//!
//! Each stored message is encoded once for its room and once for its sender's ack, and serde's
//! JSON writer inspects every byte of every string on its own to decide whether it must be
//! escaped (the largest single cost of encoding in a W2 profile). These writers check a whole
//! string at once and copy it when nothing in it needs escaping, which is what chat text
//! almost always is; otherwise serde writes that string. The output is byte for byte what
//! `serde_json` writes for the same [`ServerEvent`] (property tests hold the two equal), so
//! the derived `Serialize` stays the definition of the wire format.
//!
//! [`ServerEvent`]: crate::ServerEvent

use crate::{ChatMessage, Ref};

/// Appends the `message` event that broadcasts `message`: what `serde_json` writes for
/// `ServerEvent::Message(message)`.
pub fn write_message_event(out: &mut Vec<u8>, message: &ChatMessage) {
    out.extend_from_slice(br#"{"type":"message","id":"#);
    write_str(out, &message.id);
    out.extend_from_slice(br#","seq":"#);
    write_u64(out, message.seq);
    out.extend_from_slice(br#","room":"#);
    write_str(out, &message.room);
    out.extend_from_slice(br#","user":{"id":"#);
    write_str(out, &message.user.id);
    out.extend_from_slice(br#","name":"#);
    write_str(out, &message.user.name);
    out.extend_from_slice(br#"},"content":"#);
    write_str(out, &message.content);
    out.extend_from_slice(br#","client_id":"#);
    write_optional_str(out, message.client_id.as_deref());
    out.extend_from_slice(br#","timestamp":"#);
    write_str(out, &message.timestamp);
    out.push(b'}');
}

/// Appends the `ack` of a stored message: what `serde_json` writes for `ServerEvent::Ack`
/// with these fields, from borrowed parts so that the sender's ack copies nothing first.
pub fn write_ack_event(
    out: &mut Vec<u8>,
    reference: Option<&Ref>,
    id: &str,
    seq: u64,
    client_id: Option<&str>,
) {
    out.extend_from_slice(br#"{"type":"ack","ref":"#);
    match reference {
        Some(reference) => {
            serde_json::to_writer(&mut *out, reference).expect("a JSON value always serializes")
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","id":"#);
    write_str(out, id);
    out.extend_from_slice(br#","seq":"#);
    write_u64(out, seq);
    out.extend_from_slice(br#","client_id":"#);
    write_optional_str(out, client_id);
    out.push(b'}');
}

/// A JSON string. serde_json escapes exactly the control characters, `"` and `\`; the check
/// folds over all bytes without stopping early, so the compiler tests many bytes per step.
fn write_str(out: &mut Vec<u8>, value: &str) {
    let needs_escape = value.bytes().fold(false, |seen, byte| {
        seen | (byte < 0x20) | (byte == b'"') | (byte == b'\\')
    });
    if needs_escape {
        serde_json::to_writer(&mut *out, value).expect("a string always serializes");
        return;
    }
    out.reserve(value.len() + 2);
    out.push(b'"');
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

fn write_optional_str(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(value) => write_str(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

fn write_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ServerEvent, UserRef};
    use proptest::prelude::*;

    /// Strings that need no escaping, and strings with every kind of character serde escapes
    /// (control characters, quotes, backslashes) among multi-byte ones.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9 .:_-]{0,80}",
            ".{0,40}",
            "[a\"\\\\\u{0}-\u{1f}\u{7f}é😀]{0,40}",
        ]
    }

    fn message() -> impl Strategy<Value = ChatMessage> {
        (
            (text(), any::<u64>(), text(), text(), text()),
            (text(), proptest::option::of(text()), text()),
        )
            .prop_map(
                |((id, seq, room, user_id, user_name), (content, client_id, timestamp))| {
                    ChatMessage {
                        id,
                        seq,
                        room,
                        user: std::sync::Arc::new(UserRef {
                            id: user_id,
                            name: user_name,
                        }),
                        content,
                        client_id,
                        timestamp,
                    }
                },
            )
    }

    fn reference() -> impl Strategy<Value = Option<Ref>> {
        proptest::option::of(prop_oneof![
            any::<i64>().prop_map(Ref::from),
            any::<f64>().prop_map(Ref::from),
            text().prop_map(Ref::from),
            Just(serde_json::json!({"a": [1, "b\n", null], "c": {"d": true}})),
        ])
    }

    proptest! {
        #[test]
        fn message_events_are_what_serde_writes(message in message()) {
            let mut fast = Vec::new();
            write_message_event(&mut fast, &message);
            let serde = serde_json::to_vec(&ServerEvent::Message(message)).unwrap();
            prop_assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(serde).unwrap());
        }

        #[test]
        fn acks_are_what_serde_writes(
            reference in reference(),
            id in text(),
            seq in any::<u64>(),
            client_id in proptest::option::of(text()),
        ) {
            let mut fast = Vec::new();
            write_ack_event(&mut fast, reference.as_ref(), &id, seq, client_id.as_deref());
            let serde = serde_json::to_vec(&ServerEvent::Ack { reference, id, seq, client_id })
                .unwrap();
            prop_assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(serde).unwrap());
        }
    }

    #[test]
    fn appends_to_what_is_there() {
        let mut out = b"head".to_vec();
        write_ack_event(&mut out, None, "m", 7, Some("c\"1"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"head{"type":"ack","ref":null,"id":"m","seq":7,"client_id":"c\"1"}"#
        );
    }
}
