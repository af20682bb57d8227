//! Generated protobuf and tonic code for the wire contract in `proto/`.
//!
//! Only the transport adapters (`rpc`, `connect`) use these types; domain modules never do.

#![allow(clippy::all, missing_docs)]

pub mod process {
    tonic::include_proto!("process");
}

pub mod filesystem {
    tonic::include_proto!("filesystem");
}

/// The encoded `FileDescriptorSet` of every `.proto` file guestd serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
