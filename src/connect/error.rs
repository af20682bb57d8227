//! Status codes and errors on the Connect wire.
//!
//! This file is the single table that maps RPC status codes to Connect code names and HTTP
//! statuses (the Connect protocol's "Error Codes" table). Domain errors become
//! `tonic::Status` in the RPC handlers; everything the Connect layer sees afterwards is a gRPC
//! status number, translated here.

use std::collections::BTreeMap;

use base64::Engine as _;
use http::{HeaderMap, StatusCode};
use serde::Serialize;

/// A Connect/gRPC status code other than OK.
///
/// The discriminants are the gRPC numbers, so `grpc-status` maps directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Canceled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// The code for a `grpc-status` number; `None` for 0 (OK). Numbers outside the table are
    /// `unknown`, as the gRPC spec requires.
    pub fn from_grpc(n: i32) -> Option<Code> {
        Some(match n {
            0 => return None,
            1 => Code::Canceled,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            6 => Code::AlreadyExists,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            9 => Code::FailedPrecondition,
            10 => Code::Aborted,
            11 => Code::OutOfRange,
            12 => Code::Unimplemented,
            13 => Code::Internal,
            14 => Code::Unavailable,
            15 => Code::DataLoss,
            16 => Code::Unauthenticated,
            _ => Code::Unknown,
        })
    }

    /// The Connect name (`"not_found"`), used in JSON error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a Connect unary error with this code.
    pub fn http_status(self) -> StatusCode {
        let n = match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        };
        StatusCode::from_u16(n).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The same code as a `tonic::Code`, for errors handed to tonic handlers.
    pub fn to_tonic(self) -> tonic::Code {
        tonic::Code::from_i32(self as i32)
    }
}

/// Protocol violations the Connect layer itself detects. The `Display` text (plus the source,
/// when there is one) is the message the client sees; [`ConnectProtocolError::code`] is the
/// Connect code it gets.
#[derive(Debug, thiserror::Error)]
pub enum ConnectProtocolError {
    /// protocol error: incomplete envelope: stream ended inside a message
    #[error("protocol error: incomplete envelope: stream ended inside a message")]
    IncompleteEnvelope,
    /// message size exceeds the server's limit
    #[error("message size {size} is larger than configured max {max}")]
    MessageTooLarge { size: u64, max: usize },
    /// request body exceeds the server's limit
    #[error("request body is larger than configured max {max}")]
    BodyTooLarge { max: usize },
    /// a compressed message inflates past the server's limit
    #[error("decompressed message is larger than configured max {max}")]
    DecompressedTooLarge { max: usize },
    /// a method taking one request message got zero or several (connect-go: `unimplemented`)
    #[error("unary request has {0} messages")]
    RequestCardinality(&'static str),
    /// request envelope with end-stream or unknown flags
    #[error("protocol error: invalid envelope flags {0:#04x} in a request")]
    InvalidRequestFlags(u8),
    /// compressed envelope without a negotiated compression
    #[error("protocol error: sent compressed message without compression support")]
    UnexpectedCompression,
    /// unsupported request compression
    #[error("unknown compression {0:?}: supported encodings are gzip, identity")]
    UnsupportedCompression(String),
    /// gzip stream could not be decompressed
    #[error("decompress gzip message")]
    Decompress(#[source] std::io::Error),
    /// the unary JSON body was empty
    #[error("zero-length payload is not a valid JSON object")]
    EmptyJson,
    /// the payload holds more values (JSON) or fields (proto) than the server decodes in one
    /// message
    #[error("message has more than {max} values")]
    TooManyValues { max: usize },
    /// the JSON payload does not parse as the method's input message
    #[error("unmarshal JSON into {message}")]
    InvalidJson {
        message: String,
        #[source]
        source: serde_json::Error,
    },
    /// the binary payload does not parse as the method's input message
    #[error("unmarshal protobuf into {message}")]
    InvalidProto {
        message: String,
        #[source]
        source: prost::DecodeError,
    },
    /// the `Connect-Timeout-Ms` header is not 1 to 10 ASCII digits
    #[error("protocol error: invalid connect-timeout-ms {0:?}")]
    InvalidTimeout(String),
    /// reading the request body failed
    #[error("read request body")]
    ReadBody(#[source] axum::Error),
    /// the procedure does not exist in a service this server knows
    #[error("{0} is not implemented")]
    UnknownMethod(String),
    /// the gRPC handler's response violates the gRPC protocol
    #[error("protocol error: {0}")]
    BadGrpcResponse(&'static str),
    /// the gRPC handler's response body failed
    #[error("response body failed")]
    ResponseBody(#[source] axum::Error),
    /// a response message could not be converted to the client's codec
    #[error("marshal response message {message}")]
    Marshal {
        message: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ConnectProtocolError {
    /// The Connect code a client gets for this error (codes follow connect-go's choices).
    pub fn code(&self) -> Code {
        match self {
            Self::IncompleteEnvelope
            | Self::InvalidRequestFlags(_)
            | Self::UnexpectedCompression
            | Self::Decompress(_)
            | Self::EmptyJson
            | Self::InvalidJson { .. }
            | Self::InvalidProto { .. }
            | Self::InvalidTimeout(_) => Code::InvalidArgument,
            Self::MessageTooLarge { .. }
            | Self::BodyTooLarge { .. }
            | Self::DecompressedTooLarge { .. }
            | Self::TooManyValues { .. } => Code::ResourceExhausted,
            Self::UnsupportedCompression(_) | Self::UnknownMethod(_) | Self::RequestCardinality(_) => {
                Code::Unimplemented
            }
            Self::ReadBody(_) => Code::Canceled,
            Self::BadGrpcResponse(_) | Self::ResponseBody(_) | Self::Marshal { .. } => Code::Internal,
        }
    }

    /// The error as the client will see it: code plus the message with its source chain.
    pub fn to_wire(&self) -> WireError {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        WireError::new(self.code(), message)
    }
}

/// One entry of a Connect error's `details`: a `google.protobuf.Any` in Connect's JSON form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorDetail {
    /// Fully-qualified message name, without the `type.googleapis.com/` prefix.
    #[serde(rename = "type")]
    pub type_name: String,
    /// The encoded message, standard base64 without padding.
    pub value: String,
}

/// An error as sent to a Connect client (unary body or the `error` of an end-stream message).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WireError {
    #[serde(serialize_with = "serialize_code")]
    pub code: Code,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ErrorDetail>,
}

fn serialize_code<S: serde::Serializer>(code: &Code, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(code.as_str())
}

impl WireError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), details: Vec::new() }
    }

    /// The JSON body of a Connect unary error response.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `google.rpc.Status`, only to read `grpc-status-details-bin`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// gRPC sends base64 with or without padding; accept both.
const LENIENT_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The outcome of a gRPC call as carried by its trailers (or trailers-only headers).
/// `Ok(())` for grpc-status 0; a missing `grpc-status` is a protocol error (`internal`).
pub fn status_from_trailers(map: &HeaderMap) -> Result<(), WireError> {
    let Some(raw) = map.get("grpc-status") else {
        return Err(WireError::new(Code::Internal, "protocol error: gRPC response without grpc-status"));
    };
    let n = std::str::from_utf8(raw.as_bytes())
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(Code::Unknown as i32);
    let Some(code) = Code::from_grpc(n) else {
        return Ok(());
    };
    let message = map.get("grpc-message").map(|v| percent_decode(v.as_bytes())).unwrap_or_default();
    let details = map
        .get("grpc-status-details-bin")
        .and_then(|v| LENIENT_BASE64.decode(v.as_bytes()).ok())
        .and_then(|raw| <RpcStatus as prost::Message>::decode(raw.as_slice()).ok())
        .map(|s| {
            s.details
                .into_iter()
                .map(|any| ErrorDetail {
                    type_name: any.type_url.rsplit_once('/').map_or(any.type_url.as_str(), |(_, name)| name).to_owned(),
                    value: base64::engine::general_purpose::STANDARD_NO_PAD.encode(&any.value),
                })
                .collect()
        })
        .unwrap_or_default();
    Err(WireError { code, message, details })
}

/// Decode a `grpc-message` value: `%XX` escapes of UTF-8 bytes. Malformed escapes are kept
/// literally, as the gRPC spec asks receivers to do.
pub fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%'
            && i + 2 < raw.len()
            && let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The JSON payload of a Connect end-stream message: `{}` on success, otherwise
/// `{"error":{..}}`, plus `"metadata"` when the handler sent custom trailers.
pub fn end_stream_json(error: Option<&WireError>, metadata: &BTreeMap<String, Vec<String>>) -> Vec<u8> {
    #[derive(Serialize)]
    struct EndStream<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a WireError>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        metadata: &'a BTreeMap<String, Vec<String>>,
    }
    serde_json::to_vec(&EndStream { error, metadata }).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_numbers_map_to_connect_names_and_http_statuses() {
        let cases = [
            (1, "canceled", 499),
            (2, "unknown", 500),
            (3, "invalid_argument", 400),
            (4, "deadline_exceeded", 504),
            (5, "not_found", 404),
            (6, "already_exists", 409),
            (7, "permission_denied", 403),
            (8, "resource_exhausted", 429),
            (9, "failed_precondition", 400),
            (10, "aborted", 409),
            (11, "out_of_range", 400),
            (12, "unimplemented", 501),
            (13, "internal", 500),
            (14, "unavailable", 503),
            (15, "data_loss", 500),
            (16, "unauthenticated", 401),
            (99, "unknown", 500),
        ];
        for (n, name, http) in cases {
            let code = Code::from_grpc(n).expect("non-zero");
            assert_eq!(code.as_str(), name, "grpc {n}");
            assert_eq!(code.http_status().as_u16(), http, "grpc {n}");
        }
        assert_eq!(Code::from_grpc(0), None);
    }

    #[test]
    fn percent_decoding_handles_utf8_and_malformed_escapes() {
        assert_eq!(percent_decode(b"no%20such%20pid"), "no such pid");
        assert_eq!(percent_decode(b"caf%C3%A9"), "café");
        assert_eq!(percent_decode(b"100%"), "100%");
        assert_eq!(percent_decode(b"%zz%4"), "%zz%4");
    }

    #[test]
    fn trailers_become_wire_errors_with_details() {
        let mut map = HeaderMap::new();
        map.insert("grpc-status", "5".parse().unwrap());
        map.insert("grpc-message", "process%20with%20pid%207%20not%20found".parse().unwrap());
        let status = RpcStatus {
            code: 5,
            message: String::new(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                value: vec![1, 2, 3],
            }],
        };
        let bin = base64::engine::general_purpose::STANDARD_NO_PAD.encode(prost::Message::encode_to_vec(&status));
        map.insert("grpc-status-details-bin", bin.parse().unwrap());
        let err = status_from_trailers(&map).unwrap_err();
        assert_eq!(
            String::from_utf8(err.to_json()).unwrap(),
            r#"{"code":"not_found","message":"process with pid 7 not found","details":[{"type":"google.rpc.ErrorInfo","value":"AQID"}]}"#
        );
        map.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(status_from_trailers(&map), Ok(()));
        assert_eq!(status_from_trailers(&HeaderMap::new()).unwrap_err().code, Code::Internal);
    }

    #[test]
    fn end_stream_payloads() {
        let none = BTreeMap::new();
        assert_eq!(end_stream_json(None, &none), b"{}");
        let mut md = BTreeMap::new();
        md.insert("x-tag".to_owned(), vec!["a".to_owned()]);
        let err = WireError::new(Code::DeadlineExceeded, "deadline exceeded");
        assert_eq!(
            String::from_utf8(end_stream_json(Some(&err), &md)).unwrap(),
            r#"{"error":{"code":"deadline_exceeded","message":"deadline exceeded"},"metadata":{"x-tag":["a"]}}"#
        );
    }
}
