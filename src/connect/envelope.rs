//! Length-prefixed framing shared by gRPC and Connect streams: 1 flag byte, a 4-byte
//! big-endian length, then the payload.
//!
//! Bodies arrive in arbitrary fragments (HTTP/1.1 chunks, h2 DATA frames), so the decoder
//! keeps the fragments it was given and cuts frames out of them: a frame lying inside one
//! fragment is a zero-copy slice, only a frame that spans fragments is copied once. Small
//! fragments are copied as they arrive instead of kept: each is a slice of one of hyper's read
//! buffers, and a client sending a message one byte per fragment made every byte hold a buffer
//! (kilobytes) until the message was complete. The length prefix is checked against the limit
//! as soon as its 5 bytes are in, so a hostile "4 GiB" prefix is rejected before anything is
//! allocated for it.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::ConnectProtocolError;

/// Envelope flag: the payload is compressed with the stream's negotiated encoding.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag (Connect only): this is the end-stream message; payload is JSON.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Length of the flag byte plus the length prefix.
pub const HEADER_LEN: usize = 5;

/// One decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub flags: u8,
    pub payload: Bytes,
}

/// Fragments smaller than this are copied into the decoder's own buffer (see the module docs);
/// larger ones are kept as they are, holding at most a few times their size of hyper's buffers.
const COPY_BELOW: usize = 16 * 1024;

/// Incremental frame decoder. Memory held is about one frame plus one input fragment.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Fragments kept as given, then `copied`: the buffered bytes in order.
    chunks: VecDeque<Bytes>,
    /// Small fragments that arrived after the last kept one, joined.
    copied: BytesMut,
    buffered: usize,
    /// Flags and length of the frame whose header was consumed but whose payload is incomplete.
    header: Option<(u8, usize)>,
    max_payload: usize,
}

impl FrameDecoder {
    pub fn new(max_payload: usize) -> Self {
        Self { chunks: VecDeque::new(), copied: BytesMut::new(), buffered: 0, header: None, max_payload }
    }

    /// Add the next fragment of the body.
    pub fn push(&mut self, chunk: Bytes) {
        self.buffered += chunk.len();
        if chunk.len() < COPY_BELOW {
            self.copied.extend_from_slice(&chunk);
        } else {
            if !self.copied.is_empty() {
                self.chunks.push_back(self.copied.split().freeze());
            }
            self.chunks.push_back(chunk);
        }
    }

    /// True while bytes of an unfinished frame are held: the body must not end here.
    pub fn has_partial(&self) -> bool {
        self.header.is_some() || self.buffered > 0
    }

    /// The next complete frame, `Ok(None)` if more input is needed.
    pub fn decode(&mut self) -> Result<Option<Frame>, ConnectProtocolError> {
        if self.header.is_none() {
            if self.buffered < HEADER_LEN {
                return Ok(None);
            }
            let mut head = [0u8; HEADER_LEN];
            self.copy_out(&mut head);
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            if len as u64 > self.max_payload as u64 {
                return Err(ConnectProtocolError::MessageTooLarge { size: len.into(), max: self.max_payload });
            }
            self.header = Some((head[0], len as usize));
        }
        let Some((flags, len)) = self.header else { return Ok(None) };
        if self.buffered < len {
            return Ok(None);
        }
        self.header = None;
        let payload = self.take(len);
        Ok(Some(Frame { flags, payload }))
    }

    /// Remove `out.len()` bytes (caller checked they are buffered) into `out`.
    fn copy_out(&mut self, out: &mut [u8]) {
        let mut filled = 0;
        while filled < out.len() {
            let Some(front) = self.chunks.front_mut() else { break };
            let n = front.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&front[..n]);
            front.advance(n);
            filled += n;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        let n = (out.len() - filled).min(self.copied.len());
        out[filled..filled + n].copy_from_slice(&self.copied[..n]);
        self.copied.advance(n);
        filled += n;
        self.buffered -= filled;
    }

    /// Remove `len` buffered bytes, without copying when they lie in one fragment.
    fn take(&mut self, len: usize) -> Bytes {
        if len == 0 {
            return Bytes::new();
        }
        if let Some(front) = self.chunks.front_mut()
            && front.len() >= len
        {
            let out = front.split_to(len);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            self.buffered -= len;
            return out;
        }
        if self.chunks.is_empty() && self.copied.len() >= len {
            self.buffered -= len;
            return self.copied.split_to(len).freeze();
        }
        let mut out = BytesMut::with_capacity(len);
        out.resize(len, 0);
        self.copy_out(&mut out);
        out.freeze()
    }
}

/// Tracks frame boundaries of a gRPC body that is forwarded unchanged (proto streams): it
/// looks only at the 5 header bytes of each frame and never copies payload.
#[derive(Debug, Default)]
pub struct FrameScanner {
    /// Header bytes seen of the current frame (0..5), and their values.
    head: [u8; HEADER_LEN],
    head_len: usize,
    /// Payload bytes still to skip in the current frame.
    remaining: usize,
}

impl FrameScanner {
    /// Walk over `chunk`. Fails on a compressed frame or a length above `max_payload`.
    pub fn scan(&mut self, mut chunk: &[u8], max_payload: usize) -> Result<(), &'static str> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len());
                self.remaining -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (HEADER_LEN - self.head_len).min(chunk.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&chunk[..n]);
            self.head_len += n;
            chunk = &chunk[n..];
            if self.head_len == HEADER_LEN {
                self.head_len = 0;
                if self.head[0] != 0 {
                    return Err("compressed or flagged frame from the gRPC handler");
                }
                let h = &self.head;
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                if len > max_payload {
                    return Err("response message larger than the configured maximum");
                }
                self.remaining = len;
            }
        }
        Ok(())
    }

    /// True when the data seen so far ends exactly at a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.remaining == 0
    }
}

/// Start an envelope in `out`: writes the flag byte and a placeholder length. Returns the
/// offset to pass to [`finish_envelope`] once the payload has been appended.
pub fn begin_envelope(out: &mut BytesMut, flags: u8) -> usize {
    let at = out.len();
    out.put_u8(flags);
    out.put_u32(0);
    at
}

/// Patch the length of the envelope started at `at` to cover everything appended since.
pub fn finish_envelope(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at - HEADER_LEN) as u32;
    out[at + 1..at + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// A complete envelope around `payload`.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_u8(flags);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], split_every: usize, max: usize) -> Result<Vec<Frame>, String> {
        let mut d = FrameDecoder::new(max);
        let mut out = Vec::new();
        for piece in input.chunks(split_every.max(1)) {
            d.push(Bytes::copy_from_slice(piece));
            while let Some(f) = d.decode().map_err(|e| e.to_string())? {
                out.push(f);
            }
        }
        if d.has_partial() {
            return Err("partial".into());
        }
        Ok(out)
    }

    #[test]
    fn decodes_frames_split_at_every_possible_point() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&envelope(0, b"hello"));
        wire.extend_from_slice(&envelope(0, b""));
        wire.extend_from_slice(&envelope(FLAG_COMPRESSED, &[7u8; 300]));
        for split in 1..=wire.len() {
            let got = frames(&wire, split, 1024).unwrap();
            assert_eq!(got.len(), 3, "split {split}");
            assert_eq!(&got[0].payload[..], b"hello");
            assert!(got[1].payload.is_empty());
            assert_eq!(got[2].flags, FLAG_COMPRESSED);
            assert_eq!(&got[2].payload[..], &[7u8; 300][..]);
        }
    }

    #[test]
    fn rejects_huge_length_prefix_before_buffering_payload() {
        let mut d = FrameDecoder::new(16 << 20);
        d.push(Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff]));
        let err = d.decode().unwrap_err();
        assert!(matches!(err, ConnectProtocolError::MessageTooLarge { size: 0xffff_ffff, .. }));
    }

    #[test]
    fn truncated_input_is_partial() {
        let wire = envelope(0, b"hello");
        assert_eq!(frames(&wire[..7], 3, 64), Err("partial".into()));
        assert_eq!(frames(&wire[..3], 3, 64), Err("partial".into()));
    }

    #[test]
    fn single_fragment_frames_are_zero_copy() {
        let wire = Bytes::from(envelope(0, &[1; COPY_BELOW]).to_vec());
        let base = wire.as_ptr() as usize;
        let mut d = FrameDecoder::new(COPY_BELOW);
        d.push(wire);
        let f = d.decode().unwrap().unwrap();
        assert_eq!(f.payload.as_ptr() as usize, base + HEADER_LEN);
    }

    /// One-byte fragments cut from a big buffer (what hyper hands over for one-byte chunks) are
    /// copied, so they do not keep that buffer alive while the message is incomplete.
    #[test]
    fn small_fragments_are_copied_and_free_their_buffers() {
        let wire = Bytes::from(envelope(0, &[7; 1000]).to_vec());
        let mut d = FrameDecoder::new(4096);
        for i in 0..wire.len() - 1 {
            d.push(wire.slice(i..=i));
            assert_eq!(d.decode().unwrap(), None);
        }
        let last = Bytes::copy_from_slice(&wire[wire.len() - 1..]);
        assert!(wire.try_into_mut().is_ok(), "no fragment of the big buffer is kept");
        d.push(last);
        let frame = d.decode().unwrap().unwrap();
        assert_eq!(frame.payload.len(), 1000);
        assert!(frame.payload.iter().all(|&b| b == 7));
    }

    /// Small fragments between kept ones keep their order.
    #[test]
    fn copied_and_kept_fragments_stay_in_order() {
        let payload: Vec<u8> = (0..3 * COPY_BELOW as u32).map(|i| (i % 251) as u8).collect();
        let wire = Bytes::from(envelope(0, &payload).to_vec());
        let mut d = FrameDecoder::new(payload.len());
        let cuts = [0, 3, 7, 7 + COPY_BELOW, 9 + COPY_BELOW, 2 * COPY_BELOW + 20, wire.len()];
        for pair in cuts.windows(2) {
            d.push(wire.slice(pair[0]..pair[1]));
        }
        assert_eq!(d.decode().unwrap().unwrap().payload, payload);
    }

    #[test]
    fn scanner_tracks_boundaries_and_rejects_flags() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&envelope(0, b"abc"));
        wire.extend_from_slice(&envelope(0, b"defgh"));
        for split in 1..wire.len() {
            let mut s = FrameScanner::default();
            let (a, b) = wire.split_at(split);
            s.scan(a, 64).unwrap();
            s.scan(b, 64).unwrap();
            assert!(s.at_boundary());
        }
        let mut s = FrameScanner::default();
        s.scan(&wire[..6], 64).unwrap();
        assert!(!s.at_boundary());
        assert!(FrameScanner::default().scan(&envelope(1, b"x"), 64).is_err());
        assert!(FrameScanner::default().scan(&envelope(0, &[0; 65]), 64).is_err());
    }

    #[test]
    fn envelope_builders_agree() {
        let mut out = BytesMut::new();
        let at = begin_envelope(&mut out, FLAG_END_STREAM);
        out.put_slice(b"{}");
        finish_envelope(&mut out, at);
        assert_eq!(&out[..], &envelope(FLAG_END_STREAM, b"{}")[..]);
    }
}
