//! Header grammar shared by upload and download, ported from Go's `mime` package so guestd
//! reads and writes these headers exactly as envd does:
//!
//! - [`parse_media_type`]: `Content-Type` of uploads and each part's `Content-Disposition`
//!   (`mime.ParseMediaType`: quoted strings, RFC 2231 `filename*=` and continuations, MSIE's
//!   unescaped backslashes in Windows paths kept literally);
//! - [`content_disposition`]: `inline; filename=..` of downloads (`mime.FormatMediaType`:
//!   token, quoted string, or `filename*=utf-8''..` for non-ASCII);
//! - [`type_by_extension`] and [`sniff`]: the download's `Content-Type`
//!   (`mime.TypeByExtension`, then `http.DetectContentType` on the first 512 bytes).

use std::collections::HashMap;

/// Why a media type or disposition header could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum MediaTypeError {
    /// No leading `type` or `type/subtype` token.
    #[error("mime: no media type")]
    NoMediaType,
    /// Something other than a token after the type, or text after the subtype.
    #[error("mime: invalid media type '{0}'")]
    InvalidMediaType(String),
    /// A `; key=value` parameter that does not parse.
    #[error("mime: invalid media parameter")]
    InvalidParameter,
    /// The same parameter twice with different values.
    #[error("mime: duplicate parameter name '{0}'")]
    DuplicateParameter(String),
}

/// A parsed `type/subtype; k=v` (or `disposition; k=v`) header: lowercase type, parameters
/// keyed by lowercase name with RFC 2231 encodings and continuations already decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MediaType {
    pub essence: String,
    pub params: HashMap<String, String>,
}

/// Go's `mime.ParseMediaType`.
pub(crate) fn parse_media_type(value: &str) -> Result<MediaType, MediaTypeError> {
    let (base, mut rest) = value.split_at(value.find(';').unwrap_or(value.len()));
    let essence = base.trim().to_ascii_lowercase();
    check_media_type(&essence)?;

    let mut params = HashMap::new();
    // RFC 2231 pieces (`name*`, `name*0`, `name*1*`), keyed by base name.
    let mut continuation: HashMap<String, HashMap<String, String>> = HashMap::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let Some((key, value, after)) = consume_param(rest) else {
            if rest.trim() == ";" {
                break; // a trailing semicolon is tolerated
            }
            return Err(MediaTypeError::InvalidParameter);
        };
        let map = match key.split_once('*') {
            Some((base_name, _)) => continuation.entry(base_name.to_owned()).or_default(),
            None => &mut params,
        };
        if let Some(existing) = map.get(&key)
            && *existing != value
        {
            return Err(MediaTypeError::DuplicateParameter(key));
        }
        map.insert(key, value);
        rest = after;
    }
    for (key, pieces) in continuation {
        if let Some(encoded) = pieces.get(&format!("{key}*")) {
            if let Some(decoded) = decode_2231(encoded) {
                params.insert(key, decoded);
            }
            continue;
        }
        let mut joined = Vec::new();
        let mut valid = false;
        for n in 0.. {
            if let Some(plain) = pieces.get(&format!("{key}*{n}")) {
                valid = true;
                joined.extend_from_slice(plain.as_bytes());
                continue;
            }
            let Some(encoded) = pieces.get(&format!("{key}*{n}*")) else { break };
            valid = true;
            if n == 0 {
                if let Some(decoded) = decode_2231(encoded) {
                    joined.extend_from_slice(decoded.as_bytes());
                }
            } else if let Some(decoded) = percent_decode(encoded) {
                joined.extend_from_slice(&decoded);
            }
        }
        if valid {
            params.insert(key, String::from_utf8_lossy(&joined).into_owned());
        }
    }
    Ok(MediaType { essence, params })
}

fn check_media_type(essence: &str) -> Result<(), MediaTypeError> {
    let (main, rest) = consume_token(essence);
    if main.is_empty() {
        return Err(MediaTypeError::NoMediaType);
    }
    if rest.is_empty() {
        return Ok(());
    }
    let invalid = || MediaTypeError::InvalidMediaType(essence.to_owned());
    let rest = rest.strip_prefix('/').ok_or_else(invalid)?;
    let (sub, rest) = consume_token(rest);
    if sub.is_empty() || !rest.is_empty() {
        return Err(invalid());
    }
    Ok(())
}

/// `; key=value` → (lowercase key, value, rest), or `None` when it does not parse.
fn consume_param(input: &str) -> Option<(String, String, &str)> {
    let rest = input.trim_start().strip_prefix(';')?.trim_start();
    let (key, rest) = consume_token(rest);
    if key.is_empty() {
        return None;
    }
    let rest = rest.trim_start().strip_prefix('=')?.trim_start();
    let (value, after) = consume_value(rest);
    if value.is_empty() && after.len() == rest.len() {
        return None;
    }
    Some((key.to_ascii_lowercase(), value, after))
}

/// A token, or a quoted string where `\` escapes only tspecials (otherwise it is literal, as
/// MSIE sends `C:\dir\file` unescaped). Unterminated quotes or CR/LF inside yield nothing.
fn consume_value(input: &str) -> (String, &str) {
    let Some(quoted) = input.strip_prefix('"') else {
        let (token, rest) = consume_token(input);
        return (token.to_owned(), rest);
    };
    let bytes = quoted.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return (String::from_utf8_lossy(&out).into_owned(), &quoted[i + 1..]),
            b'\\' if i + 1 < bytes.len() && is_tspecial(bytes[i + 1]) => {
                out.push(bytes[i + 1]);
                i += 2;
                continue;
            }
            b'\r' | b'\n' => return (String::new(), input),
            b => out.push(b),
        }
        i += 1;
    }
    (String::new(), input)
}

fn consume_token(input: &str) -> (&str, &str) {
    let end = input.bytes().position(|b| !is_token_char(b)).unwrap_or(input.len());
    input.split_at(end)
}

fn is_tspecial(b: u8) -> bool {
    b"()<>@,;:\\\"/[]?=".contains(&b)
}

fn is_token_char(b: u8) -> bool {
    b > b' ' && b < 0x7f && !is_tspecial(b)
}

/// RFC 2231 `charset'language'pct-encoded`; only UTF-8 and US-ASCII are understood.
fn decode_2231(value: &str) -> Option<String> {
    let mut parts = value.splitn(3, '\'');
    let charset = parts.next()?.to_ascii_lowercase();
    let _language = parts.next()?;
    let encoded = parts.next()?;
    if charset != "utf-8" && charset != "us-ascii" {
        return None;
    }
    Some(String::from_utf8_lossy(&percent_decode(encoded)?).into_owned())
}

fn percent_decode(value: &str) -> Option<Vec<u8>> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// `inline; filename=<name>` as Go's `mime.FormatMediaType` writes it (RFC 6266 / RFC 2231).
pub(crate) fn content_disposition(name: &str) -> String {
    let mut out = String::from("inline; filename");
    let needs_encoding = name.chars().any(|c| !(' '..='~').contains(&c) && c != '\t');
    if needs_encoding {
        out.push_str("*=utf-8''");
        for &b in name.as_bytes() {
            if b <= b' ' || b >= 0x7f || b == b'*' || b == b'\'' || b == b'%' || is_tspecial(b) {
                out.push_str(&format!("%{b:02X}"));
            } else {
                out.push(b as char);
            }
        }
    } else if !name.is_empty() && name.bytes().all(is_token_char) {
        out.push('=');
        out.push_str(name);
    } else {
        out.push_str("=\"");
        for c in name.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out
}

/// `mime.TypeByExtension` of the path's extension; text types get `charset=utf-8` as in Go.
pub(crate) fn type_by_extension(path: &str) -> Option<String> {
    let base = path.rsplit('/').next().unwrap_or(path);
    let ext = base.rfind('.').map(|dot| &base[dot + 1..]).filter(|e| !e.is_empty())?;
    let mime = mime_guess::from_ext(ext).first_raw()?;
    Some(if mime.starts_with("text/") { format!("{mime}; charset=utf-8") } else { mime.to_owned() })
}

/// How many leading bytes [`sniff`] looks at (Go's `sniffLen`).
pub(crate) const SNIFF_LEN: usize = 512;

/// The signatures of Go's `http.DetectContentType` that matter for files in a sandbox, then
/// its text/binary rule. Unknown binary data is `application/octet-stream`.
pub(crate) fn sniff(data: &[u8]) -> &'static str {
    let data = &data[..data.len().min(SNIFF_LEN)];
    const EXACT: &[(&[u8], &str)] = &[
        (b"\xFE\xFF", "text/plain; charset=utf-16be"),
        (b"\xFF\xFE", "text/plain; charset=utf-16le"),
        (b"\xEF\xBB\xBF", "text/plain; charset=utf-8"),
        (b"%PDF-", "application/pdf"),
        (b"%!PS-Adobe-", "application/postscript"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"\x89PNG\x0D\x0A\x1A\x0A", "image/png"),
        (b"\xFF\xD8\xFF", "image/jpeg"),
        (b"BM", "image/bmp"),
        (b"\x00\x00\x01\x00", "image/x-icon"),
        (b"OggS\x00", "application/ogg"),
        (b"ID3", "audio/mpeg"),
        (b"\x1A\x45\xDF\xA3", "video/webm"),
        (b"PK\x03\x04", "application/zip"),
        (b"\x1F\x8B\x08", "application/x-gzip"),
        (b"Rar!\x1A\x07\x00", "application/x-rar-compressed"),
        (b"Rar!\x1A\x07\x01\x00", "application/x-rar-compressed"),
        (b"\x00asm", "application/wasm"),
    ];
    let trimmed = {
        let start = data.iter().position(|b| !b"\t\n\x0C\r ".contains(b)).unwrap_or(data.len());
        &data[start..]
    };
    const HTML: &[&[u8]] = &[
        b"<!DOCTYPE HTML",
        b"<HTML",
        b"<HEAD",
        b"<SCRIPT",
        b"<IFRAME",
        b"<H1",
        b"<DIV",
        b"<FONT",
        b"<TABLE",
        b"<A",
        b"<STYLE",
        b"<TITLE",
        b"<B",
        b"<BODY",
        b"<BR",
        b"<P",
        b"<!--",
    ];
    for sig in HTML {
        if trimmed.len() > sig.len()
            && trimmed[..sig.len()].eq_ignore_ascii_case(sig)
            && (trimmed[sig.len()] == b' ' || trimmed[sig.len()] == b'>')
        {
            return "text/html; charset=utf-8";
        }
    }
    if trimmed.starts_with(b"<?xml") {
        return "text/xml; charset=utf-8";
    }
    for (sig, mime) in EXACT {
        if data.starts_with(sig) {
            return mime;
        }
    }
    if data.len() >= 14 && &data[..4] == b"RIFF" && &data[8..14] == b"WEBPVP" {
        return "image/webp";
    }
    let binary = |b: &u8| matches!(b, 0x00..=0x08 | 0x0B | 0x0E..=0x1A | 0x1C..=0x1F);
    if data.iter().any(binary) { "application/octet-stream" } else { "text/plain; charset=utf-8" }
}

/// Whether `head` starts like a format that is already compressed (archives, images, audio,
/// video). gzip cannot shrink these; downloads send them as identity when the client allows.
pub(crate) fn already_compressed(head: &[u8]) -> bool {
    const MAGIC: &[&[u8]] = &[
        b"\xFD7zXZ\x00",       // xz
        b"\x28\xB5\x2F\xFD",   // zstd
        b"BZh",                // bzip2
        b"7z\xBC\xAF\x27\x1C", // 7-zip
        b"\x04\x22\x4D\x18",   // lz4 frame
    ];
    let sniffed = sniff(head);
    sniffed.starts_with("image/") && sniffed != "image/bmp" && sniffed != "image/x-icon"
        || sniffed.starts_with("video/")
        || sniffed.starts_with("audio/")
        || matches!(
            sniffed,
            "application/zip" | "application/x-gzip" | "application/x-rar-compressed" | "application/ogg"
        )
        || MAGIC.iter().any(|magic| head.starts_with(magic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: &str) -> HashMap<String, String> {
        parse_media_type(v).unwrap().params
    }

    #[test]
    fn parses_media_types_like_go() {
        let m = parse_media_type("Multipart/Form-Data; boundary=\"abc def\"").unwrap();
        assert_eq!(m.essence, "multipart/form-data");
        assert_eq!(m.params["boundary"], "abc def");
        assert_eq!(parse_media_type("application/octet-stream;").unwrap().essence, "application/octet-stream");
        assert_eq!(parse_media_type(""), Err(MediaTypeError::NoMediaType));
        assert!(matches!(parse_media_type("a/b/c"), Err(MediaTypeError::InvalidMediaType(_))));
        assert_eq!(parse_media_type("text/plain; x"), Err(MediaTypeError::InvalidParameter));
        assert!(matches!(parse_media_type("a/b; k=1; k=2"), Err(MediaTypeError::DuplicateParameter(_))));
        assert!(parse_media_type("a/b; k=1; k=1").is_ok(), "equal duplicates are allowed");
    }

    #[test]
    fn disposition_filenames_keep_directories_and_decode_rfc2231() {
        let p = params(r#"form-data; name="file"; filename="dir/sub/a.txt""#);
        assert_eq!(p["name"], "file");
        assert_eq!(p["filename"], "dir/sub/a.txt");
        assert_eq!(params(r#"form-data; filename="a \"q\".txt""#)["filename"], r#"a "q".txt"#);
        assert_eq!(params(r#"form-data; filename="C:\dir\f.txt""#)["filename"], r"C:\dir\f.txt");
        assert_eq!(params(r#"form-data; filename="%22x%22""#)["filename"], "%22x%22", "no percent decoding");
        assert_eq!(params("form-data; filename*=UTF-8''%E6%97%A5.txt")["filename"], "\u{65e5}.txt");
        assert_eq!(params("form-data; filename*0=\"a/\"; filename*1=\"b.txt\"")["filename"], "a/b.txt");
        assert_eq!(params("form-data; filename=\"caf\u{e9}.txt\"")["filename"], "caf\u{e9}.txt");
        assert!(!params("form-data; name=file").contains_key("filename"));
    }

    #[test]
    fn formats_content_disposition_like_go() {
        assert_eq!(content_disposition("a.txt"), "inline; filename=a.txt");
        assert_eq!(content_disposition("my file.txt"), "inline; filename=\"my file.txt\"");
        assert_eq!(content_disposition("q\"b\\.txt"), "inline; filename=\"q\\\"b\\\\.txt\"");
        assert_eq!(content_disposition("\u{65e5}\u{672c}.txt"), "inline; filename*=utf-8''%E6%97%A5%E6%9C%AC.txt");
        assert_eq!(content_disposition("a b\u{e9}"), "inline; filename*=utf-8''a%20b%C3%A9");
    }

    #[test]
    fn content_types() {
        assert_eq!(type_by_extension("/a/b.txt").as_deref(), Some("text/plain; charset=utf-8"));
        assert_eq!(type_by_extension("x.PNG").as_deref(), Some("image/png"));
        assert_eq!(type_by_extension("/a.d/noext"), None);
        assert_eq!(type_by_extension("trailing."), None);
        assert_eq!(sniff(b"hello\nworld"), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"\x7fELF\x02\x01\x01\x00"), "application/octet-stream");
        assert_eq!(sniff(b"  <html><body>"), "text/html; charset=utf-8");
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), "image/png");
        assert_eq!(sniff(b""), "text/plain; charset=utf-8");
    }

    #[test]
    fn compressed_formats_are_recognised() {
        assert!(already_compressed(b"\x1F\x8B\x08\x00rest"));
        assert!(already_compressed(b"PK\x03\x04rest"));
        assert!(already_compressed(b"\x89PNG\r\n\x1a\nrest"));
        assert!(already_compressed(b"\x28\xB5\x2F\xFDrest"));
        assert!(!already_compressed(b"plain text"));
        assert!(!already_compressed(b"BM bitmap"));
        assert!(!already_compressed(b"\x7fELF\x02"));
    }
}
