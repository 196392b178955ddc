//! The JSON of a chat message's hot path, by hand: the `message` command read, and the two
//! events every message produces, `message` and `ack`, written.
//!
//! Reading: serde reads an internally tagged enum such as [`ClientCommand`] by first copying
//! the whole object into a tree of its own, and even a plain struct goes through a visitor per
//! field (together about a tenth of the server's own instructions per message in a W2
//! profile). [`read_message_command`] scans the object once and copies each string straight
//! into its field, and gives up (`None`) on anything it does not expect, which the general
//! path then parses and explains. Whenever it answers, it answers what serde would (a property
//! test in the crate root holds it to that).
//!
//! Writing: each stored message is encoded once for its room and once for its sender's ack,
//! and serde's JSON writer inspects every byte of every string on its own to decide whether it
//! must be escaped (the largest single cost of encoding in a W2 profile). These writers check
//! a whole string at once and copy it when nothing in it needs escaping, which is what chat
//! text almost always is; otherwise serde writes that string. The output is byte for byte what
//! `serde_json` writes for the same [`ServerEvent`] (property tests hold the two equal), so
//! the derived `Serialize` stays the definition of the wire format.
//!
//! [`ClientCommand`]: crate::ClientCommand
//! [`ServerEvent`]: crate::ServerEvent

use crate::{ChatMessage, ClientCommand, Ref};

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

/// A `message` command (`{"type":"message","room":…,"content":…}` with an optional `ref`
/// and `client_id`, in any order), read in one pass; `None` for anything else or anything
/// unusual in one: a string with an escape, a `ref` that is not a string, an integer or
/// null, a field twice, an unknown field whose value is an object or an array.
pub(crate) fn read_message_command(text: &str) -> Option<ClientCommand> {
    let mut reader = Reader { text, at: 0 };
    let mut is_message = false;
    let mut reference = None;
    let mut room = None;
    let mut content = None;
    let mut client_id = None;
    // The fields seen, one bit each, to refuse repeats as serde does.
    let mut seen = 0u8;
    reader.expect(b'{')?;
    if reader.peek()? == b'}' {
        return None;
    }
    loop {
        let key = reader.key()?;
        reader.expect(b':')?;
        let bit = match key {
            "type" => {
                is_message = reader.plain_str()? == "message";
                1
            }
            "ref" => {
                reference = reader.reference()?;
                2
            }
            "room" => {
                room = Some(reader.plain_str()?);
                4
            }
            "content" => {
                content = Some(reader.plain_str()?);
                8
            }
            "client_id" => {
                client_id = reader.optional_str()?;
                16
            }
            _ => {
                reader.skip_scalar()?;
                0
            }
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        match reader.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    if !is_message || reader.peek().is_some() {
        return None;
    }
    Some(ClientCommand::Message {
        reference,
        room: room?.to_owned(),
        content: content?.to_owned(),
        client_id: client_id.map(str::to_owned),
    })
}

/// A cursor over a JSON text that skips whitespace before every token.
struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    /// The next token's first byte, left in place (`None` at the end).
    fn peek(&mut self) -> Option<u8> {
        while let Some(&byte) = self.text.as_bytes().get(self.at) {
            if !matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(byte);
            }
            self.at += 1;
        }
        None
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn expect(&mut self, wanted: u8) -> Option<()> {
        (self.next()? == wanted).then_some(())
    }

    /// A field's name: one of the command's read by comparing the bytes in place (they are
    /// short, and most of what a command holds), any other as a plain string.
    fn key(&mut self) -> Option<&'a str> {
        self.peek()?;
        let rest = &self.text.as_bytes()[self.at..];
        for key in [
            "\"type\"",
            "\"ref\"",
            "\"room\"",
            "\"content\"",
            "\"client_id\"",
        ] {
            if rest.starts_with(key.as_bytes()) {
                self.at += key.len();
                return Some(&key[1..key.len() - 1]);
            }
        }
        self.plain_str()
    }

    /// A string without escapes or control characters (both rare in what clients send, and
    /// left to serde), borrowed from the text.
    fn plain_str(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        let end = start + memchr::memchr(b'"', &self.text.as_bytes()[start..])?;
        // Like `write_str`'s check: over every byte, so the compiler tests many per step.
        let unusual = self.text.as_bytes()[start..end]
            .iter()
            .fold(false, |seen, &byte| seen | (byte == b'\\') | (byte < 0x20));
        if unusual {
            return None;
        }
        self.at = end + 1;
        // Cut at two ASCII quotes, so on character boundaries.
        self.text.get(start..end)
    }

    /// A plain string or `null`.
    fn optional_str(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? == b'n' {
            self.literal("null")?;
            return Some(None);
        }
        self.plain_str().map(Some)
    }

    /// A `ref`: a plain string, an integer that fits in 64 bits, or `null` (for none, as
    /// serde reads `Option<Value>`).
    fn reference(&mut self) -> Option<Option<Ref>> {
        match self.peek()? {
            b'"' => Some(Some(Ref::from(self.plain_str()?))),
            b'n' => self.literal("null").map(|()| None),
            _ => self.integer().map(Some),
        }
    }

    /// `-?(0|[1-9][0-9]*)` not followed by a fraction or an exponent, as the same JSON
    /// number serde reads: unsigned unless negative, and a float (left to serde) past 64 bits
    /// or for `-0`.
    fn integer(&mut self) -> Option<Ref> {
        let negative = self.peek()? == b'-';
        let bytes = self.text.as_bytes();
        let start = self.at + usize::from(negative);
        let digits = bytes[start..]
            .iter()
            .take_while(|byte| byte.is_ascii_digit())
            .count();
        let end = start + digits;
        if digits == 0
            || (digits > 1 && bytes[start] == b'0')
            || matches!(bytes.get(end), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        let magnitude = bytes[start..end].iter().try_fold(0u64, |value, digit| {
            value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
        })?;
        let value = if negative {
            Ref::from(
                i64::try_from(-i128::from(magnitude))
                    .ok()
                    .filter(|&n| n != 0)?,
            )
        } else {
            Ref::from(magnitude)
        };
        self.at = end;
        Some(value)
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        self.peek()?;
        let end = self.at + word.len();
        (self.text.as_bytes().get(self.at..end)? == word.as_bytes()).then(|| self.at = end)
    }

    /// The value of a field the command does not have, when it is a plain string, an integer,
    /// `true`, `false` or `null` (serde ignores such fields; anything else is left to it).
    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.plain_str().map(drop),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            _ => self.integer().map(drop),
        }
    }
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
