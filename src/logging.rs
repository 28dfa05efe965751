//! Log output on stderr (journald under systemd), text or JSON.
//!
//! Log lines carry strings an attacker chooses: user names (a REST user
//! name is whatever the app's backend signed), SOFTWARE, request paths.
//! Written raw, a `\n` forges a whole log line, `\r` and ESC rewrite what a
//! terminal shows, and a space-separated `client=…` inside a value frames
//! another address for a fail2ban filter. So the text format escapes every
//! control and bidirectional-formatting character, in messages and fields,
//! and quotes a field value that holds a space, `"` or `=`. The JSON format
//! is escaped by its encoder.

use std::fmt::Write as _;

/// Changes the level filter at run time (configuration reload).
pub type LogHandle = tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Installs the global subscriber: `TURNSTILE_LOG`, then `RUST_LOG`, then
/// `level` choose what is written.
pub fn init(level: &str, format: crate::config::LogFormat) -> LogHandle {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TURNSTILE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        crate::config::LogFormat::Json => {
            registry
                .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr))
                .init();
        }
        crate::config::LogFormat::Text => {
            let fields = tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
                let mut text = String::new();
                let _ = write!(text, "{value:?}");
                let mut out = String::with_capacity(text.len());
                if field.name() == "message" {
                    escape_into(&text, &mut out);
                    w.write_str(&out)
                } else if is_string_literal(&text) {
                    // A string field, already quoted and escaped by Debug:
                    // one plain word goes out bare, like any other value.
                    let inner = text.get(1..text.len() - 1).unwrap_or_default();
                    if is_plain(inner) && !inner.contains('\\') {
                        out.push_str(inner);
                    } else {
                        escape_into(&text, &mut out);
                    }
                    write!(w, "{}={out}", field.name())
                } else {
                    field_value_into(&text, &mut out);
                    write!(w, "{}={out}", field.name())
                }
            })
            .delimited(" ");
            // Colours only for a person at a terminal, never in journald or files.
            let fmt = tracing_subscriber::fmt::layer()
                .fmt_fields(fields)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr);
            registry.with(fmt).init();
        }
    }
    handle
}

/// Characters that must not reach a log line as themselves: C0 and C1
/// controls, DEL, and the Unicode bidirectional and zero-width formatting
/// characters that make a line read differently from what it holds.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Writes one unsafe character as an escape (`\n`, `\r`, `\t`, `\u{1b}`).
fn push_escape(c: char, out: &mut String) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
    }
}

/// Appends `s` with every unsafe character written as an escape.
pub fn escape_into(s: &str, out: &mut String) {
    // A backslash is doubled only where escapes were written, so that
    // ordinary text (paths, errors) stays as it is.
    let escaping = s.chars().any(is_unsafe);
    for c in s.chars() {
        match c {
            '\\' if escaping => out.push_str("\\\\"),
            c if is_unsafe(c) => push_escape(c, out),
            c => out.push(c),
        }
    }
}

/// Whether `s` is a quoted string as `Debug` writes one: every quote and
/// backslash inside is escaped, so it stays one value.
fn is_string_literal(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return false;
    };
    let mut escaped = false;
    for c in inner.chars() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return false,
            _ => {}
        }
    }
    !escaped
}

/// One word that cannot be read as anything but a single value.
fn is_plain(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '=' || is_unsafe(c))
}

/// Appends a field value: as it is when it is one plain word, else quoted
/// with `"` and `\` escaped too, so a value can never look like another field.
pub fn field_value_into(s: &str, out: &mut String) {
    if is_plain(s) {
        out.push_str(s);
        return;
    }
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if is_unsafe(c) => push_escape(c, out),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A field value as the text format writes it (for tests and filters).
pub fn field_value(s: &str) -> String {
    let mut out = String::new();
    field_value_into(s, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_a_line() {
        let mut out = String::new();
        escape_into("ok\nFAKE line\r\u{1b}[2J\u{202e}x", &mut out);
        assert_eq!(out, "ok\\nFAKE line\\r\\u{1b}[2J\\u{202e}x");
        assert!(!out.chars().any(is_unsafe));
    }

    #[test]
    fn a_field_value_cannot_pose_as_another_field() {
        assert_eq!(field_value("alice"), "alice");
        assert_eq!(field_value("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(field_value("1:x client=6.6.6.6"), "\"1:x client=6.6.6.6\"");
        assert_eq!(field_value("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(field_value(""), "\"\"");
        assert!(is_string_literal(r#""udp""#));
        assert!(is_string_literal(r#""a\"b""#));
        assert!(!is_string_literal(r#""x" client=1 "y""#));
        assert!(!is_string_literal(r#""x\""#));
    }
}
