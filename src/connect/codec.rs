//! Message codecs: Connect's `json` and `proto` on the client side, always binary protobuf on
//! the gRPC side.
//!
//! JSON goes through prost-reflect with the proto3 canonical mapping (what connect-go's
//! `protojson` produces): lowerCamel names, 64-bit integers as strings, bytes as padded standard
//! base64, enums by name, default values omitted; unknown fields are ignored when reading.
//!
//! One fast path exists because process output dominates traffic: a response that is a chain
//! of single-field messages ending in a non-empty `bytes` field (`StartResponse.event.data.stdout`)
//! is written by hand — one base64 pass straight into the output buffer instead of a
//! `DynamicMessage` decode plus serde; the pass is `base64-simd`'s (AVX2/SSSE3 chosen at run
//! time, a scalar fallback elsewhere): on a 1 GiB JSON stream it took guestd's CPU from ~0.9 to
//! ~0.75 s against the hand-written scalar encoder it replaced. Which shapes qualify is derived
//! from the descriptors, and the unit tests pin its output to prost-reflect's byte for byte.

use bytes::{BufMut, BytesMut};
use prost::Message as _;
use prost::encoding::{self, DecodeContext, WireType};
use prost_reflect::{DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions};

use super::error::ConnectProtocolError;

/// The message codec the client chose via its content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

/// The descriptors of one RPC method plus what the codecs precompute for them.
#[derive(Debug)]
pub struct MethodCodec {
    input: MessageDescriptor,
    output: MessageDescriptor,
    fast: Option<FastNode>,
}

impl MethodCodec {
    pub fn new(input: MessageDescriptor, output: MessageDescriptor) -> Self {
        let fast = FastNode::build(&output, 0);
        Self { input, output, fast }
    }

    /// Checks a protobuf request message without building it (see `Check`): tonic would report
    /// undecodable input as `internal`, Connect and gRPC clients get `invalid_argument`; more
    /// than [`MAX_VALUES`] values get `resource_exhausted`.
    pub fn check_proto(&self, payload: &[u8]) -> Result<(), ConnectProtocolError> {
        let mut fields = 0;
        Check { desc: self.input.clone(), fields: &mut fields }.merge(payload).map_err(|source| {
            ConnectProtocolError::InvalidProto { message: self.input.full_name().to_owned(), source }
        })?;
        if fields > MAX_VALUES {
            return Err(ConnectProtocolError::TooManyValues { max: MAX_VALUES });
        }
        Ok(())
    }

    /// Append the protobuf encoding of a client request message to `out`.
    ///
    /// `unary` distinguishes an empty unary JSON body (an error, as in connect-go) from an
    /// empty stream envelope (the default message).
    pub fn request_to_proto(
        &self,
        codec: Codec,
        payload: &[u8],
        unary: bool,
        out: &mut BytesMut,
    ) -> Result<(), ConnectProtocolError> {
        match codec {
            Codec::Proto => {
                self.check_proto(payload)?;
                out.put_slice(payload);
            }
            Codec::Json => {
                if payload.is_empty() {
                    if unary {
                        return Err(ConnectProtocolError::EmptyJson);
                    }
                    return Ok(());
                }
                if json_values_exceed(payload, MAX_VALUES) {
                    return Err(ConnectProtocolError::TooManyValues { max: MAX_VALUES });
                }
                let invalid =
                    |source| ConnectProtocolError::InvalidJson { message: self.input.full_name().to_owned(), source };
                let mut de = serde_json::Deserializer::from_slice(payload);
                let msg = DynamicMessage::deserialize_with_options(
                    self.input.clone(),
                    &mut de,
                    &DeserializeOptions::new().deny_unknown_fields(false),
                )
                .map_err(invalid)?;
                de.end().map_err(invalid)?;
                out.reserve(msg.encoded_len());
                msg.encode_raw(out);
            }
        }
        Ok(())
    }

    /// Append a gRPC response message (protobuf) to `out` in the client's codec.
    pub fn response_from_proto(
        &self,
        codec: Codec,
        payload: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), ConnectProtocolError> {
        match codec {
            Codec::Proto => out.put_slice(payload),
            Codec::Json => {
                if let Some(fast) = &self.fast
                    && fast.write_json(payload, out)
                {
                    return Ok(());
                }
                let marshal = |source: Box<dyn std::error::Error + Send + Sync>| ConnectProtocolError::Marshal {
                    message: self.output.full_name().to_owned(),
                    source,
                };
                let msg = DynamicMessage::decode(self.output.clone(), payload).map_err(|e| marshal(e.into()))?;
                let mut ser = serde_json::Serializer::new(out.writer());
                msg.serialize_with_options(&mut ser, &json_options()).map_err(|e| marshal(e.into()))?;
            }
        }
        Ok(())
    }
}

/// Most JSON values (keys included), or known protobuf fields, one request message may hold.
///
/// prost-reflect builds a JSON request as a `DynamicMessage` before it is encoded, at ~56 bytes
/// per value (`prost_reflect::Value`), so a 16 MiB body of `"",` list elements (5.6 M values; a
/// few KiB once gzipped) made guestd allocate ~300 MiB; tonic's generated decoder, which reads
/// either codec's request, turns each of 8 M 2-byte repeated `string`s into a 24-byte `String`
/// (~200 MiB). 256 Ki values cost at most ~15 MiB, in line with [`super::MAX_MESSAGE_BYTES`].
/// No real request comes close: the largest lists are a command's argv and environment, which
/// `execve` caps at ARG_MAX (2 MiB with the default stack limit, pointers included, so under
/// 240 Ki strings).
const MAX_VALUES: usize = 256 << 10;

/// Does `json` hold more than `max` values? Counts the bytes that start a value or a key
/// outside strings (`[ { , :`), an upper bound of the count, in one pass without allocating;
/// malformed JSON is counted all the same and rejected by the parser afterwards.
fn json_values_exceed(json: &[u8], max: usize) -> bool {
    let mut count = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'[' | b'{' | b',' | b':' => count += 1,
                _ => {}
            }
        }
        if count > max {
            return true;
        }
    }
    false
}

/// A message of the described type that is decoded only to be checked: every field is read
/// with prost's own decoders, as strictly as the generated code tonic runs next (wire types,
/// lengths, UTF-8, the recursion limit), and nothing is kept.
///
/// Why not `DynamicMessage::decode`: it keeps every unknown field and every repeated element,
/// at ~50 bytes each, so a 16 MiB request of 2-byte fields (a few KiB once gzipped) made guestd
/// allocate ~400 MiB before the call even started. This check allocates at most one string
/// field's copy at a time. Unknown fields are skipped (tonic skips them too); known ones are
/// counted into `fields`, for [`MAX_VALUES`].
#[derive(Debug)]
struct Check<'a> {
    desc: MessageDescriptor,
    fields: &'a mut usize,
}

/// Read one scalar (or one packed run of them) with prost's decoder for `$module`.
macro_rules! check_scalar {
    ($module:ident, $wire:expr, $field:expr, $wire_type:expr, $buf:expr, $ctx:expr) => {{
        let mut value = Default::default();
        if $field.is_list() && $wire_type == WireType::LengthDelimited {
            encoding::merge_loop(&mut value, $buf, $ctx, |v, b, c| encoding::$module::merge($wire, v, b, c))
        } else {
            encoding::$module::merge($wire_type, &mut value, $buf, $ctx)
        }
    }};
}

impl prost::Message for Check<'_> {
    fn encode_raw(&self, _buf: &mut impl bytes::BufMut) {}

    fn merge_field(
        &mut self,
        number: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        let Some(field) = self.desc.get_field(number) else {
            return encoding::skip_field(wire_type, number, buf, ctx);
        };
        *self.fields = self.fields.saturating_add(1);
        let (f, w, b, c) = (&field, wire_type, buf, ctx);
        match field.kind() {
            Kind::Double => check_scalar!(double, WireType::SixtyFourBit, f, w, b, c),
            Kind::Float => check_scalar!(float, WireType::ThirtyTwoBit, f, w, b, c),
            Kind::Int32 | Kind::Enum(_) => check_scalar!(int32, WireType::Varint, f, w, b, c),
            Kind::Int64 => check_scalar!(int64, WireType::Varint, f, w, b, c),
            Kind::Uint32 => check_scalar!(uint32, WireType::Varint, f, w, b, c),
            Kind::Uint64 => check_scalar!(uint64, WireType::Varint, f, w, b, c),
            Kind::Sint32 => check_scalar!(sint32, WireType::Varint, f, w, b, c),
            Kind::Sint64 => check_scalar!(sint64, WireType::Varint, f, w, b, c),
            Kind::Fixed32 => check_scalar!(fixed32, WireType::ThirtyTwoBit, f, w, b, c),
            Kind::Fixed64 => check_scalar!(fixed64, WireType::SixtyFourBit, f, w, b, c),
            Kind::Sfixed32 => check_scalar!(sfixed32, WireType::ThirtyTwoBit, f, w, b, c),
            Kind::Sfixed64 => check_scalar!(sfixed64, WireType::SixtyFourBit, f, w, b, c),
            Kind::Bool => check_scalar!(bool, WireType::Varint, f, w, b, c),
            Kind::String => encoding::string::merge(w, &mut String::new(), b, c),
            Kind::Bytes => {
                encoding::check_wire_type(WireType::LengthDelimited, w)?;
                encoding::skip_field(w, number, b, c)
            }
            Kind::Message(desc) => {
                let mut check = Check { desc, fields: &mut *self.fields };
                if field.is_group() {
                    encoding::group::merge(number, w, &mut check, b, c)
                } else {
                    encoding::message::merge(w, &mut check, b, c)
                }
            }
        }
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {}
}

/// protojson's defaults, spelled out (they are also prost-reflect's defaults).
fn json_options() -> SerializeOptions {
    SerializeOptions::new()
        .stringify_64_bit_integers(true)
        .use_enum_numbers(false)
        .use_proto_field_name(false)
        .skip_default_fields(true)
}

/// Nesting depth the fast path follows (`StartResponse.event.data.stdout` needs 3).
const FAST_MAX_DEPTH: usize = 4;

/// The part of a message type the fast path can write: singular fields that lead, through
/// singular message fields, to a `bytes` field.
#[derive(Debug)]
struct FastNode {
    fields: Vec<FastField>,
}

#[derive(Debug)]
struct FastField {
    number: u32,
    /// The JSON field name, already quoted and escaped.
    json_key: String,
    leaf: Option<FastNode>,
}

impl FastNode {
    fn build(desc: &MessageDescriptor, depth: usize) -> Option<FastNode> {
        // Well-known types have special JSON forms; never shortcut them.
        if depth >= FAST_MAX_DEPTH || desc.full_name().starts_with("google.protobuf.") {
            return None;
        }
        let fields: Vec<FastField> = desc
            .fields()
            .filter(|f| !f.is_list() && !f.is_map())
            .filter_map(|f| {
                let leaf = match f.kind() {
                    Kind::Bytes => None,
                    Kind::Message(m) => Some(FastNode::build(&m, depth + 1)?),
                    _ => return None,
                };
                Some(FastField { number: f.number(), json_key: serde_json::to_string(f.json_name()).ok()?, leaf })
            })
            .collect();
        (!fields.is_empty()).then_some(FastNode { fields })
    }

    /// Write the JSON of `payload` if it has exactly the supported shape: at every level exactly
    /// one length-delimited field, ending in non-empty bytes. Returns false (writing nothing)
    /// otherwise, and the caller takes the general path.
    fn write_json(&self, payload: &[u8], out: &mut BytesMut) -> bool {
        let mut keys: [&str; FAST_MAX_DEPTH] = [""; FAST_MAX_DEPTH];
        let mut depth = 0;
        let mut node = self;
        let mut rest = payload;
        let data = loop {
            let Some((key, n)) = varint(rest) else { return false };
            rest = &rest[n..];
            if key & 7 != 2 {
                return false;
            }
            let number = key >> 3;
            let Some(field) = node.fields.iter().find(|f| u64::from(f.number) == number) else {
                return false;
            };
            let Some((len, n)) = varint(rest) else { return false };
            rest = &rest[n..];
            if len != rest.len() as u64 {
                return false; // more fields follow, or truncated
            }
            keys[depth] = &field.json_key;
            depth += 1;
            match &field.leaf {
                None if !rest.is_empty() => break rest,
                None => return false,
                Some(next) => node = next,
            }
        };
        let b64_len = base64_simd::STANDARD.encoded_length(data.len());
        let keys = &keys[..depth];
        let framing: usize = keys.iter().map(|k| k.len() + 2).sum::<usize>() + 2 + depth;
        out.reserve(framing.saturating_add(b64_len));
        for key in keys {
            out.put_u8(b'{');
            out.put_slice(key.as_bytes());
            out.put_u8(b':');
        }
        out.put_u8(b'"');
        crate::sys::fd::append_with(out, b64_len, |spare| {
            base64_simd::STANDARD.encode(data, base64_simd::Out::from_uninit_slice(spare))
        });
        out.put_u8(b'"');
        for _ in keys {
            out.put_u8(b'}');
        }
        true
    }
}

/// A protobuf varint at the start of `b`: its value and length. None if truncated or longer
/// than 10 bytes.
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in b.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use prost_reflect::DescriptorPool;

    use super::*;
    use crate::connect::MAX_MESSAGE_BYTES;
    use crate::proto::process::{
        ProcessEvent, StartResponse,
        process_event::{DataEvent, EndEvent, Event, StartEvent, data_event::Output},
    };

    fn codec_for(method: &str) -> MethodCodec {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let (service, method) = method.rsplit_once('.').unwrap();
        let m = pool.get_service_by_name(service).unwrap().methods().find(|m| m.name() == method).unwrap();
        MethodCodec::new(m.input(), m.output())
    }

    fn reference_json(codec: &MethodCodec, payload: &[u8]) -> String {
        let msg = DynamicMessage::decode(codec.output.clone(), payload).unwrap();
        let mut ser = serde_json::Serializer::new(Vec::new());
        msg.serialize_with_options(&mut ser, &SerializeOptions::default()).unwrap();
        String::from_utf8(ser.into_inner()).unwrap()
    }

    fn our_json(codec: &MethodCodec, payload: &[u8]) -> String {
        let mut out = BytesMut::new();
        codec.response_from_proto(Codec::Json, payload, &mut out).unwrap();
        String::from_utf8(out.to_vec()).unwrap()
    }

    fn data(output: Output) -> Vec<u8> {
        StartResponse { event: Some(ProcessEvent { event: Some(Event::Data(DataEvent { output: Some(output) })) }) }
            .encode_to_vec()
    }

    #[test]
    fn fast_path_equals_prost_reflect_for_every_length_and_stream() {
        let codec = codec_for("process.Process.Start");
        assert!(codec.fast.is_some());
        for len in (0..70).chain([1000, 65_536, 1 << 20]) {
            let bytes = Bytes::from((0..len).map(|i| (i * 37 + 11) as u8).collect::<Vec<_>>());
            for output in [Output::Stdout(bytes.clone()), Output::Stderr(bytes.clone()), Output::Pty(bytes.clone())] {
                let payload = data(output);
                let mut out = BytesMut::new();
                let took_fast = codec.fast.as_ref().unwrap().write_json(&payload, &mut out);
                assert_eq!(took_fast, len > 0, "len {len}");
                assert_eq!(our_json(&codec, &payload), reference_json(&codec, &payload), "len {len}");
            }
        }
    }

    #[test]
    fn other_shapes_fall_back_to_prost_reflect() {
        let codec = codec_for("process.Process.Connect");
        let start = StartResponse { event: Some(ProcessEvent { event: Some(Event::Start(StartEvent { pid: 42 })) }) }
            .encode_to_vec();
        assert_eq!(our_json(&codec, &start), r#"{"event":{"start":{"pid":42}}}"#);
        let end = StartResponse {
            event: Some(ProcessEvent {
                event: Some(Event::End(EndEvent {
                    exit_code: -1,
                    exited: true,
                    status: "exit status 255".into(),
                    error: None,
                })),
            }),
        }
        .encode_to_vec();
        assert_eq!(
            our_json(&codec, &end),
            r#"{"event":{"end":{"exitCode":-1,"exited":true,"status":"exit status 255"}}}"#
        );
        // Two fields at one level (a duplicated oneof member): prost-reflect keeps the last.
        let mut twice = data(Output::Stdout(Bytes::from_static(b"a")));
        twice.extend_from_slice(&data(Output::Stderr(Bytes::from_static(b"b"))));
        assert_eq!(our_json(&codec, &twice), reference_json(&codec, &twice));
        // Unknown field numbers.
        let unknown = [0x0a, 0x04, 0x7a, 0x02, 0x0a, 0x00];
        assert_eq!(our_json(&codec, &unknown), reference_json(&codec, &unknown));
        assert_eq!(our_json(&codec, &[]), "{}");
    }

    #[test]
    fn json_requests_follow_proto3_json_rules() {
        let codec = codec_for("process.Process.SendSignal");
        let mut out = BytesMut::new();
        codec
            .request_to_proto(
                Codec::Json,
                br#"{"process":{"pid":7},"signal":"SIGNAL_SIGKILL","unknownField":[1,{"a":2}]}"#,
                true,
                &mut out,
            )
            .unwrap();
        let req = crate::proto::process::SendSignalRequest::decode(&out[..]).unwrap();
        assert_eq!(req.signal, 9);
        let err = codec.request_to_proto(Codec::Json, b"", true, &mut out).unwrap_err();
        assert_eq!(err.to_string(), "zero-length payload is not a valid JSON object");
        assert!(codec.request_to_proto(Codec::Json, b"", false, &mut out).is_ok());
        let err = codec.request_to_proto(Codec::Json, b"{\"process\":", true, &mut out);
        assert!(matches!(err, Err(ConnectProtocolError::InvalidJson { .. })));
        let err = codec.request_to_proto(Codec::Json, b"{} x", true, &mut out);
        assert!(matches!(err, Err(ConnectProtocolError::InvalidJson { .. })));
        let err = codec.request_to_proto(Codec::Proto, &[0x0a, 0x05, 0x08], true, &mut out);
        assert!(matches!(err, Err(ConnectProtocolError::InvalidProto { .. })));
    }

    /// Peak resident memory of this process in MiB since the last [`reset_peak_rss`].
    fn peak_rss_mib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    }

    /// Reset VmHWM to the current RSS (Linux >= 4.0). Other tests run in parallel threads of
    /// this process, so the bounds below leave room for their allocations: the bugs they guard
    /// against cost 300-400 MiB.
    fn reset_peak_rss() {
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
    }

    #[test]
    fn proto_requests_are_checked_in_bounded_memory() {
        let codec = codec_for("process.Process.SendSignal");
        // 16 MiB of 2-byte unknown fields (field 15, varint 0): a few KiB once gzipped.
        let payload = [0x78u8, 0x00].repeat(8 << 20);
        let mut out = BytesMut::with_capacity(payload.len() + 16);
        reset_peak_rss();
        let before = peak_rss_mib();
        codec.request_to_proto(Codec::Proto, &payload, true, &mut out).unwrap();
        let grew = peak_rss_mib().saturating_sub(before);
        assert!(grew < 160, "checking a 16 MiB request took {grew} MiB more memory");
        assert_eq!(&out[..], &payload[..]);
    }

    #[test]
    fn json_requests_are_decoded_in_bounded_memory() {
        let codec = codec_for("process.Process.Start");
        // 16 MiB of empty args: 5.6 M values, a few KiB once gzipped.
        let mut json = b"{\"process\":{\"cmd\":\"x\",\"args\":[\"\"".to_vec();
        while json.len() < MAX_MESSAGE_BYTES - 16 {
            json.extend_from_slice(b",\"\"");
        }
        json.extend_from_slice(b"]}}");
        let mut out = BytesMut::new();
        reset_peak_rss();
        let before = peak_rss_mib();
        let err = codec.request_to_proto(Codec::Json, &json, true, &mut out);
        let grew = peak_rss_mib().saturating_sub(before);
        assert!(grew < 160, "decoding a 16 MiB request took {grew} MiB more memory");
        assert!(matches!(err, Err(ConnectProtocolError::TooManyValues { .. })), "{err:?}");
        // A large but real argv (and strings full of separators) still goes through.
        let args: Vec<String> = (0..100_000).map(|i| format!("a,[{{:\"}}{i}")).collect();
        let json = serde_json::json!({"process": {"cmd": "x", "args": args}}).to_string();
        let mut out = BytesMut::new();
        codec.request_to_proto(Codec::Json, json.as_bytes(), true, &mut out).unwrap();
        let req = crate::proto::process::StartRequest::decode(&out[..]).unwrap();
        assert_eq!(req.process.unwrap().args, args);
    }

    #[test]
    fn proto_requests_hold_a_bounded_number_of_fields() {
        // 8 M empty args in 16 MiB: tonic's generated decoder would make each a 24-byte String.
        let mut config = [0x0a, 0x01, b'x'].to_vec();
        config.extend([0x12, 0x00].repeat(8 << 20));
        let mut payload = vec![0x0a];
        prost::encoding::encode_varint(config.len() as u64, &mut payload);
        payload.extend_from_slice(&config);
        let codec = codec_for("process.Process.Start");
        let err = codec.request_to_proto(Codec::Proto, &payload, true, &mut BytesMut::new());
        assert!(matches!(err, Err(ConnectProtocolError::TooManyValues { .. })), "{err:?}");
    }

    #[test]
    fn proto_requests_are_checked_like_the_generated_decoder() {
        let codec = codec_for("process.Process.Start");
        let valid = crate::proto::process::StartRequest {
            process: Some(crate::proto::process::ProcessConfig {
                cmd: "sh".into(),
                args: vec!["-c".into(), "true".into()],
                envs: [("A".to_owned(), "1".to_owned())].into(),
                cwd: Some("/".into()),
            }),
            tag: Some("t".into()),
            ..Default::default()
        }
        .encode_to_vec();
        let mut with_unknown = valid.clone();
        with_unknown.extend_from_slice(&[0x78, 0x05, 0x7d, 1, 2, 3, 4, 0x7b, 0x08, 0x01, 0x7c]);
        for ok in [&valid[..], &with_unknown[..], &[]] {
            let mut out = BytesMut::new();
            codec.request_to_proto(Codec::Proto, ok, true, &mut out).unwrap();
            assert_eq!(&out[..], ok);
        }
        let mut nested_groups = vec![0x7b; 200];
        nested_groups.extend(vec![0x7c; 200]);
        for bad in [
            &[0x0a, 0x05, 0x08][..],         // process: length past the end
            &[0x08, 0x01],                   // process as a varint
            &[0x0a, 0x03, 0x0a, 0x01, 0xff], // process.cmd not UTF-8
            &[0x0a, 0x02, 0x1a, 0x05],       // process.envs entry past the end of process
            &[0x78],                         // unknown field without a value
            &[0x7c],                         // end group without a start
            &nested_groups,                  // past the recursion limit
        ] {
            let mut out = BytesMut::new();
            let err = codec.request_to_proto(Codec::Proto, bad, true, &mut out);
            assert!(matches!(err, Err(ConnectProtocolError::InvalidProto { .. })), "{bad:02x?}: {err:?}");
            assert!(
                crate::proto::process::StartRequest::decode(bad).is_err(),
                "the generated decoder accepts {bad:02x?}"
            );
        }
    }

    #[test]
    fn bytes_accept_standard_urlsafe_padded_and_unpadded_base64() {
        let codec = codec_for("process.Process.SendInput");
        for b64 in ["-_8=", "+/8=", "+/8", "-_8"] {
            let mut out = BytesMut::new();
            let json = format!(r#"{{"process":{{"pid":1}},"input":{{"stdin":"{b64}"}}}}"#);
            codec.request_to_proto(Codec::Json, json.as_bytes(), true, &mut out).unwrap();
            let req = crate::proto::process::SendInputRequest::decode(&out[..]).unwrap();
            let input = req.input.unwrap().input.unwrap();
            assert_eq!(
                input,
                crate::proto::process::process_input::Input::Stdin(Bytes::from_static(&[0xfb, 0xff])),
                "{b64}"
            );
        }
    }
}
